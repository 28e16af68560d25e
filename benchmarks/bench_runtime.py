"""The PyTorch runtime at real size (issue 12): memory and step time of quantized diffusers
pipelines whose weights stay packed, against the same pipelines in bf16.

Pipelines (random init, diffusers classes, bf16, built offline):
  dit   DiTPipeline with DiT-XL/2's transformer (28 blocks, width 1152, 675 M parameters) and the
        SD VAE's shape; 256x256 images (32x32 latents, 256 tokens), class-conditional
  sd15  StableDiffusionPipeline with SD 1.5's UNet (860 M), CLIP-L-shaped text encoder (123 M) and
        the SD VAE; 256x256 images (prompt embeddings from token ids: no tokenizer offline)

Each pipeline's denoiser is quantized with the `local` profile. Every measurement runs in a
fresh process (peak RSS is that process's ru_maxrss):
  bf16     the source pipeline, DiffusionPipeline.from_pretrained(torch_dtype=bfloat16)
  runtime  arrow_quant_v2.runtime.load_pipeline(quantized directory)
  dequant  the source pipeline with the quantized model's dequantized weights loaded into it
           (the image the runtime must reproduce)
  runtime-all  (on request) every component quantized (text encoder and VAE too), run by the runtime
Batch 1, no classifier-free guidance (guidance_scale 1), DDIM, the same seed; the step time is the
median denoiser call after the first.

    python benchmarks/bench_runtime.py [--work /tmp/aq-bench-runtime] [--models dit sd15] [--steps 5]
    python benchmarks/bench_runtime.py --layers     # per-layer decode cost, and torch's int4 kernel
    python benchmarks/bench_runtime.py --paired --steps 10   # step times side by side in one process
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

import numpy as np


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20


def rss_now_gib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 30


def build(work: str, model: str) -> str:
    import torch
    from diffusers import AutoencoderKL, DDIMScheduler

    src = os.path.join(work, model, "source")
    if os.path.exists(os.path.join(src, "model_index.json")):
        return src
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, sample_size=256, layers_per_block=2,
                        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                        up_block_types=("UpDecoderBlock2D",) * 4).to(torch.bfloat16)
    scheduler = DDIMScheduler(num_train_timesteps=1000)
    if model == "dit":
        from diffusers import DiTPipeline, DiTTransformer2DModel

        transformer = DiTTransformer2DModel(num_attention_heads=16, attention_head_dim=72, in_channels=4,
                                            out_channels=8, num_layers=28, sample_size=32, patch_size=2,
                                            num_embeds_ada_norm=1000, norm_type="ada_norm_zero").to(torch.bfloat16)
        pipe = DiTPipeline(transformer=transformer, vae=vae, scheduler=scheduler)
    else:
        from diffusers import StableDiffusionPipeline, UNet2DConditionModel
        from transformers import CLIPTextConfig, CLIPTextModel

        unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(torch.bfloat16)
        text = CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072,
                                            num_hidden_layers=12, num_attention_heads=12, max_position_embeddings=77,
                                            hidden_act="quick_gelu")).to(torch.bfloat16)
        pipe = StableDiffusionPipeline(vae=vae, text_encoder=text, tokenizer=None, unet=unet, scheduler=scheduler,
                                       safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    tmp = src + ".tmp"
    pipe.save_pretrained(tmp)
    if model == "sd15":  # diffusers does not write the absent components; from_pretrained wants them
        _null_components(os.path.join(tmp, "model_index.json"), ("tokenizer", "safety_checker", "feature_extractor"))
    os.replace(tmp, src)
    return src


def _null_components(path: str, names) -> None:
    with open(path) as f:
        index = json.load(f)
    index.update({n: [None, None] for n in names})
    with open(path, "w") as f:
        json.dump(index, f, indent=2)


def quantize(work: str, model: str, components: str = "denoiser") -> dict:
    import arrow_quant_v2 as aq

    src = build(work, model)
    out = os.path.join(work, model, "local" if components == "denoiser" else "local-all")
    if os.path.exists(os.path.join(out, "manifest.json")):
        with open(os.path.join(out, "manifest.json")) as f:
            return {"skipped": True, "summary": json.load(f)["summary"]}
    t0 = time.time()
    cfg = aq.DiffusionQuantConfig.from_profile("local")
    if components == "all":
        cfg.components = ["all"]
    r = aq.ArrowQuantV2().quantize_diffusion_model(src, out, cfg)
    schemes: dict = {}
    for layer in r["layers"]:
        if layer["quantized"]:
            schemes[layer["scheme"]] = schemes.get(layer["scheme"], 0) + 1
    return {"seconds": time.time() - t0, "bits_per_weight": r["bits_per_weight"],
            "quantized_bits_per_weight": r["quantized_bits_per_weight"], "schemes": schemes}


DENOISER = {"dit": "transformer", "sd15": "unet"}


def _generate(pipe, model: str, steps: int, seed: int):
    import torch

    den = getattr(pipe, DENOISER[model])
    times = []
    start = {}
    den.register_forward_pre_hook(lambda m, a: start.__setitem__("t", time.perf_counter()))
    den.register_forward_hook(lambda m, a, o: times.append(time.perf_counter() - start["t"]))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if model == "dit":
            img = pipe(class_labels=[207], num_inference_steps=steps, guidance_scale=1.0, generator=g,
                       output_type="np").images
        else:
            ids = torch.randint(0, 49408, (1, 77), generator=torch.Generator().manual_seed(1))
            emb = pipe.text_encoder(ids)[0]
            img = pipe(prompt_embeds=emb, num_inference_steps=steps, guidance_scale=1.0, height=256, width=256,
                       generator=g, output_type="np").images
    return img, times


def run(work: str, model: str, variant: str, steps: int) -> dict:
    import torch

    torch.set_num_threads(os.cpu_count() or 1)
    src = os.path.join(work, model, "source")
    qdir = os.path.join(work, model, "local-all" if variant == "runtime-all" else "local")
    base = {"rss_after_import_gib": rss_now_gib()}
    t0 = time.time()
    if variant.startswith("runtime"):
        from arrow_quant_v2 import runtime

        pipe = runtime.load_pipeline(qdir)
    else:
        from diffusers import DiffusionPipeline

        none = {k: None for k in ("tokenizer", "safety_checker", "feature_extractor")} if model == "sd15" else {}
        pipe = DiffusionPipeline.from_pretrained(src, torch_dtype=torch.bfloat16, **none)
        if variant == "dequant":
            import arrow_quant_v2 as aq

            den = getattr(pipe, DENOISER[model])
            sd = den.state_dict()
            values = {k: v.reshape(sd[k].shape) for k, v in aq.load(qdir).to_torch_state_dict(DENOISER[model]).items()}
            den.load_state_dict(values)
            del sd, values
    load_s = time.time() - t0
    den = getattr(pipe, DENOISER[model])
    out = dict(base, load_s=load_s, rss_after_load_gib=rss_now_gib(), peak_after_load_gib=peak_rss_gib())
    if variant.startswith("runtime"):
        from arrow_quant_v2 import runtime

        out["denoiser_resident"] = runtime.resident_bytes(den)
        out["denoiser_layers"] = len(runtime.packed_layers(den))
    else:
        out["denoiser_resident"] = {"total": sum(p.numel() * p.element_size() for p in den.parameters())
                                    + sum(b.numel() * b.element_size() for b in den.buffers())}
    img, times = _generate(pipe, model, steps, seed=0)
    out.update(step_s=statistics.median(times[1:]) if len(times) > 1 else times[0], step_times=times,
               peak_rss_gib=peak_rss_gib(), rss_end_gib=rss_now_gib())
    if variant.startswith("runtime"):
        from arrow_quant_v2 import runtime

        out["scratch_bytes"] = runtime.scratch_bytes()
    np.save(os.path.join(work, model, f"image-{variant}.npy"), img)
    return out


def layers(work: str) -> dict:
    """Per layer of DiT-XL/2's first block and of the widest SD UNet layers: decode time (bf16,
    both threads) against the bf16 matmul it feeds at the pipeline's token count, and torch's int4
    CPU kernel on the same layer (Q4_K-equivalent groups of 32: scale and offset per group)."""
    import torch
    import torch.nn.functional as F

    from arrow_quant_v2 import runtime

    torch.set_num_threads(os.cpu_count() or 1)
    res = {}
    for model, tokens, prefix in (("dit", 256, "transformer_blocks.0."), ("sd15", 1024, "up_blocks.3.attentions.0.")):
        qdir = os.path.join(work, model, "local")
        den = runtime.load_model(qdir, DENOISER[model])
        rows = []
        for name, st in runtime.packed_layers(den).items():
            if not name.startswith(prefix) or len(st.shape) != 2:
                continue
            n, k = st.shape
            x = torch.randn(tokens, k).to(torch.bfloat16)
            w = st.weight(torch.bfloat16).clone()

            def timed(fn, reps=20):
                fn()
                t = time.perf_counter()
                for _ in range(reps):
                    fn()
                return (time.perf_counter() - t) / reps * 1e3

            dec = timed(lambda: st.weight(torch.bfloat16))
            mm = timed(lambda: F.linear(x, w))
            row = {"layer": name, "shape": [n, k], "scheme": st.scheme, "decode_ms": dec, "matmul_ms": mm,
                   "decode_gw_s": n * k / dec / 1e6}
            if k % 32 == 0 and n % 16 == 0 and hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
                q = torch.randint(0, 16, (n, k), dtype=torch.int32)
                packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
                sz = torch.randn(k // 32, n, 2).to(torch.bfloat16)
                row["int4mm_ms"] = timed(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz))
            rows.append(row)
        res[model] = rows
    return res


def paired(work: str, model: str, calls: int) -> dict:
    """The denoiser alone, bf16 and runtime in one process, called alternately on the same input
    (this machine's speed drifts from minute to minute): median of each, and their ratio."""
    import torch
    from diffusers import DiTTransformer2DModel, UNet2DConditionModel

    from arrow_quant_v2 import runtime

    torch.set_num_threads(os.cpu_count() or 1)
    cls = DiTTransformer2DModel if model == "dit" else UNet2DConditionModel
    dense = cls.from_pretrained(os.path.join(work, model, "source", DENOISER[model]), torch_dtype=torch.bfloat16)
    packed = runtime.load_model(os.path.join(work, model, "local"), DENOISER[model])
    g = torch.Generator().manual_seed(0)
    if model == "dit":
        args = (torch.randn(1, 4, 32, 32, generator=g).to(torch.bfloat16),)
        kwargs = {"timestep": torch.tensor([500]), "class_labels": torch.tensor([207])}
    else:
        args = (torch.randn(1, 4, 32, 32, generator=g).to(torch.bfloat16), torch.tensor([500]))
        kwargs = {"encoder_hidden_states": torch.randn(1, 77, 768, generator=g).to(torch.bfloat16)}
    times = {"bf16": [], "runtime": []}
    with torch.no_grad():
        for i in range(calls + 1):
            for name, m in (("bf16", dense), ("runtime", packed)):
                t = time.perf_counter()
                m(*args, **kwargs)
                if i:  # the first call of each pages weights in / sizes buffers
                    times[name].append(time.perf_counter() - t)
    med = {k: statistics.median(v) for k, v in times.items()}
    ratios = [r / b for b, r in zip(times["bf16"], times["runtime"])]
    return {"median_s": med, "ratio_of_medians": med["runtime"] / med["bf16"],
            "median_pair_ratio": statistics.median(ratios), "times": times}


def child(stage: str, common: list, rest: tuple = ()) -> dict:
    r = subprocess.run([sys.executable, __file__] + common + ["--child", stage, *rest], capture_output=True, text=True)
    if r.returncode != 0:
        sys.stderr.write(r.stderr)
        raise SystemExit(f"stage {stage} failed")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", default="/tmp/aq-bench-runtime")
    ap.add_argument("--models", nargs="+", default=["dit", "sd15"], choices=["dit", "sd15"])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--variants", nargs="+", default=["bf16", "runtime", "dequant"],
                    help="also: runtime-all (every component quantized, the pipeline run by the runtime)")
    ap.add_argument("--layers", action="store_true")
    ap.add_argument("--paired", action="store_true",
                    help="step time only: bf16 and runtime denoisers called alternately in one process")
    ap.add_argument("--child", nargs="+")
    args = ap.parse_args()
    if args.child:
        stage, rest = args.child[0], args.child[1:]
        if stage == "quantize":
            out = quantize(args.work, rest[0], rest[1] if len(rest) > 1 else "denoiser")
        elif stage == "run":
            out = run(args.work, rest[0], rest[1], args.steps)
        elif stage == "paired":
            out = paired(args.work, rest[0], args.steps)
        else:
            out = layers(args.work)
        print(json.dumps(out))
        return
    os.makedirs(args.work, exist_ok=True)
    common = ["--work", args.work, "--steps", str(args.steps)]
    if args.layers:
        print(json.dumps(child("layers", common), indent=1))
        return
    if args.paired:
        print(json.dumps({m: child("paired", common, (m,)) for m in args.models}, indent=1))
        return
    results = {}
    for model in args.models:
        q = child("quantize", common, (model,))
        print(f"{model}: quantized {json.dumps(q)}", file=sys.stderr, flush=True)
        r = {"quantize": q}
        if "runtime-all" in args.variants:
            r["quantize_all"] = child("quantize", common, (model, "all"))
        for v in args.variants:
            r[v] = child("run", common, (model, v))
            print(f"{model} {v}: {json.dumps({k: x for k, x in r[v].items() if k != 'step_times'})}", file=sys.stderr,
                  flush=True)
        results[model] = r
        imgs = {v: np.load(os.path.join(args.work, model, f"image-{v}.npy")) for v in args.variants}
        if "runtime" in imgs and "dequant" in imgs:
            d = np.abs(imgs["runtime"].astype(np.float64) - imgs["dequant"])
            r["image_vs_dequant"] = {"max_abs": float(d.max()), "equal": bool(np.array_equal(imgs["runtime"], imgs["dequant"]))}
        if "runtime" in imgs and "bf16" in imgs:
            d = imgs["runtime"].astype(np.float64) - imgs["bf16"]
            r["image_vs_bf16_rel"] = float(np.linalg.norm(d) / np.linalg.norm(imgs["bf16"]))
    with open(os.path.join(args.work, "results-" + "-".join(args.models + args.variants) + ".json"), "w") as f:
        json.dump(results, f, indent=1)
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
