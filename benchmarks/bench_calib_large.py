"""Calibration at the widths of Flux-dev and Dream-7B: a Flux-dev-shaped transformer (width 3072, MLP
12288, 24 heads; a few double and single blocks) and a Dream-7B-shaped diffusion LM (Qwen2 layers:
28 x 3584 / 18944, 28 query and 4 key-value heads, vocabulary 152064, bidirectional attention),
random init in bfloat16, recorded with record_pipeline in bounded memory along their own sampling
loops and quantized at W4 with the calibration -- each stage in a fresh process whose peak RSS is
reported. Their widest layers (Flux's MLP down-projections of 12288 inputs and single-block output
projections of 15360, Dream's down-projections of 18944) get block-diagonal Hessians.

    python benchmarks/bench_calib_large.py --model flux --double 2 --single 4
    python benchmarks/bench_calib_large.py --model dream

Stages (--stages, default setup,record,quantize; WORK defaults to /tmp/aq-bench-MODEL):
  setup     builds the model (diffusers FluxTransformer2DModel with Flux-dev's config but --double /
            --single blocks; transformers Qwen2ForCausalLM with Dream-7B's config) directly in
            bfloat16 and saves it to WORK/model (skipped when present).
  record    loads it (bfloat16) and runs record_pipeline over --runs sampling runs of --steps steps:
            Flux: flow-matching Euler steps on a 256x256 image (16x16 packed latent tokens) with
            random stand-ins for the T5 (--text-tokens x 4096) and CLIP pooled (768) embeddings,
            guidance 3.5; Dream: masked diffusion over a random --prompt-tokens prompt and
            --gen-tokens masked tokens, unmasking the most confident tokens each step, the mask
            ratio read from input_ids (step_kind="mask_ratio"). One Hessian per layer over the
            trajectory (hessian_bins=1), every 2nd call held out, held-out checks on 32 sampled
            input rows per bin, passes of at most --max-memory-gib of Hessians.
  quantize  arrow_quant_v2 W4 (int4, group 128, GPTQ on the calibration) of WORK/model.

Results: WORK/results.json and a markdown table on stdout (BENCHMARKS.md, "Calibration at scale").
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_calib_scale import layer_summary, peak_rss_gib, progress_printer, rss_now_gib  # noqa: E402

FLUX_DEV = dict(patch_size=1, in_channels=64, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
FLUX_DEV_BLOCKS = (19, 38)
DREAM_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=131072, rope_theta=1e6,
                rms_norm_eps=1e-6, tie_word_embeddings=False)
DREAM_MASK_ID = 151666



def setup(args: argparse.Namespace) -> dict:
    import torch

    out = os.path.join(args.work, "model")
    if os.path.exists(os.path.join(out, "config.json")):
        return {"skipped": True}
    torch.manual_seed(0)
    t0 = time.time()
    torch.set_default_dtype(torch.bfloat16)  # built in bfloat16: a 7B model in float32 would not fit
    if args.model == "flux":
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel(num_layers=args.double, num_single_layers=args.single, **FLUX_DEV)
    else:
        from transformers import Qwen2Config, Qwen2ForCausalLM

        model = Qwen2ForCausalLM(Qwen2Config(**DREAM_7B))
        with torch.no_grad():  # transformers' init: normal(0, 0.02) weights
            for p in model.parameters():
                if p.dim() >= 2:
                    p.normal_(0.0, 0.02)
    torch.set_default_dtype(torch.float32)
    build_s = time.time() - t0
    params = sum(p.numel() for p in model.parameters())
    tmp = out + ".tmp"
    model.save_pretrained(tmp)
    os.replace(tmp, out)
    return {"build_seconds": build_s, "seconds": time.time() - t0, "params": params, "peak_rss_gib": peak_rss_gib()}


class FluxSampler:
    """Flux-dev's sampling loop on one 256x256 image: packed latents (16x16 tokens of 64 channels),
    image/text position ids, guidance 3.5, Euler steps on the flow-matching sigmas (shifted as
    diffusers' FlowMatchEulerDiscreteScheduler with Flux's shift), timestep passed as sigma."""

    class scheduler:  # noqa: N801 -- record_pipeline reads pipe.scheduler.config.num_train_timesteps
        config = {"num_train_timesteps": 1000}

    def __init__(self, transformer, text_tokens: int) -> None:
        self.transformer = transformer
        self.text_tokens = text_tokens

    def __call__(self, seed: int, num_inference_steps: int):
        import math

        import torch

        g = torch.Generator().manual_seed(seed)
        dt = torch.bfloat16
        x = torch.randn(1, 256, 64, generator=g).to(dt)
        text = torch.randn(1, self.text_tokens, 4096, generator=g).to(dt)
        pooled = torch.randn(1, 768, generator=g).to(dt)
        img_ids = torch.zeros(16, 16, 3)
        img_ids[..., 1] = torch.arange(16)[:, None]
        img_ids[..., 2] = torch.arange(16)[None, :]
        img_ids = img_ids.reshape(256, 3)
        txt_ids = torch.zeros(self.text_tokens, 3)
        mu = 0.5  # diffusers' calculate_shift at 256 image tokens
        sig = [1.0 - i / num_inference_steps for i in range(num_inference_steps)] + [0.0]
        sig = [math.exp(mu) / (math.exp(mu) + (1 / s - 1)) if 0 < s < 1 else s for s in sig]
        for i in range(num_inference_steps):
            v = self.transformer(hidden_states=x, timestep=torch.tensor([sig[i]], dtype=dt),
                                 guidance=torch.tensor([3.5], dtype=dt), pooled_projections=pooled,
                                 encoder_hidden_states=text, txt_ids=txt_ids, img_ids=img_ids, return_dict=False)[0]
            x = (x.float() + (sig[i + 1] - sig[i]) * v.float()).to(dt)
        return x


class DreamSampler:
    """Dream's masked-diffusion sampling loop: a prompt and gen_tokens masked tokens; each step
    predicts every masked token with bidirectional attention and unmasks the most confident ones."""

    def __init__(self, model, prompt_tokens: int, gen_tokens: int) -> None:
        self.model = model
        self.prompt_tokens = prompt_tokens
        self.gen_tokens = gen_tokens

    def __call__(self, seed: int, num_inference_steps: int):
        import torch

        g = torch.Generator().manual_seed(seed)
        prompt = torch.randint(0, 150000, (1, self.prompt_tokens), generator=g)
        ids = torch.cat([prompt, torch.full((1, self.gen_tokens), DREAM_MASK_ID)], 1)
        n = ids.shape[1]
        full = torch.ones(1, 1, n, n, dtype=torch.bool)  # bidirectional attention, as Dream's
        for s in range(num_inference_steps):
            logits = self.model(input_ids=ids, attention_mask={"full_attention": full}).logits
            masked = ids[0] == DREAM_MASK_ID
            k = int(masked.sum()) // (num_inference_steps - s)
            conf, tok = logits[0].float().softmax(-1).max(-1)
            conf[~masked] = -1
            pick = conf.topk(k).indices
            ids[0, pick] = tok[pick]
        return ids


def record(args: argparse.Namespace) -> dict:
    import torch

    from arrow_quant_v2.calibration import record_pipeline

    torch.set_num_threads(os.cpu_count() or 1)
    root = os.path.join(args.work, "model")
    t0 = time.time()
    if args.model == "flux":
        from diffusers import FluxTransformer2DModel

        model = FluxTransformer2DModel.from_pretrained(root, torch_dtype=torch.bfloat16).eval()
        pipe = FluxSampler(model, args.text_tokens)
        extra = {}
    else:
        from transformers import Qwen2ForCausalLM

        model = Qwen2ForCausalLM.from_pretrained(root, torch_dtype=torch.bfloat16).eval()
        pipe = DreamSampler(model, args.prompt_tokens, args.gen_tokens)
        extra = dict(step_kind="mask_ratio", step_arg=lambda a, kw: (kw["input_ids"] == DREAM_MASK_ID).float().mean())
    load_s = time.time() - t0
    after_load = {"rss_gib": rss_now_gib(), "peak_rss_gib": peak_rss_gib()}
    out = os.path.join(root, "calibration.parquet")
    t0 = time.time()
    progress = progress_printer(t0)

    rec = record_pipeline(pipe, [{"seed": s} for s in range(args.runs)], num_inference_steps=args.steps,
                          max_samples=args.runs * args.steps, num_bins=args.steps, holdout_every=2, hessian_bins=1,
                          holdout_hessians=False, input_samples=32, fit_input_samples=0,
                          max_memory=int(args.max_memory_gib * 2 ** 30), output_path=out,
                          progress_callback=progress, progress=False, **extra)
    seconds = time.time() - t0
    import pyarrow.parquet as pq

    meta = pq.read_metadata(out)
    # disk per layer (the rows' compressed sizes), to extrapolate per block
    t = pq.read_table(out, columns=["layer"])
    per_layer: dict = {}
    for i, name in enumerate(t.column("layer").to_pylist()):
        per_layer[name] = per_layer.get(name, 0) + meta.row_group(i).total_byte_size
    return {"load_seconds": load_s, "after_load": after_load, "seconds": seconds, "hook_seconds": rec.hook_seconds,
            "passes": rec.passes, "calls": rec.calls, "recorded_calls": rec.recorded_calls,
            "layers": len(rec.layers), "shared_inputs": len(rec.shared_inputs),
            "hessian_blocks": rec.hessian_blocks, "file_bytes": os.path.getsize(out), "file_rows": meta.num_rows,
            "layer_bytes": per_layer, "peak_rss_gib": peak_rss_gib()}


def block_of(model: str, tensor: str) -> str:
    """The block a tensor belongs to ('double', 'single', 'layer'), or '' outside the blocks."""
    head = tensor.split(".")[0]
    return {"transformer_blocks": "double", "single_transformer_blocks": "single"}.get(head, "") if model == "flux" \
        else ("layer" if tensor.startswith("model.layers.") else "")


def quantize(args: argparse.Namespace) -> dict:
    import arrow_quant_v2 as aq

    src = os.path.join(args.work, "model")
    dst = os.path.join(args.work, args.scheme or f"w{args.bits}")
    if os.path.exists(dst):
        import shutil
        shutil.rmtree(dst)
    kw = dict(scheme=args.scheme) if args.scheme else dict(bit_width=args.bits, group_size=128)
    cfg = aq.DiffusionQuantConfig(calibration_path=os.path.join(src, "calibration.parquet"), **kw)
    t0 = time.time()
    r = aq.ArrowQuantV2().quantize_diffusion_model(src, dst, cfg)
    seconds = time.time() - t0
    linear = [l for l in r["layers"] if block_of(args.model, l["tensor"]) and l["tensor"].endswith(".weight")
              and len(l.get("shape", [0, 0])) == 2]
    calibrated, groups, methods = layer_summary(linear)
    blocked = [l["tensor"] for l in linear if l.get("hessian_block")]
    blocked_err = [statistics.median(g["relative_error"] for g in l["output_error"]) for l in linear
                   if l.get("hessian_block") and l.get("output_error")]
    full_err = [statistics.median(g["relative_error"] for g in l["output_error"]) for l in linear
                if not l.get("hessian_block") and l.get("output_error")]
    checked_on = sorted({g.get("checked_on", "") for l in calibrated for g in l["output_error"]})
    return {"seconds": seconds, "peak_rss_gib": peak_rss_gib(), "block_linear_layers": len(linear),
            "block_linear_calibrated": len(calibrated), "methods": methods, "groups": groups,
            "block_diagonal_layers": len(blocked), "block_diagonal_median_error": statistics.median(blocked_err)
            if blocked_err else None, "full_hessian_median_error": statistics.median(full_err) if full_err else None,
            "checked_on": checked_on, "layers_gptq": r["calibration"]["layers_gptq"],
            "compression_ratio": r.get("compression_ratio"),
            "bits_per_weight": sum(l.get("bits_per_weight", 16.0) * l["shape"][0] * l["shape"][1] for l in linear)
            / max(1, sum(l["shape"][0] * l["shape"][1] for l in linear)),
            "warnings": len(r.get("warnings", [])), "warning_sample": r.get("warnings", [])[:5]}


def child(stage: str, argv: list) -> dict:
    p = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", stage] + argv, stdout=subprocess.PIPE,
                       text=True)
    if p.returncode != 0:
        raise SystemExit(f"stage {stage} failed ({p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def table(args: argparse.Namespace, results: dict) -> None:
    rec, q, st = results.get("record"), results.get("quantize"), results.get("setup", {})
    if args.scheme:
        q = results.get(f"quantize_{args.scheme}")
    print("| figure | value |\n|---|---|")
    if st.get("params"):
        print(f"| parameters | {st['params'] / 1e9:.2f} B |")
    if rec:
        fwd = rec["seconds"] - rec["hook_seconds"]
        print(f"| recording peak RSS (fresh process, bf16 model loaded: {rec['after_load']['rss_gib']:.2f} GiB) | "
              f"{rec['peak_rss_gib']:.2f} GiB |")
        print(f"| calibration.parquet | {rec['file_bytes'] / 2 ** 30:.2f} GiB ({rec['file_rows']} rows, "
              f"{len(rec['hessian_blocks'])} layers with block-diagonal Hessians) |")
        print(f"| recording time | {rec['seconds']:.0f} s: statistics (own work) {rec['hook_seconds']:.0f} s, forwards "
              f"and sampling loop {fwd:.0f} s, {len(rec['passes'])} passes, {rec['recorded_calls']} calls |")
    if q:
        what = args.scheme or f"W{args.bits}"
        print(f"| calibrated {what} quantize | {q['seconds']:.0f} s, peak RSS {q['peak_rss_gib']:.2f} GiB, "
              f"{q.get('bits_per_weight') or float('nan'):.2f} bits/weight |")
        print(f"| block linear layers calibrated | {q['block_linear_calibrated']} / {q['block_linear_layers']} "
              f"({q['methods']}); {q['block_diagonal_layers']} on block-diagonal Hessians |")
        if q["block_diagonal_median_error"] is not None:
            print(f"| median output error (held-out, per layer median over groups) | block-diagonal layers "
                  f"{q['block_diagonal_median_error']:.4f}, full-Hessian layers {q['full_hessian_median_error']:.4f} |")
        for g in q["groups"]:
            print(f"| output error, group {g['group']} ({g['steps'][0]:.2f}-{g['steps'][1]:.2f}) | median "
                  f"{g['median_rel_error']:.4f}, max {g['max_rel_error']:.4f} over {g['layers']} layers |")
    if args.model == "flux" and rec:
        # per-block disk, extrapolated to Flux-dev's 19 + 38 blocks (stated as an extrapolation)
        per = {"double": [], "single": []}
        for name, b in rec["layer_bytes"].items():
            kind = block_of("flux", name)
            if kind:
                per[kind].append((int(name.split(".")[1]), b))
        sizes = {}
        for kind, rows in per.items():
            by_block: dict = {}
            for i, b in rows:
                by_block[i] = by_block.get(i, 0) + b
            sizes[kind] = statistics.mean(by_block.values()) if by_block else 0
        nd, ns = FLUX_DEV_BLOCKS
        print(f"| calibration per block (extrapolation) | double {sizes['double'] / 2 ** 30:.2f} GiB, single "
              f"{sizes['single'] / 2 ** 30:.2f} GiB: {nd} + {ns} blocks ~ "
              f"{(nd * sizes['double'] + ns * sizes['single']) / 2 ** 30:.1f} GiB |")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", choices=("flux", "dream"), required=True)
    ap.add_argument("--work")
    ap.add_argument("--double", type=int, default=2, help="Flux double-stream blocks (Flux-dev: 19)")
    ap.add_argument("--single", type=int, default=4, help="Flux single-stream blocks (Flux-dev: 38)")
    ap.add_argument("--text-tokens", type=int, default=128, help="Flux: T5 tokens")
    ap.add_argument("--prompt-tokens", type=int, default=32, help="Dream: prompt tokens")
    ap.add_argument("--gen-tokens", type=int, default=32, help="Dream: generated (masked) tokens")
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--max-memory-gib", type=float, default=2.0, help="Hessians held at once while recording")
    ap.add_argument("--bits", type=int, default=4)
    ap.add_argument("--scheme", help="quantize with this scheme instead (e.g. q4_k: GPTQ on ggml's grid); results "
                                     "under quantize_SCHEME")
    ap.add_argument("--stages", default="setup,record,quantize")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.work = args.work or f"/tmp/aq-bench-{args.model}"
    if args.child:
        print(json.dumps({"setup": setup, "record": record, "quantize": quantize}[args.child](args)))
        return
    argv = [a for a in sys.argv[1:]]
    if "--work" not in argv:
        argv += ["--work", args.work]
    os.makedirs(args.work, exist_ok=True)
    path = os.path.join(args.work, "results.json")
    results = json.load(open(path)) if os.path.exists(path) else {}
    for stage in args.stages.split(","):
        print(f"== {stage}", file=sys.stderr, flush=True)
        r = child(stage, argv)
        key = f"quantize_{args.scheme}" if stage == "quantize" and args.scheme else stage
        if not r.get("skipped"):
            results[key] = r
            results[key]["args"] = {k: v for k, v in vars(args).items() if k not in ("child", "stages")}
        with open(path, "w") as f:
            json.dump(results, f, indent=1)
    table(args, results)


if __name__ == "__main__":
    main()
