"""Calibration at full size: a DiT-XL/2-shaped diffusers DiTPipeline (28 blocks, width 1152, MLP 4608,
16x16 patches of a 32x32 latent; random init, bfloat16 weights), recorded with record_pipeline in
bounded memory and quantized at W4 with the calibration, each stage in a fresh process whose peak
RSS is reported.

    python benchmarks/bench_calib_scale.py                 # set up (once), record, quantize
    python benchmarks/bench_calib_scale.py --work DIR --runs 2 --steps 10 --max-memory-gib 1

Stages:
  setup     builds the pipeline (DiTTransformer2DModel with DiT-XL/2's config, the SD VAE's shape,
            DDIM) and saves it to WORK/pipeline in bfloat16 (1.5 GB); skipped when present.
  record    DiTPipeline.from_pretrained(torch_dtype=bfloat16) and record_pipeline over `runs` class
            batches of two ImageNet classes x `steps` DDIM steps (classifier-free guidance doubles the
            batch: 4 latents a call), one Hessian per layer over the whole trajectory
            (hessian_bins=1), every 2nd call held out (each of the 10 bins gets a fit and a
            held-out call), no held-out Hessians (held-out checks on 32 sampled input rows per
            bin), no fit-split input samples (a weight-only deployment), in passes of at most
            --max-memory-gib of Hessians. Writes WORK/pipeline/transformer/calibration.parquet.
  quantize  arrow_quant_v2 W4 (int4, group 128, GPTQ on the calibration) of WORK/pipeline/transformer.
  parallel, sequential
            calibrate_and_quantize with the record stage's options (sequential=False / True) into
            WORK/w4-parallel, WORK/w4-sequential, then the denoiser's output relative error against
            full precision on the 10 calls of another run (classes 33 and 812, seed 7), replayed
            into the transformer holding the output's dequantized weights.

Results: WORK/results.json and a markdown table on stdout (BENCHMARKS.md, "Calibration at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20  # kB -> GiB


def rss_now_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def progress_printer(t0: float):
    """A record_pipeline progress_callback printing to stderr at most every 30 s (and at the end)
    with the time since t0 and the process's RSS."""
    last = [0.0]

    def progress(message: str, fraction: float) -> None:
        if time.time() - last[0] > 30 or fraction >= 1.0:
            last[0] = time.time()
            print(f"  {time.time() - t0:7.1f} s  {fraction:6.1%}  {message}  (RSS now {rss_now_gib():.2f} GiB, peak "
                  f"{peak_rss_gib():.2f})", file=sys.stderr, flush=True)

    return progress


def setup(work: str) -> dict:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    out = os.path.join(work, "pipeline")
    if os.path.exists(os.path.join(out, "model_index.json")):
        return {"skipped": True}
    torch.manual_seed(0)
    t0 = time.time()
    transformer = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4, out_channels=8,
                                        num_layers=28, sample_size=32, patch_size=2, num_embeds_ada_norm=1000,
                                        norm_type="ada_norm_zero").to(torch.bfloat16)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512),
                        down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4).to(torch.bfloat16)
    pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(num_train_timesteps=1000))
    tmp = out + ".tmp"
    pipe.save_pretrained(tmp)
    os.replace(tmp, out)
    return {"seconds": time.time() - t0, "transformer_params": sum(p.numel() for p in transformer.parameters())}


def record(work: str, runs: int, steps: int, max_memory_gib: float) -> dict:
    import torch
    from diffusers import DiTPipeline

    from arrow_quant_v2.calibration import record_pipeline

    torch.set_num_threads(os.cpu_count() or 1)
    root = os.path.join(work, "pipeline")
    t0 = time.time()
    pipe = DiTPipeline.from_pretrained(root, torch_dtype=torch.bfloat16)
    load_s = time.time() - t0
    after_load = {"rss_gib": rss_now_gib(), "peak_rss_gib": peak_rss_gib()}
    classes = [[207, 360], [387, 974], [88, 979], [417, 279]]
    out = os.path.join(root, "transformer", "calibration.parquet")
    t0 = time.time()
    progress = progress_printer(t0)

    rec = record_pipeline(pipe, [{"class_labels": c} for c in classes[:runs]], num_inference_steps=steps,
                          max_samples=runs * steps, num_bins=10, holdout_every=2, hessian_bins=1,
                          holdout_hessians=False, input_samples=32, fit_input_samples=0, max_memory=int(max_memory_gib * 2 ** 30),
                          output_path=out, progress_callback=progress,
                          generator=torch.Generator().manual_seed(0))
    seconds = time.time() - t0
    import pyarrow.parquet as pq

    meta = pq.read_metadata(out)
    return {"load_seconds": load_s, "after_load": after_load, "seconds": seconds, "hook_seconds": rec.hook_seconds,
            "passes": rec.passes, "calls": rec.calls, "recorded_calls": rec.recorded_calls,
            "layers": len(rec.layers), "shared_inputs": len(rec.shared_inputs),
            "file_bytes": os.path.getsize(out), "file_rows": meta.num_rows,
            "peak_rss_gib": peak_rss_gib()}


def layer_summary(layers: list) -> tuple:
    """(the layers with output errors, per step group the median and worst error over them, the
    count of each method) of a quantize result's layers."""
    calibrated = [l for l in layers if l.get("output_error")]
    per_group: dict = {}
    for l in calibrated:
        for g in l["output_error"]:
            per_group.setdefault((g["group"], g["step_lo"], g["step_hi"]), []).append(g["relative_error"])
    groups = [{"group": k[0], "steps": [k[1], k[2]], "layers": len(v), "median_rel_error": statistics.median(v),
               "max_rel_error": max(v)} for k, v in sorted(per_group.items())]
    methods: dict = {}
    for l in layers:
        methods[l.get("method")] = methods.get(l.get("method"), 0) + 1
    return calibrated, groups, methods


def quantize(work: str, bits: int) -> dict:
    import arrow_quant_v2 as aq

    src = os.path.join(work, "pipeline", "transformer")
    dst = os.path.join(work, f"w{bits}")
    if os.path.exists(dst):
        import shutil
        shutil.rmtree(dst)
    cfg = aq.DiffusionQuantConfig(bit_width=bits, group_size=128, calibration_path=os.path.join(src, "calibration.parquet"))
    t0 = time.time()
    r = aq.ArrowQuantV2().quantize_diffusion_model(src, dst, cfg)
    seconds = time.time() - t0
    # the blocks' nn.Linear weights (not their class-embedding tables)
    block_linear = [l for l in r["layers"] if l["tensor"].startswith("transformer_blocks.") and l["tensor"].endswith(".weight")
                    and len(l.get("shape", [0, 0])) == 2 and "embedding_table" not in l["tensor"]]
    calibrated, groups, methods = layer_summary(block_linear)
    checked_on = sorted({g.get("checked_on", "") for l in calibrated for g in l["output_error"]})
    held_out = sum(1 for l in calibrated for g in l["output_error"] if g.get("held_out"))
    return {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "block_linear_layers": len(block_linear),
            "group_checks_held_out": held_out, "group_checks": sum(len(l["output_error"]) for l in calibrated),
            "block_linear_calibrated": len(calibrated), "methods": methods, "groups": groups,
            "checked_on": checked_on, "layers_gptq": r["calibration"]["layers_gptq"],
            "compression_ratio": r.get("compression_ratio"), "bits_per_weight": r.get("bits_per_weight"),
            "warnings": len(r.get("warnings", []))}


def calibrate(work: str, runs: int, steps: int, max_memory_gib: float, bits: int, sequential: bool) -> dict:
    """calibrate_and_quantize on the pipeline (the record stage's recorder options), sequential or
    not, then the denoiser's output error against full precision on calls of another run (other
    classes and seed): the transformer's inputs and outputs along the full-precision trajectory,
    captured first, replayed into the transformer holding the output's dequantized weights."""
    import torch
    from diffusers import DiTPipeline

    import arrow_quant_v2 as aq
    from arrow_quant_v2.calibration import calibrate_and_quantize

    torch.set_num_threads(os.cpu_count() or 1)
    root = os.path.join(work, "pipeline")
    pipe = DiTPipeline.from_pretrained(root, torch_dtype=torch.bfloat16)
    transformer = pipe.transformer
    evaluation = []

    def keep(mod, args, kwargs, output):
        evaluation.append((args, kwargs, output[0] if isinstance(output, tuple) else output.sample))

    handle = transformer.register_forward_hook(keep, with_kwargs=True)
    with torch.no_grad():
        pipe(class_labels=[33, 812], num_inference_steps=steps, generator=torch.Generator().manual_seed(7))
    handle.remove()
    classes = [[207, 360], [387, 974], [88, 979], [417, 279]]
    label = "sequential" if sequential else "parallel"
    dst = os.path.join(work, f"w{bits}-{label}")
    if os.path.exists(dst):
        import shutil
        shutil.rmtree(dst)
    cfg = aq.DiffusionQuantConfig(bit_width=bits, group_size=128)
    t0 = time.time()
    r = calibrate_and_quantize(pipe, [{"class_labels": c} for c in classes[:runs]], dst, cfg,
                               num_inference_steps=steps, max_samples=runs * steps, num_bins=10, holdout_every=2,
                               hessian_bins=1, holdout_hessians=False, input_samples=32, fit_input_samples=0,
                               max_memory=int(max_memory_gib * 2 ** 30), source_dir=os.path.join(root, "transformer"),
                               progress_callback=progress_printer(t0), sequential=sequential,
                               keep_dequantized=sequential, generator=torch.Generator().manual_seed(0))
    seconds = time.time() - t0
    peak = peak_rss_gib()
    if not sequential:  # keep_dequantized is sequential-only: load the output's weights
        state = aq.load(dst).to_torch_state_dict(dtype=torch.bfloat16)
        transformer.load_state_dict(state, strict=False)
        del state
    num = den = 0.0
    per_call = []
    with torch.no_grad():
        for args, kwargs, ref in evaluation:
            out = transformer(*args, **kwargs)
            out = out[0] if isinstance(out, tuple) else out.sample
            e, d = float(((out.float() - ref.float()) ** 2).sum()), float((ref.float() ** 2).sum())
            num, den = num + e, den + d
            per_call.append((e / d) ** 0.5)
    block_linear = [l for l in r["layers"] if l["tensor"].startswith("transformer_blocks.")
                    and l["tensor"].endswith(".weight") and len(l.get("shape", [0, 0])) == 2
                    and "embedding_table" not in l["tensor"]]
    calibrated, groups, methods = layer_summary(block_linear)
    rec = r["calibration_recording"]
    return {"sequential": sequential, "seconds": seconds, "peak_rss_gib": peak,
            "recording_seconds": rec["seconds"], "hook_seconds": rec["hook_seconds"],
            "quantize_seconds": r["quantization_time_s"], "sequential_detail": rec.get("sequential"),
            "calibration_bytes": os.path.getsize(rec["path"]), "layers_gptq": r["calibration"]["layers_gptq"],
            "block_linear_calibrated": len(calibrated), "block_linear_layers": len(block_linear),
            "methods": methods, "groups": groups, "bits_per_weight": r.get("bits_per_weight"),
            "denoiser_output_error": (num / den) ** 0.5, "denoiser_output_error_per_call": per_call}


def child(stage: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--child", stage, "--work", args.work, "--runs", str(args.runs),
           "--steps", str(args.steps), "--max-memory-gib", str(args.max_memory_gib), "--bits", str(args.bits)]
    p = subprocess.run(cmd, stdout=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"stage {stage} failed ({p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/aq-bench-dit-xl")
    ap.add_argument("--runs", type=int, default=2, help="pipeline runs (class batches of 2 classes)")
    ap.add_argument("--steps", type=int, default=10, help="DDIM steps per run")
    ap.add_argument("--max-memory-gib", type=float, default=1.0, help="Hessians held at once while recording")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--stages", default="setup,record,quantize")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        fn = {"setup": lambda: setup(args.work), "record": lambda: record(args.work, args.runs, args.steps,
                                                                           args.max_memory_gib),
              "quantize": lambda: quantize(args.work, args.bits),
              "parallel": lambda: calibrate(args.work, args.runs, args.steps, args.max_memory_gib, args.bits, False),
              "sequential": lambda: calibrate(args.work, args.runs, args.steps, args.max_memory_gib, args.bits,
                                              True)}[args.child]
        print(json.dumps(fn()))
        return
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.work, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    for stage in args.stages.split(","):
        print(f"== {stage}", file=sys.stderr, flush=True)
        results[stage] = child(stage, args)
        results[stage]["args"] = {k: getattr(args, k) for k in ("runs", "steps", "max_memory_gib", "bits")}
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    for label in ("parallel", "sequential"):
        c = results.get(label)
        if not c:
            continue
        detail = c.get("sequential_detail") or {}
        print(f"{label}: peak RSS {c['peak_rss_gib']:.2f} GiB, {c['seconds']:.0f} s (recording {c['recording_seconds']:.0f} s"
              f" of which statistics {c['hook_seconds']:.0f} s" + (f", replays {detail['replay_seconds']:.0f} s, "
                                                                    f"block quantize {detail['block_quantize_seconds']:.0f} s"
                                                                    if detail else "")
              + f"; final quantize {c['quantize_seconds']:.0f} s), calibration {c['calibration_bytes'] / 2 ** 30:.2f} GiB, "
              f"GPTQ {c['block_linear_calibrated']}/{c['block_linear_layers']} block layers, denoiser output error "
              f"{c['denoiser_output_error']:.4f} (per call {min(c['denoiser_output_error_per_call']):.4f}-"
              f"{max(c['denoiser_output_error_per_call']):.4f}), layer medians per group "
              + " ".join(f"{g['median_rel_error']:.4f}" for g in c["groups"]))
    rec, q = results.get("record"), results.get("quantize")
    print("| figure | value | target |\n|---|---|---|")
    if rec:
        fwd = rec["seconds"] - rec["hook_seconds"]
        print(f"| recording peak RSS (fresh process, bf16 pipeline loaded) | {rec['peak_rss_gib']:.2f} GiB | <= 4 GiB |")
        print(f"| calibration.parquet | {rec['file_bytes'] / 2 ** 30:.2f} GiB ({rec['file_rows']} rows) | <= 2 GiB |")
        print(f"| recording time | {rec['seconds']:.0f} s: statistics {rec['hook_seconds']:.0f} s, forwards and "
              f"pipeline {fwd:.0f} s, {len(rec['passes'])} passes | |")
    if q:
        print(f"| calibrated W{args.bits} quantize peak RSS | {q['peak_rss_gib']:.2f} GiB ({q['seconds']:.0f} s) | <= 4 GiB |")
        print(f"| block linear layers calibrated | {q['block_linear_calibrated']} / {q['block_linear_layers']} "
              f"({q['methods']}) | all |")
        print(f"| timestep-group checks on held-out inputs | {q['group_checks_held_out']} / {q['group_checks']} "
              f"({', '.join(q['checked_on'])}) | |")
        for g in q["groups"]:
            print(f"| output error, timestep group {g['group']} ({g['steps'][0]:.0f}-{g['steps'][1]:.0f}) | median "
                  f"{g['median_rel_error']:.4f}, max {g['max_rel_error']:.4f} over {g['layers']} layers | |")


if __name__ == "__main__":
    main()
