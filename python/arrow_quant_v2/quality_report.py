"""A quantized model's quality as one self-contained HTML page with plots (``arrowquant report``,
:func:`report`, ``quantize_diffusion_model(..., report=True)``).

Everything comes from the output directory -- the manifest, each component's ``weights.parquet``
(its metadata columns only: a 7B model's report reads no codes) and ``activations.parquet`` --
and, with ``against``, from ``validate_quality`` against the source. The figures are drawn with
matplotlib (``pip install 'arrow_quant_v2[report]'``) and embedded as PNG data: the page loads no
script, font or image from anywhere. Views aggregate where a model has many layers: the heatmap
turns into one row per block past 60 layers, the tables list the worst layers only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
import os
import re
import time
from collections import OrderedDict
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq

from .errors import ConfigurationError, ModelFormatError, ModelNotFoundError

REPORT_INSTALL = "pip install 'arrow_quant_v2[report]'"
# Past this many layers the heatmap shows one row per block (the worst layer of the block).
HEATMAP_LAYERS = 60
WORST_ROWS = 15

_BLOCK = re.compile(r"^(.*?(?:^|\.)(?:transformer_blocks|single_transformer_blocks|blocks|layers|h|"
                    r"down_blocks|up_blocks|mid_block|joint_blocks|double_blocks|single_blocks|resnets|attentions)"
                    r"\.\d+)")
_KINDS = [  # (kind, pattern) in order: the first that matches names the layer's kind
    ("embedding", r"(embed|wte|wpe|tok_|pos_emb|patch_emb|x_embedder|pos_embed)"),
    ("norm / adaLN", r"(norm|adaln|ada_ln|modulation|\.ada\.|scale_shift)"),
    ("attention q/k/v", r"(to_q|to_k|to_v|q_proj|k_proj|v_proj|qkv|query|key|value|add_q|add_k|add_v|\.q\b|\.k\b|\.v\b)"),
    ("attention out", r"(to_out|o_proj|out_proj|attn\.proj|to_add_out|\.o\b)"),
    ("MLP up / gate", r"(fc1|up_proj|gate_proj|ff\.net\.0|mlp\.0|\.w1\b|\.w3\b|linear1|proj_mlp|ff_context\.net\.0|\.up\b)"),
    ("MLP down", r"(fc2|down_proj|ff\.net\.2|mlp\.2|\.w2\b|linear2|ff_context\.net\.2|\.down\b)"),
    ("output head", r"(lm_head|proj_out|conv_out|final_layer|norm_out|\.out\b)"),
    ("timestep / conditioning", r"(time_emb|timestep|t_embed|t_embedder|y_embedder|context_embedder|cond)"),
]


def _kind(name: str, shape: Sequence[int]) -> str:
    low = name.lower()
    for kind, pat in _KINDS:
        if re.search(pat, low):
            return kind
    if len(shape) >= 3:
        return "convolution"
    return "other"


def _block(name: str) -> str:
    m = _BLOCK.match(name)
    return m.group(1) if m else "(outside blocks)"


_SHORT = [("single_transformer_blocks", "single"), ("transformer_blocks", ""), ("joint_blocks", ""),
          ("double_blocks", "double"), ("single_blocks", "single"), ("down_blocks", "down"), ("up_blocks", "up"),
          ("mid_block", "mid"), ("attentions", "attn"), ("resnets", "res"), ("blocks", ""), ("layers", ""),
          ("h", "")]


def block_label(block: str) -> str:
    """A short axis label of a block: "12", "down.1", "single.5", "mid.attn.0"; "other" for the
    layers outside every block."""
    if block == "(outside blocks)":
        return "other"
    short = dict(_SHORT)
    words = [p if p.isdigit() else short[p] for p in block.split(".") if p.isdigit() or p in short]
    return ".".join(w for w in words if w) or block


def _require_matplotlib():
    try:
        import matplotlib
    except ImportError:
        raise ConfigurationError(f"the report draws its plots with matplotlib, which is not installed: "
                                 f"{REPORT_INSTALL}") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def load_layers(quant_dir: str, manifest: Dict[str, Any]) -> List[Dict[str, Any]]:
    """One dict per stored tensor, by component in depth order (names sorted with their numbers
    compared as numbers): name (component-qualified), component, shape,
    numel, dtype, quantized, scheme, bits, weight relative error, cosine, stored bytes (all its
    pieces), reason, fallback (rejected bit widths), kind, block."""
    out: List[Dict[str, Any]] = []
    for comp in manifest.get("components", []):
        path = os.path.join(quant_dir, comp["weights"])
        if not os.path.exists(path):
            raise ModelFormatError(f"{path}: missing (the manifest lists it)")
        cols = ["name", "shape", "dtype", "scheme", "metrics", "reason", "rejected_bits", "stored_bytes"]
        table = pq.read_table(path, columns=cols)
        by_name: "OrderedDict[str, Dict[str, Any]]" = OrderedDict()
        for row in table.to_pylist():
            name = row["name"]
            if name in by_name:  # a later piece of a tensor stored in pieces
                by_name[name]["stored_bytes"] += int(row["stored_bytes"])
                continue
            scheme = row["scheme"]
            shape = [int(v) for v in row["shape"]]
            numel = int(np.prod(shape)) if shape else 1
            qualified = f"{comp['name']}/{name}" if comp["name"] else name
            metrics = row["metrics"] or {}
            by_name[name] = {
                "name": qualified, "component": comp["name"], "shape": shape, "numel": numel, "dtype": row["dtype"],
                "quantized": scheme is not None,
                "scheme": (scheme["kind"] if scheme["kind"] not in ("affine", "entropy") else
                           f"{scheme['kind']} int{scheme['bits']}") if scheme else "kept",
                "bits": scheme["bits"] if scheme else None,
                "relative_error": metrics.get("relative_error") if scheme else None,
                "cosine": metrics.get("cosine") if scheme else None,
                "stored_bytes": int(row["stored_bytes"]), "reason": row["reason"],
                "fallback": list(row["rejected_bits"] or []), "kind": _kind(name, shape), "block": _block(name),
            }
        # files keep tensors in name order (blocks.1, blocks.10, blocks.100, blocks.2 ...): depth is
        # the order of the names with their numbers compared as numbers
        out.extend(sorted(by_name.values(), key=lambda l: _natural(l["name"])))
    for i, layer in enumerate(out):
        layer["depth"] = i
    return out


def _natural(name: str) -> List[Any]:
    return [(0, int(t), "") if t.isdigit() else (1, 0, t) for t in re.findall(r"\d+|\D+", name)]


def _activation_rows(quant_dir: str) -> List[Dict[str, Any]]:
    path = os.path.join(quant_dir, "activations.parquet")
    return pq.read_table(path).to_pylist() if os.path.exists(path) else []


def collect(quant_dir: str, against: Optional[str] = None, result: Optional[Dict[str, Any]] = None) -> Dict[str, Any]:
    """Everything the report shows, as plain data (also embedded in the page as JSON)."""
    quant_dir = os.fspath(quant_dir)
    manifest_path = os.path.join(quant_dir, "manifest.json")
    if not os.path.exists(manifest_path):
        raise ModelNotFoundError(f"{quant_dir}: no manifest.json (not a quantized model directory)")
    try:
        with open(manifest_path, "r", encoding="utf-8") as f:
            manifest = json.load(f)
    except json.JSONDecodeError as e:
        raise ModelFormatError(f"{manifest_path}: not JSON: {e}") from None
    layers = load_layers(quant_dir, manifest)
    data = (manifest.get("calibration") or {}).get("data") or {}
    out_err = data.get("output_error") or {}
    groups = data.get("time_groups") or []
    for layer in layers:
        e = out_err.get(layer["name"])
        if e:
            per = [g.get("relative_error") for g in sorted(e["groups"], key=lambda g: g["group"])]
            layer["output_error_groups"] = per
            layer["output_error"] = max(v for v in per if v is not None) if any(v is not None for v in per) else None
            act = [g.get("relative_error_with_activations") for g in sorted(e["groups"], key=lambda g: g["group"])]
            if any(v is not None for v in act):
                layer["output_error_with_activations"] = act
    validation = None
    if against is not None:
        from .api import ArrowQuantV2

        v = ArrowQuantV2().validate_quality(against, quant_dir)
        by = {l["name"]: l for l in v["layers"]}
        mismatched = [n for n, l in by.items() if l.get("quantized") and not l.get("matches_recorded")]
        differing = [n for n, l in by.items() if not l.get("quantized") and not l.get("identical_to_source")]
        validation = {"original": os.fspath(against), "passed": v["passed"], "cosine_similarity": v["cosine_similarity"],
                      "min_cosine_similarity": v["min_cosine_similarity"], "seconds": v["validation_time_s"],
                      "mismatched": mismatched, "kept_differing": differing, "failures": v["failures"]}
        for layer in layers:
            l = by.get(layer["name"])
            if l is not None and l.get("quantized"):
                layer["validated_relative_error"] = l["relative_error"]
    config = manifest.get("config") or {}
    summary = dict(manifest.get("summary") or {})
    source_bits = _source_bits(layers)
    budget = config.get("target_bits_per_weight") or None
    return {
        "quant_dir": os.path.abspath(quant_dir),
        "manifest": {k: manifest.get(k) for k in ("format_version", "producer", "source", "modality",
                                                   "modality_evidence", "min_accuracy", "components")},
        "config": config,
        "summary": summary,
        "source_bits_per_weight": source_bits,
        "budget_bits_per_weight": budget,
        "time_groups": groups,
        "step_kind": data.get("step_kind"),
        "calibrated": bool(out_err),
        "calibration": {k: data.get(k) for k in ("path", "samples", "num_bins", "layers_calibrated", "layers_gptq",
                                                 "activation_bits", "layers_equalized")} if data else None,
        "time_aware": (manifest.get("calibration") or {}).get("time_aware"),
        "activations": _activation_rows(quant_dir),
        "activation_static": data.get("activation_static") or {},
        "layers": layers,
        "validation": validation,
        "quantization_time_s": (result or {}).get("quantization_time_s"),
    }


def _source_bits(layers: List[Dict[str, Any]]) -> float:
    size = {"F32": 32, "F16": 16, "BF16": 16, "F64": 64, "F8_E4M3": 8, "F8_E5M2": 8}
    n = sum(l["numel"] for l in layers)
    return sum(l["numel"] * size.get(l["dtype"], 16) for l in layers) / n if n else 0.0


# ---------------------------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------------------------

_PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#bcbd22",
            "#7f7f7f"]


def _colors(keys: Sequence[str]) -> Dict[str, str]:
    return {k: _PALETTE[i % len(_PALETTE)] for i, k in enumerate(keys)}


def _block_ticks(ax, layers):
    """x ticks at the first layer of every block (at most ~20 labels)."""
    firsts, seen = [], set()
    for l in layers:
        if l["block"] not in seen:
            seen.add(l["block"])
            firsts.append((l["depth"], l["block"]))
    step = max(1, len(firsts) // 20)
    shown = firsts[::step]
    ax.set_xticks([d for d, _ in shown])
    ax.set_xticklabels([block_label(b) for _, b in shown], fontsize=7, rotation=45 if len(shown) > 8 else 0,
                       ha="right" if len(shown) > 8 else "center")


def fig_error_depth(plt, d: Dict[str, Any]) -> str:
    layers = d["layers"]
    rows = 2 if d["calibrated"] else 1
    fig, axes = plt.subplots(rows, 1, figsize=(11, 3.2 * rows), sharex=True, squeeze=False)
    schemes = sorted({l["scheme"] for l in layers if l["quantized"]})
    color = _colors(schemes)
    panels = [("relative_error", "weight relative error ||W - Q|| / ||W||")]
    if d["calibrated"]:
        panels.append(("output_error", "output relative error, worst timestep group"))
    for ax, (key, label) in zip(axes[:, 0], panels):
        for s in schemes:
            pts = [(l["depth"], l[key]) for l in layers if l["quantized"] and l["scheme"] == s and l.get(key)]
            if pts:
                x, y = zip(*pts)
                ax.scatter(x, y, s=10, color=color[s], label=s, zorder=3)
        fb = [(l["depth"], l[key]) for l in layers if l["quantized"] and l["fallback"] and l.get(key)]
        if fb:
            x, y = zip(*fb)
            ax.scatter(x, y, s=60, facecolors="none", edgecolors="black", linewidths=1.0,
                       label="fell back (bits raised)", zorder=4)
        ax.set_yscale("log")
        ax.set_ylabel(label, fontsize=8)
        ymin = ax.get_ylim()[0]
        kept = [l["depth"] for l in layers if not l["quantized"] and l["numel"] >= 1024]
        if kept:
            ax.scatter(kept, [ymin] * len(kept), marker="|", s=80, color="#888888", label="kept (not quantized)",
                       zorder=2, clip_on=False)
        ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].legend(fontsize=7, loc="lower left", bbox_to_anchor=(0.0, 1.0), ncol=min(6, len(schemes) + 2),
                      frameon=False)
    axes[-1, 0].set_xlabel("depth (tensors in name order, numbers as numbers; ticks: blocks)", fontsize=8)
    _block_ticks(axes[-1, 0], layers)
    fig.suptitle("Error per layer against depth", fontsize=10, y=1.02)
    return _png(fig)


def heatmap_rows(d: Dict[str, Any]) -> Tuple[List[str], np.ndarray, bool]:
    """Rows (layers, or blocks past HEATMAP_LAYERS calibrated layers: each block's worst layer) x
    timestep groups of output relative error; and whether rows are blocks."""
    cal = [l for l in d["layers"] if l.get("output_error_groups")]
    ng = len(d["time_groups"]) or max((len(l["output_error_groups"]) for l in cal), default=0)
    if len(cal) <= HEATMAP_LAYERS:
        names = [l["name"] for l in cal]
        m = np.array([[np.nan if v is None else v for v in (l["output_error_groups"] + [None] * ng)[:ng]]
                      for l in cal], dtype=float)
        return names, m, False
    blocks: "OrderedDict[str, List[List[float]]]" = OrderedDict()
    for l in cal:
        blocks.setdefault(l["block"], []).append(
            [np.nan if v is None else v for v in (l["output_error_groups"] + [None] * ng)[:ng]])
    names = [block_label(b) for b in blocks]
    m = np.array([np.nanmax(np.array(v, dtype=float), axis=0) for v in blocks.values()], dtype=float)
    if len(names) > HEATMAP_LAYERS:  # still too many rows: consecutive blocks together, their worst
        k = math.ceil(len(names) / HEATMAP_LAYERS)
        chunks = range(0, len(names), k)
        m = np.array([np.nanmax(m[i:i + k], axis=0) for i in chunks], dtype=float)
        names = [names[i] if i + 1 >= min(len(names), i + k) else f"{names[i]} .. {names[min(len(names), i + k) - 1]}"
                 for i in chunks]
    return names, m, True


def worst_cells(d: Dict[str, Any], n: int = 5) -> List[Dict[str, Any]]:
    """The n (layer, group) cells of largest output error."""
    cells = []
    for l in d["layers"]:
        for g, v in enumerate(l.get("output_error_groups") or []):
            if v is not None:
                cells.append({"layer": l["name"], "group": g, "relative_error": v})
    cells.sort(key=lambda c: -c["relative_error"])
    return cells[:n]


def _group_label(d: Dict[str, Any], g: int) -> str:
    groups = d["time_groups"]
    if g < len(groups):
        lo, hi = groups[g]["step_lo"], groups[g]["step_hi"]
        fmt = (lambda v: f"{v:.2f}") if (d.get("step_kind") == "mask_ratio") else (lambda v: f"{v:.0f}")
        return f"{g}: {fmt(lo)}-{fmt(hi)}"
    return str(g)


def fig_heatmap(plt, d: Dict[str, Any]) -> str:
    names, m, blocks = heatmap_rows(d)
    fig, ax = plt.subplots(figsize=(min(11, 3 + 1.2 * m.shape[1]), max(2.5, 0.22 * len(names) + 1.2)))
    vals = m[np.isfinite(m)]
    from matplotlib.colors import LogNorm

    norm = LogNorm(vmin=max(vals.min(), 1e-6), vmax=max(vals.max(), 1e-6 * 1.01)) if vals.size else None
    im = ax.imshow(np.where(np.isfinite(m), m, np.nan), aspect="auto", cmap="magma_r", norm=norm,
                   interpolation="nearest")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels([n if len(n) <= 48 else "..." + n[-45:] for n in names], fontsize=6)
    ax.set_xticks(range(m.shape[1]))
    ax.set_xticklabels([_group_label(d, g) for g in range(m.shape[1])], fontsize=7, rotation=30, ha="right")
    ax.set_xlabel(("mask-ratio" if d.get("step_kind") == "mask_ratio" else "timestep") + " group", fontsize=8)
    # the worst cells, marked
    flat = [(m[i, j], i, j) for i in range(m.shape[0]) for j in range(m.shape[1]) if np.isfinite(m[i, j])]
    for rank, (_, i, j) in enumerate(sorted(flat, reverse=True)[:3]):
        ax.text(j, i, str(rank + 1), ha="center", va="center", fontsize=7, color="white", fontweight="bold")
    fig.colorbar(im, ax=ax, label="output relative error")
    ax.set_title("Output error per " + ("block (its worst layer)" if blocks else "layer") + " and timestep group "
                 "(1-3: the worst cells)", fontsize=10)
    return _png(fig)


def bits_views(d: Dict[str, Any]) -> Dict[str, Any]:
    """Stored bits per weight by block and by layer kind, and the model's total against its source
    and its budget."""
    def agg(key):
        acc: "OrderedDict[str, List[int]]" = OrderedDict()
        for l in d["layers"]:
            a = acc.setdefault(l[key], [0, 0])
            a[0] += l["stored_bytes"] * 8
            a[1] += l["numel"]
        return OrderedDict((k, {"bits_per_weight": b / n if n else 0.0, "weights": n}) for k, (b, n) in acc.items())

    total_bits = sum(l["stored_bytes"] * 8 for l in d["layers"])
    total_w = sum(l["numel"] for l in d["layers"])
    return {"by_block": agg("block"), "by_kind": agg("kind"),
            "model": total_bits / total_w if total_w else 0.0, "source": d["source_bits_per_weight"],
            "budget": d["budget_bits_per_weight"]}


def fig_bits(plt, d: Dict[str, Any]) -> str:
    v = bits_views(d)
    fig = plt.figure(figsize=(11, 6.2))
    gs = fig.add_gridspec(2, 3)
    ax = fig.add_subplot(gs[0, :])
    blocks = list(v["by_block"].items())
    x = np.arange(len(blocks))
    ax.bar(x, [b["bits_per_weight"] for _, b in blocks], color="#1f77b4", width=0.8)
    ax.axhline(v["model"], color="black", lw=1, ls="--", label=f"model {v['model']:.3f}")
    step = max(1, len(blocks) // 25)
    ax.set_xticks(x[::step])
    ax.set_xticklabels([block_label(k) for k, _ in blocks[::step]], fontsize=7,
                       rotation=45 if len(blocks[::step]) > 8 else 0, ha="right" if len(blocks[::step]) > 8 else "center")
    ax.set_ylabel("stored bits / weight", fontsize=8)
    ax.set_xlabel("block", fontsize=8)
    ax.legend(fontsize=7)
    ax.set_title("Where the bits went: by block", fontsize=10)
    ax2 = fig.add_subplot(gs[1, :2])
    kinds = sorted(v["by_kind"].items(), key=lambda kv: -kv[1]["weights"])
    y = np.arange(len(kinds))
    ax2.barh(y, [k["bits_per_weight"] for _, k in kinds], color="#ff7f0e")
    total = sum(k["weights"] for _, k in kinds) or 1
    ax2.set_yticks(y)
    ax2.set_yticklabels([f"{name} ({100 * k['weights'] / total:.1f}% of weights)" for name, k in kinds], fontsize=7)
    ax2.invert_yaxis()
    ax2.set_xlabel("stored bits / weight", fontsize=8)
    ax2.set_title("by layer kind", fontsize=9)
    ax3 = fig.add_subplot(gs[1, 2])
    bars = [("source", v["source"]), ("model", v["model"])]
    if v["budget"]:
        bars.append(("budget", v["budget"]))
    ax3.bar([b for b, _ in bars], [val for _, val in bars], color=["#7f7f7f", "#2ca02c", "#d62728"][:len(bars)])
    for i, (_, val) in enumerate(bars):
        ax3.text(i, val, f"{val:.2f}", ha="center", va="bottom", fontsize=7)
    ax3.set_ylabel("bits / weight", fontsize=8)
    ax3.set_title("the model's total", fontsize=9)
    fig.tight_layout()
    return _png(fig)


def fig_activations(plt, d: Dict[str, Any]) -> str:
    rows = d["activations"]
    groups = sorted({r["group"] for r in rows})
    per_group = [[r["clip_hi"] - r["clip_lo"] for r in rows if r["group"] == g] for g in groups]
    static = [p["clip_hi"] - p["clip_lo"] for p in d["activation_static"].values()]
    fig, ax = plt.subplots(figsize=(min(11, 3 + 1.3 * (len(groups) + 1)), 3.6))
    data = per_group + ([static] if static else [])
    labels = [_group_label(d, g) for g in groups] + (["static (all steps)"] if static else [])
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(range(1, len(labels) + 1))
    ax.set_xticklabels(labels, fontsize=7, rotation=20, ha="right")
    ax.set_yscale("log")
    bits = rows[0]["bits"] if rows else ""
    ax.set_ylabel(f"clip range (clip_hi - clip_lo), {bits}-bit inputs", fontsize=8)
    ax.set_title(f"Activation quantization ranges per timestep group across {len(d['activation_static']) or len(per_group[0])} "
                 f"layers, and the static set", fontsize=10)
    ax.grid(True, axis="y", alpha=0.3)
    return _png(fig)


# ---------------------------------------------------------------------------------------------
# the page
# ---------------------------------------------------------------------------------------------

_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px auto;max-width:1180px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;font-size:13px;margin:8px 0}td,th{border:1px solid #ddd;padding:3px 8px;text-align:left}
th{background:#f4f4f4}td.num{text-align:right;font-variant-numeric:tabular-nums}
.kv td:first-child{color:#555;white-space:nowrap}.fig{margin:10px 0}.fig img{max-width:100%}
.note{color:#555;font-size:13px}.bad{color:#b00020;font-weight:600}.ok{color:#1b5e20;font-weight:600}
code{background:#f4f4f4;padding:0 3px}
"""


def _e(v: Any) -> str:
    return html.escape(str(v))


def _fmt(v: Any, spec: str = ".4g") -> str:
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return "-"
    return format(v, spec)


def render(d: Dict[str, Any], figures: Dict[str, str]) -> str:
    s, m, cfg = d["summary"], d["manifest"], d["config"]
    layers = d["layers"]
    q = [l for l in layers if l["quantized"]]
    header = [
        ("source", f"{(m.get('source') or {}).get('path', '')} ({(m.get('source') or {}).get('layout', '')})"),
        ("output", d["quant_dir"]),
        ("modality", f"{m.get('modality')} ({m.get('modality_evidence')})"),
        ("profile", cfg.get("deployment_profile")),
        ("scheme", f"{cfg.get('scheme')}, bit_width {cfg.get('bit_width')}, group_size {cfg.get('group_size')}"
                   + (f", target {cfg.get('target_bits_per_weight')} bits/weight" if cfg.get("target_bits_per_weight")
                      else "")),
        ("calibration", "none (data-free)" if not d["calibration"] else
         f"{d['calibration'].get('samples')} samples, {len(d['time_groups'])} {d.get('step_kind') or 'timestep'} groups, "
         f"{d['calibration'].get('layers_gptq')} layers with GPTQ, activation bits "
         f"{d['calibration'].get('activation_bits') or '-'}"),
        ("producer", f"{m.get('producer')}, format version {m.get('format_version')}"),
        ("time", f"{d['quantization_time_s']:.1f} s" if d.get("quantization_time_s") is not None
         else "not recorded in the output (the report of quantize_diffusion_model(..., report=True) has it)"),
    ]
    numbers = [
        ("compression ratio", f"{s.get('compression_ratio', 0):.3f}x"),
        ("bits per weight", f"{s.get('bits_per_weight', 0):.3f} (quantized layers "
                            f"{s.get('quantized_bits_per_weight', 0):.3f}; source {d['source_bits_per_weight']:.1f})"),
        ("cosine similarity", f"mean {s.get('cosine_similarity', 0):.5f}, worst {s.get('min_cosine_similarity', 0):.5f} "
                              f"({s.get('worst_layer', '')})"),
        ("layers", f"{s.get('quantized_layers', 0)} quantized, {s.get('kept_layers', 0)} kept, "
                   f"{s.get('fallback_layers', 0)} fell back, {s.get('error_layers', 0)} errors"),
    ]
    parts = [f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'>"
             f"<title>ArrowQuant report: {_e(os.path.basename(d['quant_dir']))}</title><style>{_CSS}</style></head><body>",
             f"<h1>Quantization report: {_e(os.path.basename(d['quant_dir']))}</h1>",
             "<table class='kv'>" + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in header) + "</table>",
             "<h2>Summary</h2><table class='kv' id='summary'>"
             + "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in numbers) + "</table>"]
    v = d.get("validation")
    if v:
        state = "<span class='ok'>passed</span>" if v["passed"] else "<span class='bad'>failed</span>"
        match = ("every quantized layer's recomputed metrics equal the recorded ones" if not v["mismatched"]
                 else f"<span class='bad'>{len(v['mismatched'])} layers differ from what was recorded</span>")
        parts.append(f"<h2>Validated against the source</h2><p id='validation'>{_e(v['original'])}: {state} "
                     f"(mean cosine {v['cosine_similarity']:.5f}, worst {v['min_cosine_similarity']:.5f}, "
                     f"{v['seconds']:.1f} s); {match}; kept tensors differing from the source: "
                     f"{len(v['kept_differing'])}.</p>")
    parts.append("<h2>Error per layer</h2><div class='fig'><img id='fig-error' alt='error per layer against depth' "
                 f"src='data:image/png;base64,{figures['error']}'></div>"
                 "<p class='note'>Every stored tensor, blocks in numeric order; colour: its scheme or ggml type. Rings mark "
                 "layers whose bits the accuracy fallback raised, ticks on the axis the tensors kept unquantized.</p>")
    if "heatmap" in figures:
        cells = worst_cells(d)
        parts.append("<h2>Output error per timestep group</h2><div class='fig'><img id='fig-heatmap' "
                     f"alt='output error heatmap' src='data:image/png;base64,{figures['heatmap']}'></div>"
                     "<table id='worst-cells'><tr><th>#</th><th>layer</th><th>group</th><th>output relative error</th></tr>"
                     + "".join(f"<tr><td>{i + 1}</td><td>{_e(c['layer'])}</td><td>{_e(_group_label(d, c['group']))}</td>"
                               f"<td class='num'>{c['relative_error']:.4g}</td></tr>" for i, c in enumerate(cells))
                     + "</table><p class='note'>Output error ||(W - Q) x|| / ||W x|| on each group's held-out inputs "
                     "(the engine's check of every calibrated layer).</p>")
    bv = bits_views(d)
    parts.append("<h2>Where the bits went</h2><div class='fig'><img id='fig-bits' alt='bits per weight by block and kind' "
                 f"src='data:image/png;base64,{figures['bits']}'></div>"
                 "<table id='bits-by-kind'><tr><th>layer kind</th><th>weights</th><th>stored bits / weight</th></tr>"
                 + "".join(f"<tr><td>{_e(k)}</td><td class='num'>{b['weights']:,}</td>"
                           f"<td class='num'>{b['bits_per_weight']:.3f}</td></tr>"
                           for k, b in sorted(bv["by_kind"].items(), key=lambda kv: -kv[1]["weights"]))
                 + f"<tr><th>model</th><th class='num'>{sum(l['numel'] for l in layers):,}</th>"
                   f"<th class='num'>{bv['model']:.3f}</th></tr></table>")
    if "activations" in figures:
        parts.append("<h2>Activation parameters</h2><div class='fig'><img id='fig-activations' alt='activation ranges' "
                     f"src='data:image/png;base64,{figures['activations']}'></div><p class='note'>Each layer's input "
                     "range per timestep group (activations.parquet, what a W8A8 / W4A8 runtime uses at that step) "
                     "against the one static set fitted on the whole trajectory.</p>")
    worst = sorted(q, key=lambda l: -(l.get("output_error") or l.get("relative_error") or 0))[:WORST_ROWS]
    parts.append(f"<h2>The {len(worst)} worst layers</h2><table id='worst-layers'><tr><th>layer</th><th>scheme</th>"
                 "<th>weight rel. error</th><th>output rel. error (worst group)</th><th>bits / weight</th>"
                 "<th>fallback</th><th>why</th></tr>"
                 + "".join(f"<tr><td>{_e(l['name'])}</td><td>{_e(l['scheme'])}</td>"
                           f"<td class='num'>{_fmt(l.get('relative_error'))}</td>"
                           f"<td class='num'>{_fmt(l.get('output_error'))}</td>"
                           f"<td class='num'>{8 * l['stored_bytes'] / max(1, l['numel']):.3f}</td>"
                           f"<td>{_e(', '.join(map(str, l['fallback'])) or '-')}</td><td>{_e(l['reason'])}</td></tr>"
                           for l in worst) + "</table>")
    embedded = {k: v for k, v in d.items() if k not in ("layers", "activations")}
    embedded.update(layer_count=len(layers), activation_rows=len(d["activations"]),
                    activation_layers=sorted({r["layer"] for r in d["activations"]}))
    data = json.dumps(embedded, default=str)
    data = data.replace("</", "<\\/")  # never closes the script element early
    parts.append(f"<script type='application/json' id='report-data'>{data}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


def report(quant_dir: Any, out_path: Any = None, against: Any = None, figures_dir: Any = None,
           result: Optional[Dict[str, Any]] = None) -> str:
    """Writes the HTML report of the quantized model at ``quant_dir`` to ``out_path`` (default:
    ``<quant_dir>.report.html`` beside it) and returns its path. ``against``: the source model, to
    recompute every layer's error from the files (validate_quality) and say whether it matches
    what was recorded. ``figures_dir``: also write each figure there as a PNG. ``result``: the
    dict quantize_diffusion_model returned, for the time."""
    plt = _require_matplotlib()
    t = time.perf_counter()
    quant_dir = os.path.abspath(os.fspath(quant_dir))
    d = collect(quant_dir, None if against is None else os.fspath(against), result)
    if not d["layers"]:
        raise ModelFormatError(f"{quant_dir}: the model holds no tensors")
    figures = {"error": fig_error_depth(plt, d), "bits": fig_bits(plt, d)}
    if d["calibrated"]:
        figures["heatmap"] = fig_heatmap(plt, d)
    if d["activations"]:
        figures["activations"] = fig_activations(plt, d)
    page = render(d, figures)
    out_path = os.fspath(out_path) if out_path is not None else quant_dir.rstrip(os.sep) + ".report.html"
    tmp = out_path + ".part"
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(page)
    os.replace(tmp, out_path)
    if figures_dir is not None:
        os.makedirs(figures_dir, exist_ok=True)
        for name, b64 in figures.items():
            with open(os.path.join(figures_dir, f"{name}.png"), "wb") as f:
                f.write(base64.b64decode(b64))
    d["seconds"] = time.perf_counter() - t
    return out_path


__all__ = ["report", "collect", "bits_views", "heatmap_rows", "worst_cells", "load_layers"]
