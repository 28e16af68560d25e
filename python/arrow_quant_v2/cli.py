"""The ``arrowquant`` command line.

    arrowquant quantize MODEL OUT [--profile edge|local|cloud] [--bits N] [--group-size N] ...
    arrowquant validate ORIGINAL QUANTIZED
    arrowquant inspect PATH            (a quantized model, or a source model)
    arrowquant demo [--out DIR]        (the built-in default model, every profile)
    arrowquant generate-demo DIR       (write the built-in default model only)

A progress bar with ETA on a terminal, plain lines otherwise; ``--json`` prints the result as JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

from . import _core
from ._progress import ProgressAdapter, TerminateAsInterrupt, format_eta
from .api import ArrowQuantV2, run_quantize
from .config import BIT_WIDTHS, GGML_TYPES, GROUP_SIZES, MODALITIES, PROFILES, SCHEMES, DiffusionQuantConfig
from .errors import ArrowQuantError, ConfigurationError


class _Progress:
    """Raw progress events from the core -> a tqdm bar (terminal) or a line every 10 layers or
    5 seconds (logs)."""

    def __init__(self, enabled: bool, verb: str) -> None:
        self.enabled = enabled
        self.verb = verb
        self.tty = enabled and sys.stderr.isatty()
        self.bar = None
        self.plain = ProgressAdapter(lambda m, p: print(m, file=sys.stderr, flush=True), verb)
        self.last_plain = (-10, 0.0)

    def __call__(self, done: int, total: int, wdone: int, wtotal: int, elapsed: float, eta: float, current: str) -> bool:
        if not self.enabled:
            return False
        if not self.tty:
            n, t = self.last_plain
            if done - n >= 10 or time.monotonic() - t >= 5.0 or current == "done":
                self.last_plain = (done, time.monotonic())
                return self.plain(done, total, wdone, wtotal, elapsed, eta, current)
            return False
        from tqdm import tqdm

        if self.bar is None:
            self.bar = tqdm(total=total, unit="layer", desc=self.verb, file=sys.stderr, dynamic_ncols=True)
        self.bar.n = done
        if current != "done":
            self.bar.set_postfix_str(f"{100 * wdone / max(1, wtotal):.0f}% weights, ETA {format_eta(eta)}: "
                                     f"{current[-40:]}", refresh=False)
        self.bar.refresh()
        return False

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _config_from_args(a: argparse.Namespace) -> DiffusionQuantConfig:
    fields: Dict[str, Any] = {}
    if a.profile:
        fields["deployment_profile"] = a.profile
    for name in ("scheme", "bit_width", "group_size", "min_accuracy", "num_threads", "modality", "sensitive_bit_width",
                 "min_tensor_size", "scale_method", "nonfinite"):
        v = getattr(a, name)
        if v is not None:
            fields[name] = v
    if a.symmetric is not None:
        fields["symmetric"] = a.symmetric
    if a.components:
        fields["components"] = a.components
    if a.skip:
        fields["skip_patterns"] = a.skip
    if a.override:
        overrides = {}
        for item in a.override:
            pattern, sep, bits = item.rpartition("=")
            if not sep or not bits.isdigit():
                raise SystemExit(f"--override expects PATTERN=BITS, got {item!r}")
            overrides[pattern] = int(bits)
        fields["bit_overrides"] = overrides
    if a.no_fallback:
        fields["enable_fallback"] = False
    if a.fail_fast:
        fields["fail_fast"] = True
    if a.overwrite:
        fields["overwrite"] = True
    if a.calibration:
        fields["calibration_path"] = a.calibration
    if a.time_groups is not None:
        fields["num_time_groups"] = a.time_groups
    if a.no_time_aware:
        fields["enable_time_aware"] = False
    return DiffusionQuantConfig(**fields)


def _quantize(model: str, out: str, config: DiffusionQuantConfig, show_progress: bool,
              resume: bool = False, cluster: Optional[str] = None) -> Dict[str, Any]:
    progress = _Progress(show_progress, "Quantizing")
    try:
        if cluster is None:
            with TerminateAsInterrupt():
                report = json.loads(_core.quantize_model(model, out, config._engine_json(), progress, 1, 0.5, resume))
        else:
            report = run_quantize(model, out, config, progress, resume, cluster)
    finally:
        progress.close()
    report["deployment_profile"] = config.deployment_profile
    return report


def _print_quantize_summary(r: Dict[str, Any]) -> None:
    print(f"Quantized {r['source_path']} -> {r['quantized_path']}")
    print(f"  modality            {r['modality']}  ({r['modality_evidence']})")
    print(f"  layers              {r['quantized_layers']} quantized, {r['kept_layers']} kept, "
          f"{r['fallback_layers']} fell back, {r['error_layers']} errors")
    print(f"  bits per weight     {r['bits_per_weight']:.3f} (quantized layers {r['quantized_bits_per_weight']:.3f})")
    print(f"  compression         {r['compression_ratio']:.2f}x  ({r['source_weight_bytes'] / 2**20:.1f} MiB -> "
          f"{r['quantized_weight_bytes'] / 2**20:.1f} MiB of weights; directory {r['model_size_mb']:.1f} MiB)")
    print(f"  cosine similarity   mean {r['cosine_similarity']:.5f}, worst {r['min_cosine_similarity']:.5f} "
          f"({r['worst_layer']})")
    print(f"  time                {r['quantization_time_s']:.2f} s on {r['num_threads']} threads")
    c = r.get("cluster")
    if c:
        print(f"  cluster             Ray ({c['address']}): {c['parts']} parts on {c['workers']} workers of "
              f"{c['nodes']} nodes; {c['tensors_from_parts']} tensors from parts, {c['tensors_by_driver']} by the "
              f"driver")
    resume = r.get("resume") or {}
    if resume.get("resumed_from"):
        print(f"  resumed             {resume['tensors']} tensors from {resume['resumed_from']}")
    elif resume.get("requested") and resume.get("reason"):
        print(f"  resume              {resume['reason']}")
    for key in ("time_aware", "spatial"):
        if r[key]["requested"] and not r[key]["applied"]:
            print(f"  {key.replace('_', '-')} pass   not applied: {r[key]['reason']}")
        elif r[key]["applied"]:
            print(f"  {key.replace('_', '-')} pass   {r[key]['reason']}")
    for e in r["errors"]:
        print(f"  error               {e['name']}: {e['error']}")
    for w in r.get("warnings", []):
        print(f"  warning             {w}")
    if r.get("report_path"):
        print(f"  report              {r['report_path']}")


def cmd_quantize(a: argparse.Namespace) -> int:
    config = _config_from_args(a)
    if a.report:
        from .quality_report import _require_matplotlib

        _require_matplotlib()
    r = _quantize(a.model, a.output, config, not a.quiet and not a.json, resume=a.resume, cluster=a.ray)
    if a.report:
        from .quality_report import report

        r["report_path"] = report(r["quantized_path"], result=r)
    if a.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        _print_quantize_summary(r)
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from .export import export_compressed_tensors, export_gguf

    if a.to == "compressed-tensors":
        if a.requantize or a.arch or a.packed_convs:
            raise ConfigurationError("--requantize, --arch and --packed-convs apply to --to gguf")
        r = export_compressed_tensors(a.path, a.output, component=a.component, overwrite=a.overwrite)
        if a.json:
            json.dump(r, sys.stdout, indent=2)
            print()
        else:
            groups = ", ".join(f"{n} {k}" for k, n in sorted(r["groups"].items()))
            print(f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB, {r['packed']} packed layers: {groups}) "
                  f"in {r['seconds']:.1f} s")
        return 0
    r = export_gguf(a.path, a.output, component=a.component, requantize=a.requantize, overwrite=a.overwrite,
                    arch=a.arch, packed_convs=a.packed_convs)
    if a.json:
        json.dump(r, sys.stdout, indent=2)
        print()
        return 0
    types = ", ".join(f"{n} {t}" for t, n in sorted(r["types"].items()))
    print(f"wrote {r['path']} ({r['bytes'] / 1e6:.1f} MB, {r['tensors']} tensors: {types}) in {r['seconds']:.1f} s")
    print(f"  {r['copied']} ggml layers written as stored", end="")
    if r["requantized"]:
        print(f"; {len(r['requantized'])} requantized to {a.requantize}", end="")
    if r["dequantized"]:
        print(f"; {len(r['dequantized'])} convolution weights written as F16", end="")
    print()
    if r["config_dir"]:
        print(f"  diffusers: Model.from_single_file({r['path']!r}, config={r['config_dir']!r}, "
              f"quantization_config=GGUFQuantizationConfig(compute_dtype=...))")
    return 0


def cmd_validate(a: argparse.Namespace) -> int:
    r = ArrowQuantV2().validate_quality(a.original, a.quantized, num_threads=a.num_threads or 0)
    if a.json:
        json.dump(r, sys.stdout, indent=2)
        print()
    else:
        print(f"Validated {a.quantized} against {a.original}")
        print(f"  cosine similarity   mean {r['cosine_similarity']:.5f}, worst {r['min_cosine_similarity']:.5f} "
              f"over {r['quantized_layers']} quantized layers")
        print(f"  compression         {r['compression_ratio']:.2f}x")
        print(f"  min_accuracy        {r['min_accuracy']}")
        for f in r["failures"]:
            print(f"  FAIL                {f['name']}: {f['reason']}")
        print(f"  result              {'PASSED' if r['passed'] else 'FAILED'}")
    return 0 if r["passed"] else 1


def _table(rows: List[List[str]], header: List[str]) -> str:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows)]
    lines = ["  ".join(str(h).ljust(w) for h, w in zip(header, widths))]
    lines.append("  ".join("-" * w for w in widths))
    for r in rows:
        lines.append("  ".join(str(x).ljust(w) for x, w in zip(r, widths)))
    return "\n".join(lines)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _numel(shape: List[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def cmd_inspect(a: argparse.Namespace) -> int:
    if not os.path.exists(os.path.join(a.path, "manifest.json")):
        info = json.loads(_core.describe_model(a.path, a.components or []))
        if a.json:
            json.dump(info, sys.stdout, indent=2)
            print()
            return 0
        print(f"{info['root']}: {info['layout']} model, modality {info['modality']} ({info['modality_evidence']})")
        for c in info["components"]:
            n = sum(1 for _ in c["tensors"])
            size = sum(t["nbytes"] for t in c["tensors"])
            print(f"  component {c['name'] or '(model)'}: {'quantize' if c['selected'] else 'copy'}; "
                  + (f"{n} tensors, {_size(size)}" if c["selected"] else f"{len(c['weight_files'])} weight file(s)"))
        return 0
    from .loader import load

    model = load(a.path)
    m = model.manifest
    infos = []
    for name in model.tensor_names():
        t = model[name]
        infos.append(dict(t.info, name=name))
    if a.json:
        json.dump({"manifest": m, "tensors": infos}, sys.stdout, indent=2)
        print()
        return 0
    s = m["summary"]
    print(f"{a.path}: ArrowQuant format {m['format_version']}, from {m['source']['path']} ({m['source']['layout']})")
    print(f"  modality {m['modality']}; {s['quantized_layers']} layers quantized, {s['kept_layers']} kept; "
          f"{s['bits_per_weight']:.3f} bits/weight; {s['compression_ratio']:.2f}x; "
          f"cosine mean {s['cosine_similarity']:.5f}, worst {s['min_cosine_similarity']:.5f}")
    rows = []
    for t in infos:
        if not a.all and not t["quantized"] and t["source_bytes"] < 4096:
            continue
        rows.append([
            t["name"], "x".join(map(str, t["shape"])), t["dtype"],
            t.get("scheme", "raw"),
            f"{8 * t['stored_bytes'] / max(1, _numel(t['shape'])):.2f}" if t["quantized"] else "-",
            _size(t["stored_bytes"]),
            f"{t['cosine_similarity']:.5f}" if t["quantized"] else "-",
            t["reason"] + (f" (rejected {t['rejected_bits']})" if t["rejected_bits"] else ""),
        ])
    print(_table(rows, ["layer", "shape", "source", "scheme", "bits/w", "stored", "cosine", "why"]))
    hidden = len(infos) - len(rows)
    if hidden:
        print(f"({hidden} small kept tensors not shown; --all shows them)")
    _print_output_errors(m)
    return 0


def _print_output_errors(m: Dict[str, Any]) -> None:
    """The per-timestep-group output errors recorded when the model was quantized with calibration."""
    data = (m.get("calibration") or {}).get("data")
    if not data:
        return
    groups = data["time_groups"]
    kind = data["step_kind"]
    print(f"\nCalibration {data['path']}: {data['samples']} samples, {len(groups)} {kind} groups "
          + ", ".join(f"g{i}=[{g['step_lo']:g}, {g['step_hi']:g})" for i, g in enumerate(groups)))
    print(f"  {data['layers_calibrated']} layers calibrated, {data['layers_gptq']} by GPTQ, "
          f"{data.get('layers_equalized', 0)} channel-equalized. "
          "Output relative error ||W x - Q x|| / ||W x|| per group (held-out inputs):")
    rows = []
    with_act = []
    for name, e in data["output_error"].items():
        per = {g["group"]: g["relative_error"] for g in e["groups"]}
        alpha = e.get("equalization_alpha")
        rows.append([name, e["method"], "-" if alpha is None else f"{alpha:g}"]
                    + [f"{per[i]:.4f}" if i in per else "-" for i in range(len(groups))]
                    + [f"{max(per.values()):.4f}" if per else "-"])
        act = {g["group"]: g["relative_error_with_activations"] for g in e["groups"]
               if "relative_error_with_activations" in g}
        if act:
            with_act.append([name] + [f"{act[i]:.4f}" if i in act else "-" for i in range(len(groups))]
                            + [f"{max(act.values()):.4f}"])
    print(_table(rows, ["layer", "method", "alpha"] + [f"g{i}" for i in range(len(groups))] + ["worst"]))
    if with_act:
        print(f"  With the inputs quantized to {data.get('activation_bits')} bits too (activation parameters of each "
              "group, held-out input samples):")
        print(_table(with_act, ["layer"] + [f"g{i}" for i in range(len(groups))] + ["worst"]))


def cmd_generate_demo(a: argparse.Namespace) -> int:
    from .demo import generate_demo_pipeline

    s = generate_demo_pipeline(a.output, base_channels=a.base_channels, seed=a.seed, overwrite=a.overwrite)
    if a.json:
        json.dump(s, sys.stdout, indent=2)
        print()
    else:
        for comp, c in s["components"].items():
            print(f"{a.output}/{comp}: {c['tensors']} tensors, {c['weights']:,} weights, {_size(c['bytes'])}")
    return 0


def cmd_demo(a: argparse.Namespace) -> int:
    from .demo import generate_demo_pipeline

    root = a.out
    os.makedirs(root, exist_ok=True)
    model = os.path.join(root, "model")
    t0 = time.monotonic()
    info = generate_demo_pipeline(model, base_channels=a.base_channels, overwrite=True)
    unet = info["components"]["unet"]
    print(f"Built-in default model: {model} (diffusers StableDiffusionPipeline, bf16; unet "
          f"{unet['tensors']} tensors, {unet['weights'] / 1e6:.1f} M weights; generated in {time.monotonic() - t0:.1f} s)",
          file=sys.stderr if a.json else sys.stdout)
    q = ArrowQuantV2()
    rows, results = [], {}
    for profile in a.profiles:
        out = os.path.join(root, f"model-{profile}")
        config = DiffusionQuantConfig.from_profile(profile, overwrite=True, num_threads=a.num_threads or 0)
        r = _quantize(model, out, config, not a.quiet)
        v = q.validate_quality(model, out)
        results[profile] = {"quantize": r, "validate": v}
        if config.scheme == "entropy":
            scheme = f"entropy-coded {config.bit_width + 0.5:g}"
        elif config.scheme in GGML_TYPES:
            used = sorted({l["scheme"] for l in r["layers"] if l.get("quantized")})
            scheme = "+".join(used) if used else config.scheme  # the profile's type, sensitive Q8_0, fallbacks
        else:
            scheme = f"int{config.bit_width} {'per-channel' if config.group_size == 0 else f'g{config.group_size}'}"
        rows.append([profile, scheme,
                     f"{r['quantized_bits_per_weight']:.3f}", f"{r['bits_per_weight']:.3f}",
                     f"{r['compression_ratio']:.2f}x", f"{r['cosine_similarity']:.5f}",
                     f"{r['min_cosine_similarity']:.5f}", str(r["fallback_layers"]),
                     f"{r['model_size_mb']:.1f}", f"{r['quantization_time_s']:.2f}",
                     "passed" if v["passed"] else "FAILED"])
    if a.json:
        json.dump(results, sys.stdout, indent=2)
        print()
        return 0
    print()
    print(_table(rows, ["profile", "scheme", "bits/w (quantized)", "bits/w (all)", "vs bf16", "mean cos",
                        "worst cos", "fallbacks", "MiB", "time s", "validate"]))
    print()
    print("bits/w (all) counts every stored byte (codes, scales, offsets, and the norms, biases and sensitive "
          "layers kept at higher precision) over every weight of the unet; 'vs bf16' is the source weight bytes "
          "over the stored weight bytes. Cosines are per layer, recomputed from the files by validate.")
    r = next(iter(results.values()))["quantize"]
    if r["time_aware"]["requested"] and not r["time_aware"]["applied"]:
        print(f"Time-aware and spatial passes: not applied ({r['time_aware']['reason']}).")
    print(f"Outputs: {root}/model-<profile>/   (inspect with: arrowquant inspect {root}/model-{a.profiles[0]})")
    return 0 if all(x["validate"]["passed"] for x in results.values()) else 1


def cmd_report(a: argparse.Namespace) -> int:
    from .quality_report import report

    t = time.perf_counter()
    path = report(a.path, a.output, against=a.against, figures_dir=a.figures)
    if a.json:
        json.dump({"report_path": path, "seconds": time.perf_counter() - t}, sys.stdout)
        print()
    else:
        print(f"Report: {path} ({time.perf_counter() - t:.1f} s)")
    return 0


def cmd_zoo(a: argparse.Namespace) -> int:
    from .zoo import format_summary, run_zoo

    bar = None
    show = not a.quiet and not a.json

    def progress(done: int, total: int, row: Dict[str, Any]) -> None:
        nonlocal bar
        if not show:
            return
        status = "done" if row["status"] == "done" else f"FAILED ({row['error'].splitlines()[0][:80]})"
        if sys.stderr.isatty():
            from tqdm import tqdm

            if bar is None:
                bar = tqdm(total=total, unit="model", desc="Zoo", file=sys.stderr, dynamic_ncols=True)
            bar.n = done
            bar.set_postfix_str(f"{row['name']}-{row['profile']}: {status}", refresh=True)
        else:
            print(f"[{done}/{total}] {row['name']}-{row['profile']}: {status}", file=sys.stderr, flush=True)

    try:
        with TerminateAsInterrupt():
            summary = run_zoo(a.config, cluster=a.ray, progress=progress)
    finally:
        if bar is not None:
            bar.close()
    if a.json:
        json.dump(summary, sys.stdout, indent=2)
        print()
    else:
        print(format_summary(summary))
    return 1 if summary["failed"] else 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="arrowquant", description="Quantize diffusion models (ArrowQuant).")
    sub = p.add_subparsers(dest="command", required=True)

    q = sub.add_parser("quantize", help="quantize a model (.safetensors file, HF directory or diffusers pipeline)")
    q.add_argument("model")
    q.add_argument("output")
    q.add_argument("--profile", choices=PROFILES, help="edge (Q2_K), local (Q4_K) or cloud (Q8_0)")
    q.add_argument("--bits", dest="bit_width", type=int, choices=BIT_WIDTHS,
                   help="code width; with a ggml scheme (the profiles'), the ggml type of that width")
    q.add_argument("--scheme", type=str.lower, choices=SCHEMES,
                   help="affine, entropy (archive format), or a ggml block type: " + ", ".join(GGML_TYPES))
    q.add_argument("--group-size", dest="group_size", type=int, choices=GROUP_SIZES, help="0 = per channel")
    sym = q.add_mutually_exclusive_group()
    sym.add_argument("--symmetric", dest="symmetric", action="store_const", const=True, default=None)
    sym.add_argument("--asymmetric", dest="symmetric", action="store_const", const=False)
    q.add_argument("--scale-method", dest="scale_method", choices=("search", "minmax"))
    q.add_argument("--min-accuracy", dest="min_accuracy", type=float)
    q.add_argument("--no-fallback", action="store_true", help="never raise a layer's bits for accuracy")
    q.add_argument("--threads", dest="num_threads", type=int, help="worker threads (0 = every core)")
    q.add_argument("--components", nargs="+", help="pipeline components to quantize (default: the denoiser; 'all')")
    q.add_argument("--skip", action="append", metavar="REGEX", help="keep matching tensors unquantized")
    q.add_argument("--override", action="append", metavar="REGEX=BITS", help="bits for matching tensors (16 keeps)")
    q.add_argument("--sensitive-bits", dest="sensitive_bit_width", type=int, choices=BIT_WIDTHS + (16,))
    q.add_argument("--min-tensor-size", dest="min_tensor_size", type=int)
    q.add_argument("--modality", choices=MODALITIES)
    q.add_argument("--nonfinite", choices=("error", "keep"))
    q.add_argument("--fail-fast", action="store_true")
    q.add_argument("--overwrite", action="store_true")
    q.add_argument("--resume", action="store_true",
                   help="continue an interrupted run into OUTPUT after the tensors it completed (same config and "
                        "source; byte-identical result); an interruption of this run keeps its progress for the next")
    q.add_argument("--ray", nargs="?", const="ray", default=None, metavar="ADDRESS",
                   help="quantize on a Ray cluster: its tensors as tasks on the workers, which must see MODEL and "
                        "OUTPUT's folder at the same paths (default address: RAY_ADDRESS or a running cluster, else a "
                        "local one); byte-identical output (needs pip install 'arrow_quant_v2[ray]')")
    q.add_argument("--calibration", metavar="PARQUET",
                   help="calibration file from arrow_quant_v2.calibration (default: MODEL/calibration.parquet if present)")
    q.add_argument("--time-groups", dest="time_groups", type=int, help="timestep groups (num_time_groups)")
    q.add_argument("--no-time-aware", action="store_true", help="no GPTQ: calibration only measures output error")
    q.add_argument("--report", action="store_true",
                   help="also write OUTPUT.report.html, the quality report with plots (needs matplotlib)")
    q.add_argument("--json", action="store_true", help="print the result as JSON")
    q.add_argument("--quiet", action="store_true", help="no progress output")
    q.set_defaults(func=cmd_quantize)

    rp = sub.add_parser("report", help="an HTML page of plots: error per layer and per timestep group, where the "
                                        "bits went, activation ranges (self-contained; needs matplotlib)")
    rp.add_argument("path", help="the quantized model directory")
    rp.add_argument("-o", "--output", help="the HTML file (default: PATH.report.html beside the directory)")
    rp.add_argument("--against", metavar="ORIGINAL",
                    help="the source model: recompute every layer's error from the files and say whether it matches")
    rp.add_argument("--figures", metavar="DIR", help="also write each figure as a PNG into DIR")
    rp.add_argument("--json", action="store_true")
    rp.set_defaults(func=cmd_report)

    z = sub.add_parser("zoo", help="quantize many models x profiles as one job (a Ray cluster's, or here); "
                                   "exit status 1 when a model failed")
    z.add_argument("config", help="YAML (or JSON): output, profiles, models (docs/cluster.md)")
    z.add_argument("--ray", nargs="?", const="ray", default=None, metavar="ADDRESS",
                   help="run the jobs as Ray tasks (default address: RAY_ADDRESS or a running cluster, else a local "
                        "one); without it, the configuration's 'ray' key, else this machine")
    z.add_argument("--json", action="store_true", help="print the summary as JSON")
    z.add_argument("--quiet", action="store_true", help="no progress output")
    z.set_defaults(func=cmd_zoo)

    v = sub.add_parser("validate", help="recompute quality from the files; exit status 1 when it fails")
    v.add_argument("original")
    v.add_argument("quantized")
    v.add_argument("--threads", dest="num_threads", type=int)
    v.add_argument("--json", action="store_true")
    v.set_defaults(func=cmd_validate)

    i = sub.add_parser("inspect", help="table of layers, schemes, sizes and metrics")
    i.add_argument("path")
    i.add_argument("--all", action="store_true", help="also list small kept tensors")
    i.add_argument("--components", nargs="+")
    i.add_argument("--json", action="store_true")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="write a quantized model's component as GGUF or a compressed-tensors "
                                      "checkpoint (docs/export.md)")
    e.add_argument("path", help="the quantized model directory")
    e.add_argument("output", help="the .gguf file (or, with --to compressed-tensors, the directory) to write")
    e.add_argument("--to", choices=("gguf", "compressed-tensors"), default="gguf")
    e.add_argument("--component", help="the component to export (default: the denoiser)")
    e.add_argument("--requantize", metavar="TYPE",
                   help="encode layers not in a ggml type (affine, entropy, equalized) as this ggml type")
    e.add_argument("--arch", choices=("diffusers", "sd1", "sdxl", "flux", "sd3", "dream", "llada"),
                   help="GGUF layout: source names (diffusers); the original checkpoint's names (sd1, sdxl "
                        "UNets; flux, sd3 with their fused qkv: for stable-diffusion.cpp and ComfyUI-GGUF); "
                        "llama.cpp's for a diffusion LM (dream, llada); default: detected from config.json")
    e.add_argument("--packed-convs", dest="packed_convs", action="store_true",
                   help="with --arch sd1/sdxl: ggml convolutions as stored, reshaped as ComfyUI-GGUF reads them")
    e.add_argument("--overwrite", action="store_true")
    e.add_argument("--json", action="store_true")
    e.set_defaults(func=cmd_export)

    d = sub.add_parser("demo", help="quantize the built-in default model with every profile")
    d.add_argument("--out", default="demo-output")
    d.add_argument("--profiles", nargs="+", choices=PROFILES, default=list(PROFILES))
    d.add_argument("--base-channels", type=int, default=64)
    d.add_argument("--threads", dest="num_threads", type=int)
    d.add_argument("--quiet", action="store_true")
    d.add_argument("--json", action="store_true")
    d.set_defaults(func=cmd_demo)

    g = sub.add_parser("generate-demo", help="write the built-in default model")
    g.add_argument("output")
    g.add_argument("--base-channels", type=int, default=64)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--overwrite", action="store_true")
    g.add_argument("--json", action="store_true")
    g.set_defaults(func=cmd_generate_demo)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ArrowQuantError as e:
        print(f"arrowquant: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as e:
        print(f"arrowquant: {e or 'interrupted; no output was written'}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
