"""What a block-diagonal Hessian costs against the full one, at Flux-dev's widths: the wide layers
of the Flux-dev-shaped transformer of bench_calib_large.py (MLP down-projections, 12288 inputs;
single-block output projections, 15360 inputs) quantized at W4 and W3 (int4/int3 g128) three ways
from one recording with full Hessians:

  full        GPTQ on the full Hessian (recorded with max_hessian_features=16384);
  block-4096  GPTQ on its diagonal blocks of 4096 columns (what the default settings record:
              the blocks of the same matrices, cut out of the full ones, so the comparison sees the
              approximation only);
  data-free   the same codes without GPTQ (enable_time_aware=False).

Each layer's output error ||(W - Q) x|| / ||W x|| is measured on the same held-out input samples
(32 rows per bin, calls the Hessians never saw); equalization off, so the three differ only in
the Hessian.

    python benchmarks/bench_block_hessian.py        # needs /tmp/aq-bench-flux/model from bench_calib_large.py --model flux

With --model dream, the first --layers layers of the Dream-7B-shaped model of bench_calib_large.py
(its calibration as recorded there: block-diagonal Hessians for the 18944-input down-projections,
full ones for the rest) quantized with GPTQ and data-free, the same way (full Hessians at 18944
inputs would take 2.9 GB per layer to record: not compared).

    python benchmarks/bench_block_hessian.py --model dream   # needs /tmp/aq-bench-dream/model
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
WIDE = ("ff.net.2.weight", "ff_context.net.2.weight", "proj_out.weight")


def record(model_dir: str, out: str, runs: int, steps: int) -> dict:
    import torch
    from diffusers import FluxTransformer2DModel

    sys.path.insert(0, HERE)
    from bench_calib_large import FluxSampler

    from arrow_quant_v2.calibration import record_pipeline

    model = FluxTransformer2DModel.from_pretrained(model_dir, torch_dtype=torch.bfloat16).eval()
    t0 = time.time()
    rec = record_pipeline(FluxSampler(model, 128), [{"seed": s} for s in range(runs)], num_inference_steps=steps,
                          max_samples=runs * steps, num_bins=steps, holdout_every=2, hessian_bins=1,
                          holdout_hessians=False, input_samples=32, fit_input_samples=0,
                          max_hessian_features=16384, max_memory=4 << 30, output_path=out, progress=False)
    return {"seconds": time.time() - t0, "layers": len(rec.layers)}


def wide(name: str) -> bool:
    return name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and name.endswith(WIDE)


def extract(model_file: str, keep, dst: str, architecture: str) -> list:
    """The tensors `keep(name)` of a safetensors file as a model directory (float32); their names."""
    from safetensors import safe_open
    from safetensors.numpy import save_file

    os.makedirs(dst, exist_ok=True)
    with safe_open(model_file, "pt") as f:
        tensors = {k: f.get_tensor(k).float().numpy() for k in f.keys() if keep(k)}
    save_file(tensors, os.path.join(dst, "model.safetensors"))
    with open(os.path.join(dst, "config.json"), "w") as fh:
        json.dump({"architectures": [architecture]}, fh)
    return sorted(tensors)


def subset(model_dir: str, full: str, work: str) -> tuple:
    """The wide layers as a model directory, and the calibration file cut to block-diagonal."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    src = os.path.join(work, "wide")
    names = extract(os.path.join(model_dir, "diffusion_pytorch_model.safetensors"), wide, src, "FluxTransformer2DModel")

    from arrow_quant_v2.calibration import _pack_upper, _unpack_upper

    pf = pq.ParquetFile(full)
    block = 4096
    full_path = os.path.join(work, "calibration-full.parquet")
    blocked_path = os.path.join(work, "calibration-block.parquet")
    writers: dict = {}
    for g in range(pf.num_row_groups):
        t = pf.read_row_group(g)
        if not wide(t.column("layer")[0].as_py()):
            continue
        b = t.set_column(t.schema.get_field_index("hessian_block"), "hessian_block", pa.array([block], pa.int32()))
        h = t.column("hessian")[0]
        if h.is_valid:  # its diagonal blocks, cut out of the full matrix
            f = t.column("in_features")[0].as_py()
            m = _unpack_upper(np.asarray(h.values.to_numpy(zero_copy_only=False)), f)
            packed = np.concatenate([_pack_upper(m[i:i + block, i:i + block]) for i in range(0, f, block)])
            b = b.set_column(b.schema.get_field_index("hessian"), "hessian",
                             pa.array([packed], type=b.schema.field("hessian").type))
        for path, table in ((full_path, t), (blocked_path, b)):
            if path not in writers:
                writers[path] = pq.ParquetWriter(path, table.schema)
            writers[path].write_table(table)
    for w in writers.values():
        w.close()
    return src, full_path, blocked_path, names


def quantize(src: str, calib: str, dst: str, bits: int, time_aware: bool) -> dict:
    import arrow_quant_v2 as aq

    cfg = aq.DiffusionQuantConfig(bit_width=bits, group_size=128, calibration_path=calib, enable_spatial=False,
                                  enable_time_aware=time_aware, min_tensor_size=0, sensitive_patterns=[],
                                  enable_fallback=False)
    t0 = time.time()
    r = aq.ArrowQuantV2().quantize_diffusion_model(src, dst, cfg)
    out = {}
    for l in r["layers"]:
        if l.get("output_error"):
            out[l["tensor"]] = {"method": l["method"], "block": l.get("hessian_block"),
                                "errors": [g["relative_error"] for g in l["output_error"]],
                                "checked_on": sorted({g["checked_on"] for g in l["output_error"]})}
    return {"seconds": time.time() - t0, "layers": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("flux", "dream"), default="flux")
    ap.add_argument("--model-dir")
    ap.add_argument("--work")
    ap.add_argument("--layers", type=int, default=4, help="dream: how many of its layers")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.model_dir = args.model_dir or f"/tmp/aq-bench-{args.model}/model"
    args.work = args.work or f"/tmp/aq-bench-block-hessian-{args.model}"
    os.makedirs(args.work, exist_ok=True)
    if args.model == "dream":
        return dream(args)
    full = os.path.join(args.work, "calibration-all.parquet")
    if args.child == "record":
        print(json.dumps(record(args.model_dir, full, args.runs, args.steps)))
        return
    if not os.path.exists(full):
        subprocess.run([sys.executable, __file__, "--child", "record", "--model-dir", args.model_dir, "--work",
                            args.work, "--runs", str(args.runs), "--steps", str(args.steps)], check=True)
    src, full_path, blocked_path, names = subset(args.model_dir, full, args.work)
    results = {}
    import shutil
    for bits in args.bits:
        for label, calib, aware in (("full", full_path, True), ("block-4096", blocked_path, True),
                                    ("data-free", full_path, False)):
            dst = os.path.join(args.work, f"q-{label}-{bits}")
            shutil.rmtree(dst, ignore_errors=True)
            results[f"{label}/W{bits}"] = quantize(src, calib, dst, bits, aware)
            print(f"  W{bits} {label}: {results[f'{label}/W{bits}']['seconds']:.0f} s", file=sys.stderr, flush=True)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    kinds = {"MLP down-projection (12288 inputs)": lambda n: n.endswith("net.2.weight"),
             "single-block output projection (15360 inputs)": lambda n: n.endswith("proj_out.weight")}
    table(results, kinds, ("data-free", "block-4096", "full"),
          ("data-free", "GPTQ, block-diagonal (4096)", "GPTQ, full Hessian"), args.bits, names, "timestep")


def dream(args: argparse.Namespace) -> None:
    import shutil

    prefixes = tuple(f"model.layers.{i}." for i in range(args.layers))
    src = os.path.join(args.work, "layers")
    names = extract(os.path.join(args.model_dir, "model.safetensors"),
                    lambda n: n.startswith(prefixes) and n.endswith("proj.weight"), src, "Qwen2ForCausalLM")
    calib = os.path.join(args.model_dir, "calibration.parquet")
    results = {}
    for bits in args.bits:
        for label, aware in (("gptq", True), ("data-free", False)):
            dst = os.path.join(args.work, f"q-{label}-{bits}")
            shutil.rmtree(dst, ignore_errors=True)
            results[f"{label}/W{bits}"] = quantize(src, calib, dst, bits, aware)
    with open(os.path.join(args.work, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    kinds = {"MLP down-projection (18944 inputs, block-diagonal)": lambda n: n.endswith("down_proj.weight"),
             "q/k/v/o, gate/up (3584 inputs, full)": lambda n: not n.endswith("down_proj.weight")}
    table(results, kinds, ("data-free", "gptq"), ("data-free", "GPTQ"), args.bits, names, "mask-ratio")


def table(results: dict, kinds: dict, labels: tuple, headers: tuple, bits_list: list, names: list,
          groups: str) -> None:
    """Per kind of layer and bit width, the mean over its layers of each run's held-out error."""
    print("| layers | bits | " + " | ".join(headers) + " |\n|---|---|" + "---|" * len(headers))
    for kind, test in kinds.items():
        for bits in bits_list:
            cells = []
            for label in labels:
                ls = results[f"{label}/W{bits}"]["layers"]
                errs = [statistics.mean(v["errors"]) for n, v in ls.items() if test(n)]
                cells.append(f"{statistics.mean(errs):.4f}" if errs else "-")
            n = sum(1 for x in names if test(x))
            print(f"| {kind}, {n} layers | W{bits} | " + " | ".join(cells) + " |")
    print(f"\n(mean over layers of the mean over {groups} groups of the held-out output relative error)")


if __name__ == "__main__":
    main()
