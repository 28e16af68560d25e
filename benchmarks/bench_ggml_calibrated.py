"""ggml block types with calibration, judged on trained diffusion models wide enough for K-quants.

The trained models of bench_diffusion.py have 128-wide rows, which K-quants cannot take (a row must
be a multiple of 256 weights). This benchmark trains the same two models at width 256 with the same
script (`benchmarks/trained/train.py`, `--set cfg.hidden_size=256`; the MDLM also with
`cfg.intermediate_size=768`; about 10 and 25 minutes on one thread, done once and kept under
`--wide-dir`), records calibration along sampling trajectories on other seeds exactly as
bench_diffusion.py does, and compares, per ggml type, on the same layers with the same types:

  llama            llama.cpp's encoder (`ggml_quantize_chunk` through ggml-python), data-free
  llama+imatrix    the same given an importance matrix computed from the same calibration file,
                   as llama-imatrix does: mean x^2 per input column over every recorded (fit)
                   input of the layer, all timesteps pooled
  ours             ArrowQuant, data-free (scheme=TYPE, enable_time_aware=False), with its default
                   ggml_weighting="llama" (each type's own llama.cpp error weights); also with
                   ggml_weighting="plain" (plain squared error), weight error's optimum
  ours+cal         ArrowQuant with the calibration: GPTQ on the type's grid, each block's scales
                   from the importance-weighted search, Hessian summed over 10 timestep groups

In the per-type tables both sides quantize the same layers with the same type per layer (the layers our plan quantizes;
sensitive layers and rows that are not a multiple of 256 take the types our plan gives them, e.g.
Q8_0 for the adaLN projections, and llama.cpp gets those same types), so the bytes per layer are
equal. Figures: the denoiser's output relative error per timestep group (mask-ratio group for the
LM) along the full-precision model's own sampling trajectory, as in bench_diffusion.py, and
generation quality (digits: same-seed PSNR, class accuracy and FD of 200 DDIM-50 samples; text:
per-step KL, argmax agreement, same-seed token agreement).

Model budgets (`--budgets`): llama.cpp's own recipes (Q2_K, Q3_K_M, Q4_K_M, Q8_0 mixes), applied
to every quantized layer of these models by its tensor-name rules (`llama_recipe`; the adaLN and
embedder projections take the base type, as llama.cpp has no rule for them), with the imatrix,
against our model budget at the recipe's measured bits per weight (target_bits_per_weight, with
the calibration).

    python benchmarks/bench_ggml_calibrated.py [--models digits text] [--types q4_k q3_k q2_k]
        [--budgets q2_k q4_k_m q8_0] [--wide-dir benchmarks/trained/wide256]
"""

from __future__ import annotations

import argparse
import ctypes
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "trained"))
import models as M  # noqa: E402
import bench_diffusion as BD  # noqa: E402

import arrow_quant_v2 as aq  # noqa: E402
from arrow_quant_v2.calibration import load_calibration  # noqa: E402

WIDTH = 256
TRAIN_SETS = {
    "digits": ["--set", f"cfg.hidden_size={WIDTH}"],
    "text": ["--set", f"cfg.hidden_size={WIDTH}", "--set", f"cfg.intermediate_size={3 * WIDTH}"],
}
SUBDIR = {"digits": "digits_dit", "text": "text_mdlm"}
COMMON = dict(enable_fallback=False, min_accuracy=0.0, overwrite=True, enable_spatial=False)


def ensure_wide(what: str, wide_dir: str) -> str:
    """The width-256 model (trained by train.py into wide_dir on first use)."""
    path = os.path.join(wide_dir, SUBDIR[what])
    if not os.path.exists(os.path.join(path, "model.safetensors")):
        print(f"training the width-{WIDTH} {what} model into {wide_dir} (once; train.py, one thread)...",
              file=sys.stderr, flush=True)
        subprocess.run([sys.executable, os.path.join(HERE, "trained", "train.py"), what, "--out", wide_dir]
                       + TRAIN_SETS[what], check=True)
    return path


def task_for(what: str, src: str):
    base = BD.Digits if what == "digits" else BD.Text

    class Wide(base):  # type: ignore[misc, valid-type]
        name = f"{base.name} (width {WIDTH})"

    Wide.src = src
    return Wide(200, 50) if what == "digits" else Wide(64, 32)


# ---- llama.cpp's side ------------------------------------------------------------------------

class Llama:
    def __init__(self) -> None:
        import ggml

        self.g = ggml

    def gtype(self, t: str) -> int:
        return getattr(self.g, "GGML_TYPE_" + t.upper())

    def roundtrip(self, t: str, W: np.ndarray, imatrix: Optional[np.ndarray]) -> np.ndarray:
        """ggml_quantize_chunk then ggml's own to_float: the weight llama.cpp's runtime computes with."""
        W = np.ascontiguousarray(W, dtype=np.float32)
        rows, cols = W.shape
        gt = self.gtype(t)
        buf = (ctypes.c_uint8 * (int(self.g.ggml_row_size(gt, cols)) * rows))()
        ip = None
        if imatrix is not None:
            imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
            ip = imatrix.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.g.ggml_quantize_chunk(gt, W.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                   ctypes.c_void_p(ctypes.addressof(buf)), 0, rows, cols, ip)
        out = np.empty_like(W)
        self.g.ggml_get_type_traits(gt).contents.to_float(ctypes.c_void_p(ctypes.addressof(buf)),
                                                          out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)
        return out


def imatrices(calibration_path: str) -> Dict[str, np.ndarray]:
    """llama-imatrix's statistic from our calibration file: mean x^2 per input column over the
    fit inputs of every timestep bin (diag of sum_b X_b^T X_b / sum_b rows_b)."""
    cal = load_calibration(calibration_path)
    acc: Dict[str, Tuple[np.ndarray, int]] = {}
    for (layer, _b, split), e in cal.items():
        if split != "fit" or e.get("hessian") is None or not e["rows"]:
            continue
        d = np.diag(e["hessian"]).copy()
        s, n = acc.get(layer, (np.zeros_like(d), 0))
        acc[layer] = (s + d, n + int(e["rows"]))
    return {k: (s / max(n, 1)).astype(np.float32) for k, (s, n) in acc.items()}


def llama_state(src_state: Dict[str, np.ndarray], types: Dict[str, str], llama: Llama,
                imat: Optional[Dict[str, np.ndarray]]) -> Dict[str, np.ndarray]:
    out = dict(src_state)
    for name, t in types.items():
        W = src_state[name]
        W2 = W.reshape(W.shape[0], -1).astype(np.float32)
        v = None if imat is None else imat.get(name)  # calibration layers are named by their weight
        out[name] = llama.roundtrip(t, W2, v).reshape(W.shape)
    return out


# llama.cpp's per-tensor rules (llama_tensor_get_type in llama-quant.cpp) for the recipes used here,
# mapped by role: a fused attention qkv (attn_qkv), the attention output (attn_output), the MLP
# down projection (ffn_down), the model's output projection (output), the rest of the block
# linears (the base type). use_more_bits: the first and last eighth of the layers and every third
# one in between.
def use_more_bits(i: int, n: int) -> bool:
    return i < n // 8 or i >= 7 * n // 8 or (i - n // 8) % 3 == 2


def role(name: str) -> str:
    if any(k in name for k in ("attn.qkv",)):
        return "attn_qkv"
    if any(k in name for k in ("attn.proj",)):
        return "attn_output"
    if any(k in name for k in ("mlp.fc2", "mlp.down_proj")):
        return "ffn_down"
    if any(k in name for k in ("final_layer.linear", "lm_head")):
        return "output"
    return "base"


def layer_index(name: str) -> int:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:]):
        if a == "blocks" and b.isdigit():
            return int(b)
    return -1


def llama_recipe(recipe: str, name: str, n_layers: int, planned: str, row_fallback: bool) -> str:
    """The type llama.cpp's recipe gives this tensor. It has no notion of our sensitive layers
    (adaLN, embedders): they take its rules like any other tensor. `planned` is our plan's type for
    a row length the K types cannot take (`row_fallback`), kept."""
    r, i = role(name), layer_index(name)
    if row_fallback:
        return planned
    if recipe == "q8_0":
        return "q8_0"
    if r == "output":
        return "q6_k"
    if recipe == "q2_k":
        return {"attn_output": "q3_k", "ffn_down": "q3_k"}.get(r, "q2_k")
    if recipe == "q3_k_m":
        if r == "attn_qkv" or r == "attn_output":
            return "q4_k"
        if r == "ffn_down":
            return "q5_k" if i < n_layers // 16 else ("q4_k" if use_more_bits(i, n_layers) else "q3_k")
        return "q3_k"
    # Q4_K_M / Q5_K_M: a fused qkv one type up, ffn_down of the use_more_bits layers at Q6_K
    base = RECIPE_BASE[recipe]
    if r == "attn_qkv":
        return {"q4_k": "q5_k", "q5_k": "q6_k"}[base]
    if r == "ffn_down" and use_more_bits(i, n_layers):
        return "q6_k"
    return base


RECIPE_BASE = {"q2_k": "q2_k", "q3_k_m": "q3_k", "q4_k_m": "q4_k", "q5_k_m": "q5_k", "q8_0": "q8_0"}
# bits per weight of each type (ggml's block bytes x 8 / block length)
BPW = {"q8_0": 8.5, "q6_k": 6.5625, "q5_k": 5.5, "q4_k": 4.5, "q3_k": 3.4375, "q2_k": 2.625,
       "iq4_xs": 4.25, "iq4_nl": 4.5}


# ---- running ---------------------------------------------------------------------------------

def fmt(v: float, nd: int = 4) -> str:
    return "inf" if v == float("inf") else f"{v:.{nd}f}"


def quantize(model_dir: str, out: str, **cfg: Any) -> Tuple[Dict[str, Any], Any]:
    r = aq.ArrowQuantV2().quantize_diffusion_model(model_dir, out, aq.DiffusionQuantConfig(**{**COMMON, **cfg}))
    return r, aq.load(out)


def layer_types(r: Dict[str, Any]) -> Dict[str, str]:
    return {l["tensor"]: l["scheme"] for l in r["layers"] if l.get("quantized")}


def bits_per_weight(types: Dict[str, str], shapes: Dict[str, Tuple[int, ...]]) -> float:
    w = sum(int(np.prod(shapes[n])) for n in types)
    return sum(BPW[t] * int(np.prod(shapes[n])) for n, t in types.items()) / w


def evaluate(task, state: Dict[str, np.ndarray], quality: bool) -> Dict[str, Any]:
    model = task.load(state)
    errs = BD.output_error_per_group(task, model)
    out: Dict[str, Any] = {"errors": errs, "worst": max(errs), "mean": float(np.mean(errs))}
    if quality:
        out["quality"] = task.quality(model)
    return out


def run(task, what: str, types: List[str], budgets: List[str], work: str, quality_types: List[str]) -> List[str]:
    lines: List[str] = []
    model_dir = os.path.join(work, "model")
    shutil.copytree(task.src, model_dir)
    t0 = time.perf_counter()
    task.calibrate(model_dir, 128)
    cal_path = os.path.join(model_dir, "calibration.parquet")
    imat = imatrices(cal_path)
    lines.append(f"Calibration: 128-sample cap, 2 sampling runs on other seeds, {BD.GROUPS} {task.step_kind} bins "
                 f"({time.perf_counter() - t0:.1f} s); llama.cpp's imatrix from the same file ({len(imat)} layers).\n")
    src_state = {k: v.numpy() for k, v in task.fp.state_dict().items()}
    shapes = {k: tuple(v.shape) for k, v in src_state.items()}
    llama = Llama()
    cols = task.quality_columns()
    G = BD.GROUPS

    head = ("| type | method | bits/weight | " + " | ".join(f"g{g}" for g in range(G)) + " | worst | mean | "
            + " | ".join(c[1] for c in cols) + " |")
    lines += [f"### {task.name}: denoiser output relative error per {task.step_kind} group\n",
              f"Groups are tenths of the {task.step_kind} range {task.step_range} (g0 = least noise). Quality "
              f"columns for the types {', '.join(quality_types)} only.\n", head, "|" + "---|" * (head.count("|") - 1)]
    ref = task.reference_quality()
    lines.append("| - | full precision | 32 | " + " | ".join("0" for _ in range(G)) + " | 0 | 0 | "
                 + " | ".join(fmt(ref[c[0]]) for c in cols) + " |")
    ratios: List[str] = []

    def row(t: str, label: str, bpw: float, ev: Dict[str, Any]) -> None:
        q = ev.get("quality")
        lines.append(f"| {t} | {label} | {bpw:.3f} | " + " | ".join(fmt(e) for e in ev["errors"])
                     + f" | {fmt(ev['worst'])} | {fmt(ev['mean'])} | "
                     + " | ".join(fmt(q[c[0]]) if q else "" for c in cols) + " |")
        print(f"  {task.name} {t} {label}: worst {ev['worst']:.4f} mean {ev['mean']:.4f} {q or ''}",
              file=sys.stderr, flush=True)

    for t in types:
        qual = t in quality_types
        r_df, qm_df = quantize(model_dir, os.path.join(work, f"{t}-df"), scheme=t, enable_time_aware=False)
        plan = layer_types(r_df)
        bpw = bits_per_weight(plan, shapes)
        ev = {"llama": evaluate(task, llama_state(src_state, plan, llama, None), qual),
              "llama+imatrix": evaluate(task, llama_state(src_state, plan, llama, imat), qual),
              "ours": evaluate(task, qm_df.state_dict(), qual)}
        _, qm_pl = quantize(model_dir, os.path.join(work, f"{t}-plain"), scheme=t, enable_time_aware=False,
                            ggml_weighting="plain")
        ev["ours, plain error"] = evaluate(task, qm_pl.state_dict(), False)
        r_cal, qm_cal = quantize(model_dir, os.path.join(work, f"{t}-cal"), scheme=t, num_time_groups=BD.GROUPS)
        if layer_types(r_cal) != plan:
            raise RuntimeError(f"{t}: the calibrated plan's types differ from the data-free plan's")
        ev["ours+cal"] = evaluate(task, qm_cal.state_dict(), qual)
        for label in ("llama", "llama+imatrix", "ours, plain error", "ours", "ours+cal"):
            row(t, label, bpw, ev[label])
        a, b = ev["ours+cal"], ev["llama+imatrix"]
        c, d = ev["ours"], ev["llama"]
        ratios.append(f"| {t} | {bpw:.3f} | {a['mean'] / b['mean']:.3f} | {a['worst'] / b['worst']:.3f} | "
                      f"{c['mean'] / d['mean']:.3f} | {c['worst'] / d['worst']:.3f} |")
    lines.append("")
    lines += [f"#### {task.name}: ratios (< 1: ours is closer to full precision)\n",
              "| type | bits/weight | ours+cal / llama+imatrix, mean | worst group | ours / llama (data-free), mean | worst group |",
              "|---|---|---|---|---|---|"] + ratios + [""]

    if budgets:
        n_layers = 1 + max(layer_index(n) for n in shapes)
        lines += [f"#### {task.name}: model budgets, llama.cpp's recipe against our budget at the recipe's bits\n",
                  "| recipe | llama types | bits/weight | llama+imatrix mean | worst | ours budget types | bits/weight | "
                  "ours+cal mean | worst | ratio mean | ratio worst |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for recipe in budgets:
            base = RECIPE_BASE[recipe]
            r0, _ = quantize(model_dir, os.path.join(work, f"plan-{recipe}"), scheme=base, enable_time_aware=False)
            plan = {l["tensor"]: llama_recipe(recipe, l["tensor"], n_layers, l["scheme"], "needs rows" in l["reason"])
                    for l in r0["layers"] if l.get("quantized")}
            bpw = bits_per_weight(plan, shapes)
            ev_l = evaluate(task, llama_state(src_state, plan, llama, imat), False)
            r_b, qm_b = quantize(model_dir, os.path.join(work, f"budget-{recipe}"), scheme=base,
                                 num_time_groups=BD.GROUPS, target_bits_per_weight=round(bpw, 4))
            ours_types = layer_types(r_b)
            bpw_o = bits_per_weight(ours_types, shapes)
            ev_o = evaluate(task, qm_b.state_dict(), False)

            def mix(p: Dict[str, str]) -> str:
                c: Dict[str, int] = {}
                for t in p.values():
                    c[t] = c.get(t, 0) + 1
                return ", ".join(f"{k} {v}" for k, v in sorted(c.items(), key=lambda kv: -BPW[kv[0]]))

            lines.append(f"| {recipe} | {mix(plan)} | {bpw:.3f} | {fmt(ev_l['mean'])} | {fmt(ev_l['worst'])} | "
                         f"{mix(ours_types)} | {bpw_o:.3f} | {fmt(ev_o['mean'])} | {fmt(ev_o['worst'])} | "
                         f"{ev_o['mean'] / ev_l['mean']:.3f} | {ev_o['worst'] / ev_l['worst']:.3f} |")
            print(f"  {task.name} budget {recipe}: llama {ev_l['mean']:.4f} ours {ev_o['mean']:.4f} "
                  f"({bpw:.3f} / {bpw_o:.3f} bpw)", file=sys.stderr, flush=True)
        lines.append("")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["digits", "text"], choices=["digits", "text"])
    p.add_argument("--types", nargs="*", default=["q6_k", "q4_k", "q3_k", "q2_k", "iq4_xs"])
    p.add_argument("--quality-types", nargs="*", default=["q4_k", "q3_k", "q2_k"])
    p.add_argument("--budgets", nargs="*", default=["q2_k", "q4_k_m", "q8_0"],
                   choices=["q2_k", "q3_k_m", "q4_k_m", "q5_k_m", "q8_0"])
    p.add_argument("--wide-dir", default=os.path.join(HERE, "trained", f"wide{WIDTH}"))
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}\n")
    for what in a.models:
        task = task_for(what, ensure_wide(what, a.wide_dir))
        with tempfile.TemporaryDirectory(prefix="aq-ggml-cal-") as work:
            lines = run(task, what, a.types, a.budgets, work, a.quality_types)
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
