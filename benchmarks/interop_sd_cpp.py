"""stable-diffusion.cpp generates an image from an SD1.x pipeline whose UNet we quantized and
exported (docs/export.md), beside the same pipeline unquantized and a GGUF of the same UNet made
the way stable-diffusion.cpp users make one (its own `convert`, ggml's quantizer).

Builds an SD 1.5-shaped pipeline (diffusers' UNet2DConditionModel, AutoencoderKL and transformers'
CLIPTextModel with SD 1.5's configurations, random init, float16), quantizes its UNet with the
`local` profile (Q4_K; `--profile edge` Q2_K) keeping its convolution weights in float16 (`skip_patterns`: stable-diffusion.cpp
runs convolutions from F16 weights, so a quantized convolution would only add its error to an
F16-sized tensor; `--quantize-convs` measures that), exports it with `arrow_quant_v2.export_gguf(..., arch="sd1")` (the
original checkpoint's names, which stable-diffusion.cpp detects the model version from) and
generates through stable-diffusion-cpp-python with the same text encoder, VAE, prompt, sampler
and seed as:

- the reference: the float16 UNet under the same names (safetensors);
- ours: the exported GGUF;
- ggml's, same types: stable-diffusion.cpp's `convert` of the reference with a type rule per
  tensor giving it the type our file has (ggml_quantize_chunk): the same file, encoded by ggml;
- ggml's `--type q4_K`: the same converter with one type, the GGUF a stable-diffusion.cpp user
  makes today (layers whose rows do not fit Q4_K's 256-weight blocks stay F16 there; ours are
  IQ4_NL or Q8_0).

Reports each image's relative error and PSNR against the reference, and the files' sizes.
stable-diffusion.cpp runs convolutions from F16 weights in every case (our export writes ggml
convolutions as F16; its converter keeps them F16), so the difference is in the linear layers.

    pip install stable-diffusion-cpp-python    # builds stable-diffusion.cpp (minutes; pip caches the wheel)
    python benchmarks/interop_sd_cpp.py [--work DIR] [--size 256] [--steps 6] [--profile local]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import re
import tempfile
import time
import warnings

import numpy as np
import torch

import arrow_quant_v2 as aq
from arrow_quant_v2.export import _unet_original_names, export_gguf

PROMPT = "a watercolor painting of a lighthouse on a cliff at sunset"


def build(root: str) -> str:
    """The SD 1.5-shaped pipeline directory (unet/, vae/, text_encoder/, model_index.json)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    src = os.path.join(root, "sd15")
    if os.path.exists(os.path.join(src, "model_index.json")):
        return src
    torch.manual_seed(0)
    UNet2DConditionModel(sample_size=64, cross_attention_dim=768, attention_head_dim=8).to(torch.float16) \
        .save_pretrained(os.path.join(src, "unet"))
    AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
                  block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
                  up_block_types=("UpDecoderBlock2D",) * 4).to(torch.float16).save_pretrained(os.path.join(src, "vae"))
    CLIPTextModel(CLIPTextConfig(vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                                 num_attention_heads=12, max_position_embeddings=77, hidden_act="quick_gelu")) \
        .to(torch.float16).save_pretrained(os.path.join(src, "text_encoder"))
    with open(os.path.join(src, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"]}, f)
    return src


def reference(src: str, path: str) -> None:
    """The float16 UNet under the original names our export writes."""
    from safetensors.torch import load_file, save_file

    with open(os.path.join(src, "unet", "config.json")) as f:
        rename = _unet_original_names(json.load(f), os.path.join(src, "unet"))
    state = load_file(os.path.join(src, "unet", "diffusion_pytorch_model.safetensors"))
    save_file({rename(k): v.contiguous() for k, v in state.items()}, path)


def encoders(src: str, path: str) -> None:
    """The text encoder and VAE as one checkpoint (`cond_stage_model.transformer.text_model.*`, and
    `vae.*` diffusers names that stable-diffusion.cpp converts). stable-diffusion.cpp tells SD1 from
    SD2 by the text encoder's width, and picks the text encoder's prefix from the version it detected
    in the files loaded before it: a separate clip_l file after the UNet is taken for Flux's, so the
    encoders go in `model_path`, which loads first."""
    from safetensors.torch import load_file, save_file

    state = {}
    for k, v in load_file(os.path.join(src, "text_encoder", "model.safetensors")).items():
        state["cond_stage_model.transformer." + ("" if k.startswith("text_model.") else "text_model.") + k] = v
    for k, v in load_file(os.path.join(src, "vae", "diffusion_pytorch_model.safetensors")).items():
        state["vae." + k] = v
    save_file(state, path)


def generate(diffusion: str, encoders_path: str, size: int, steps: int, threads: int) -> np.ndarray:
    from stable_diffusion_cpp import StableDiffusion

    sd = StableDiffusion(model_path=encoders_path, diffusion_model_path=diffusion, n_threads=threads, verbose=False)
    image = sd.generate_image(prompt=PROMPT, width=size, height=size, sample_steps=steps, cfg_scale=7.0,
                              sample_method="euler", seed=42)[0]
    del sd
    gc.collect()
    return np.asarray(image.convert("RGB"), dtype=np.float64) / 255.0


def compare(a: np.ndarray, ref: np.ndarray) -> dict:
    mse = float(np.mean((a - ref) ** 2))
    return {"rel_error": float(np.linalg.norm(a - ref) / np.linalg.norm(ref)),
            "psnr_db": float(10 * np.log10(1.0 / mse)) if mse > 0 else float("inf")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", help="working directory (default: a temporary one)")
    ap.add_argument("--size", type=int, default=256, help="image width and height")
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    ap.add_argument("--profile", choices=("edge", "local", "cloud"), default="local",
                    help="the profile the UNet is quantized with (Q2_K, Q4_K, Q8_0 base types)")
    ap.add_argument("--quantize-convs", action="store_true",
                    help="quantize the convolutions too (the export writes them back as F16, with their error)")
    a = ap.parse_args()
    import stable_diffusion_cpp.stable_diffusion_cpp as sdc

    root = a.work or tempfile.mkdtemp(prefix="aq-sdcpp-")
    os.makedirs(root, exist_ok=True)
    src = build(root)
    ref = os.path.join(root, "unet-f16.safetensors")
    if not os.path.exists(ref):
        reference(src, ref)
    enc = os.path.join(root, "text-encoder-vae.safetensors")
    if not os.path.exists(enc):
        encoders(src, enc)

    base_type = {"edge": "Q2_K", "local": "Q4_K", "cloud": "Q8_0"}[a.profile]
    q = os.path.join(root, f"sd15-{a.profile}" + ("" if a.quantize_convs else "-convs-f16"))
    t_quantize = None
    if not os.path.exists(q):
        config = aq.DiffusionQuantConfig.from_profile(a.profile)
        if not a.quantize_convs:
            from safetensors import safe_open

            with safe_open(os.path.join(src, "unet", "diffusion_pytorch_model.safetensors"), "np") as f:
                convs = [k for k in f.keys() if len(f.get_slice(k).get_shape()) == 4]
            config.skip_patterns = ["(" + "|".join(re.escape(k) for k in convs) + ")$"]
        t0 = time.perf_counter()
        aq.ArrowQuantV2().quantize_diffusion_model(src, q, config)
        t_quantize = time.perf_counter() - t0
    ours = os.path.join(root, f"unet-ours-{a.profile}.gguf")
    warnings.filterwarnings("ignore", message=".*more than two dimensions.*")
    r = export_gguf(q, ours, arch="sd1", overwrite=True)

    import gguf

    names = {int(getattr(gguf.GGMLQuantizationType, k)): k for k in ("Q4_K", "IQ4_NL", "Q8_0", "Q6_K", "Q5_K",
                                                                   "Q3_K", "Q2_K", "IQ4_XS")}
    spell = {"Q4_K": "q4_K", "IQ4_NL": "iq4_nl", "Q8_0": "q8_0", "Q6_K": "q6_K", "Q5_K": "q5_K", "Q3_K": "q3_K",
             "Q2_K": "q2_K", "IQ4_XS": "iq4_xs"}
    rules = ",".join(f"^{re.escape(t.name)}$={spell[names[int(t.tensor_type)]]}"
                     for t in gguf.GGUFReader(ours).tensors if int(t.tensor_type) in names)
    peers, t_peer = {}, {}
    for label, out_type, rule in (("ggml, same types", sdc.GGMLType.SD_TYPE_F16, rules),
                                  (f"ggml --type {spell[base_type]}", getattr(sdc.GGMLType, f"SD_TYPE_{base_type}"),
                                   "")):
        peers[label] = os.path.join(root, f"unet-ggml-{'same' if rule else base_type.lower()}-{a.profile}.gguf")
        if os.path.exists(peers[label]):
            os.remove(peers[label])
        t0 = time.perf_counter()
        if not sdc.convert(ref.encode(), b"", peers[label].encode(), int(out_type), rule.encode(), False):
            raise SystemExit("stable-diffusion.cpp's convert failed")
        t_peer[label] = time.perf_counter() - t0

    mine = f"ours ({a.profile}: {base_type})"
    runs = [("reference (F16)", ref), (mine, ours)] + list(peers.items())
    images, times = {}, {}
    for label, path in runs:
        t0 = time.perf_counter()
        images[label] = generate(path, enc, a.size, a.steps, a.threads)
        times[label] = time.perf_counter() - t0
    base = images["reference (F16)"]
    print(f"SD 1.5-shaped pipeline, random init; {a.size}x{a.size}, {a.steps} euler steps, cfg 7, seed 42")
    print(f"quantize ({'done before' if t_quantize is None else f'{t_quantize:.0f} s'}), export {r['seconds']:.1f} s: "
          f"{r['types']}; sd.cpp convert " + ", ".join(f"{k} {v:.1f} s" for k, v in t_peer.items()))
    print(f"{'UNet':<30} {'file MB':>8} {'rel. error':>11} {'PSNR dB':>8} {'generate s':>11}")
    for label, path in runs:
        c = compare(images[label], base)
        print(f"{label:<30} {os.path.getsize(path) / 1e6:8.1f} {c['rel_error']:11.4f} {c['psnr_db']:8.1f} "
              f"{times[label]:11.1f}")
    if float(np.std(base)) < 1e-3:
        raise SystemExit("the reference image is flat: nothing to compare")
    ours_err = compare(images[mine], base)["rel_error"]
    for label in peers:
        print(f"image error ratio ours / {label}: {ours_err / compare(images[label], base)['rel_error']:.2f}")


if __name__ == "__main__":
    main()
