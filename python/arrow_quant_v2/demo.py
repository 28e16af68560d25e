"""The built-in default model: a small Stable-Diffusion-shaped pipeline in diffusers layout,
generated deterministically, so the main job and the tests need no downloads.

Layout (as diffusers writes it):
    model_index.json                     StableDiffusionPipeline
    unet/config.json, unet/diffusion_pytorch_model.safetensors    UNet2DConditionModel, bf16
    text_encoder/config.json, text_encoder/model.safetensors      CLIPTextModel, bf16
    vae/config.json, vae/diffusion_pytorch_model.safetensors      AutoencoderKL decoder, bf16
    scheduler/scheduler_config.json, tokenizer/{vocab.json, merges.txt, ...}

Tensor names and shapes follow diffusers' UNet2DConditionModel (conv_in, time_embedding,
down_blocks.*.resnets / attentions / downsamplers, mid_block, up_blocks, conv_norm_out, conv_out),
at a width set by ``base_channels``. Values imitate trained weights: fan-in scaled, per-channel
spread, heavy tails in some layers and outlier input channels in attention projections.
"""

from __future__ import annotations

import json
import os
import shutil
import zlib
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from .safetensors_writer import write_safetensors

Spec = Tuple[str, str, Tuple[int, ...]]


def _unet_specs(C: int, ctx: int, dtype: str) -> List[Spec]:
    specs: List[Spec] = []
    temb = 4 * C
    blocks = (C, 2 * C, 4 * C)
    attn = (True, True, False)

    def add(name: str, *shape: int) -> None:
        specs.append((name, dtype, tuple(shape)))

    def norm(p: str, c: int) -> None:
        add(f"{p}.weight", c)
        add(f"{p}.bias", c)

    def conv(p: str, cout: int, cin: int, k: int = 3) -> None:
        add(f"{p}.weight", cout, cin, k, k)
        add(f"{p}.bias", cout)

    def linear(p: str, cout: int, cin: int, bias: bool = True) -> None:
        add(f"{p}.weight", cout, cin)
        if bias:
            add(f"{p}.bias", cout)

    def resnet(p: str, cin: int, cout: int) -> None:
        norm(f"{p}.norm1", cin)
        conv(f"{p}.conv1", cout, cin)
        linear(f"{p}.time_emb_proj", cout, temb)
        norm(f"{p}.norm2", cout)
        conv(f"{p}.conv2", cout, cout)
        if cin != cout:
            conv(f"{p}.conv_shortcut", cout, cin, 1)

    def transformer(p: str, c: int) -> None:
        norm(f"{p}.norm", c)
        linear(f"{p}.proj_in", c, c)
        b = f"{p}.transformer_blocks.0"
        norm(f"{b}.norm1", c)
        for n in ("to_q", "to_k", "to_v"):
            linear(f"{b}.attn1.{n}", c, c, bias=False)
        linear(f"{b}.attn1.to_out.0", c, c)
        norm(f"{b}.norm2", c)
        linear(f"{b}.attn2.to_q", c, c, bias=False)
        linear(f"{b}.attn2.to_k", c, ctx, bias=False)
        linear(f"{b}.attn2.to_v", c, ctx, bias=False)
        linear(f"{b}.attn2.to_out.0", c, c)
        norm(f"{b}.norm3", c)
        linear(f"{b}.ff.net.0.proj", 8 * c, c)  # GEGLU: two halves of 4c
        linear(f"{b}.ff.net.2", c, 4 * c)
        linear(f"{p}.proj_out", c, c)

    conv("conv_in", C, 4)
    linear("time_embedding.linear_1", temb, C)
    linear("time_embedding.linear_2", temb, temb)
    cin = C
    skips = [C]
    for i, (cout, has_attn) in enumerate(zip(blocks, attn)):
        for j in range(2):
            resnet(f"down_blocks.{i}.resnets.{j}", cin, cout)
            if has_attn:
                transformer(f"down_blocks.{i}.attentions.{j}", cout)
            cin = cout
            skips.append(cout)
        if i < len(blocks) - 1:
            conv(f"down_blocks.{i}.downsamplers.0.conv", cout, cout)
            skips.append(cout)
    resnet("mid_block.resnets.0", cin, cin)
    transformer("mid_block.attentions.0", cin)
    resnet("mid_block.resnets.1", cin, cin)
    for i, (cout, has_attn) in enumerate(zip(reversed(blocks), reversed(attn))):
        for j in range(3):
            skip = skips.pop()
            resnet(f"up_blocks.{i}.resnets.{j}", cin + skip, cout)
            if has_attn:
                transformer(f"up_blocks.{i}.attentions.{j}", cout)
            cin = cout
        if i < len(blocks) - 1:
            conv(f"up_blocks.{i}.upsamplers.0.conv", cout, cout)
    norm("conv_norm_out", C)
    conv("conv_out", 4, C)
    return specs


def _text_encoder_specs(width: int, layers: int, vocab: int, dtype: str) -> List[Spec]:
    specs: List[Spec] = [
        ("text_model.embeddings.token_embedding.weight", dtype, (vocab, width)),
        ("text_model.embeddings.position_embedding.weight", dtype, (77, width)),
        ("text_model.embeddings.position_ids", "I64", (1, 77)),
    ]
    for i in range(layers):
        p = f"text_model.encoder.layers.{i}"
        for n in ("q_proj", "k_proj", "v_proj", "out_proj"):
            specs += [(f"{p}.self_attn.{n}.weight", dtype, (width, width)), (f"{p}.self_attn.{n}.bias", dtype, (width,))]
        for n in ("layer_norm1", "layer_norm2"):
            specs += [(f"{p}.{n}.weight", dtype, (width,)), (f"{p}.{n}.bias", dtype, (width,))]
        specs += [(f"{p}.mlp.fc1.weight", dtype, (4 * width, width)), (f"{p}.mlp.fc1.bias", dtype, (4 * width,)),
                  (f"{p}.mlp.fc2.weight", dtype, (width, 4 * width)), (f"{p}.mlp.fc2.bias", dtype, (width,))]
    specs += [("text_model.final_layer_norm.weight", dtype, (width,)),
              ("text_model.final_layer_norm.bias", dtype, (width,))]
    return specs


def _vae_specs(C: int, dtype: str) -> List[Spec]:
    specs: List[Spec] = []

    def conv(p: str, cout: int, cin: int, k: int = 3) -> None:
        specs.extend([(f"{p}.weight", dtype, (cout, cin, k, k)), (f"{p}.bias", dtype, (cout,))])

    conv("post_quant_conv", 4, 4, 1)
    conv("decoder.conv_in", C, 4)
    for i in range(2):
        specs.extend([(f"decoder.up_blocks.{i}.resnets.0.norm1.weight", dtype, (C,)),
                      (f"decoder.up_blocks.{i}.resnets.0.norm1.bias", dtype, (C,))])
        conv(f"decoder.up_blocks.{i}.resnets.0.conv1", C, C)
        conv(f"decoder.up_blocks.{i}.resnets.0.conv2", C, C)
    specs.extend([("decoder.conv_norm_out.weight", dtype, (C,)), ("decoder.conv_norm_out.bias", dtype, (C,))])
    conv("decoder.conv_out", 3, C)
    return specs


def _values(seed: int, name: str, shape: Sequence[int]) -> np.ndarray:
    """Deterministic values for one tensor, independent of the order tensors are made in."""
    rng = np.random.Generator(np.random.PCG64([seed, zlib.crc32(name.encode())]))
    if name.endswith("position_ids"):
        return np.arange(int(np.prod(shape)), dtype=np.int64).reshape(shape)
    leaf = name.rsplit(".", 1)[-1]
    is_norm = any(k in name for k in ("norm", "layer_norm"))
    if len(shape) == 1:
        if is_norm and leaf == "weight":
            return (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    if "embedding" in name and "time_embedding" not in name:
        return (0.02 * rng.standard_normal(shape)).astype(np.float32)
    fan_in = int(np.prod(shape[1:]))
    std = 1.0 / np.sqrt(fan_in)
    heavy = zlib.crc32(name.encode()) % 3 == 0  # a third of the layers have heavy tails
    if heavy:
        w = rng.standard_t(5.0, size=shape).astype(np.float32) * np.float32(std / np.sqrt(5.0 / 3.0))
    else:
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(std)
    # Output channels differ in scale, as in trained networks.
    w *= np.exp(0.3 * rng.standard_normal((shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)
    if any(k in name for k in ("to_q", "to_k", "to_v", "q_proj", "k_proj", "v_proj")):
        cols = rng.choice(shape[1], size=max(1, shape[1] // 100), replace=False)
        w[:, cols] *= 8.0  # outlier input channels
    return w


def _unet_config(C: int, ctx: int) -> Dict[str, object]:
    return {"_class_name": "UNet2DConditionModel", "_diffusers_version": "0.30.0", "sample_size": 32,
            "in_channels": 4, "out_channels": 4, "layers_per_block": 2,
            "block_out_channels": [C, 2 * C, 4 * C], "cross_attention_dim": ctx, "attention_head_dim": 8,
            "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
            "norm_num_groups": 32}


def generate_demo_pipeline(path: "os.PathLike[str] | str", base_channels: int = 64, seed: int = 0,
                           dtype: str = "BF16", overwrite: bool = False) -> Dict[str, object]:
    """Writes the default pipeline to ``path`` and returns a summary (files, tensor and byte
    counts). The same arguments always give byte-identical files."""
    path = os.fspath(path)
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True")
        shutil.rmtree(path)
    C = int(base_channels)
    if C < 32 or C % 32:
        raise ValueError(f"base_channels must be a multiple of 32 (GroupNorm groups), got {base_channels}")
    ctx = 256
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    for d in ("unet", "text_encoder", "vae", "scheduler", "tokenizer"):
        os.makedirs(os.path.join(tmp, d))

    def dump(rel: str, obj: object) -> None:
        with open(os.path.join(tmp, rel), "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=2)
            f.write("\n")

    dump("model_index.json", {
        "_class_name": "StableDiffusionPipeline", "_diffusers_version": "0.30.0",
        "unet": ["diffusers", "UNet2DConditionModel"], "text_encoder": ["transformers", "CLIPTextModel"],
        "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False})
    dump("unet/config.json", _unet_config(C, ctx))
    dump("text_encoder/config.json", {"architectures": ["CLIPTextModel"], "model_type": "clip_text_model",
                                      "hidden_size": ctx, "intermediate_size": 4 * ctx, "num_hidden_layers": 2,
                                      "num_attention_heads": 4, "vocab_size": 4096, "max_position_embeddings": 77,
                                      "torch_dtype": "bfloat16"})
    dump("vae/config.json", {"_class_name": "AutoencoderKL", "_diffusers_version": "0.30.0", "latent_channels": 4,
                             "block_out_channels": [64, 64], "out_channels": 3})
    dump("scheduler/scheduler_config.json", {"_class_name": "DDIMScheduler", "_diffusers_version": "0.30.0",
                                             "num_train_timesteps": 1000, "beta_start": 0.00085, "beta_end": 0.012,
                                             "beta_schedule": "scaled_linear", "clip_sample": False,
                                             "set_alpha_to_one": False, "steps_offset": 1,
                                             "prediction_type": "epsilon"})
    vocab = {f"tok{i}</w>": i for i in range(4094)}
    vocab.update({"<|startoftext|>": 4094, "<|endoftext|>": 4095})
    dump("tokenizer/vocab.json", vocab)
    with open(os.path.join(tmp, "tokenizer/merges.txt"), "w", encoding="utf-8") as f:
        f.write("#version: 0.2\nt o\nto k\n")
    dump("tokenizer/tokenizer_config.json", {"model_max_length": 77, "tokenizer_class": "CLIPTokenizer"})
    dump("tokenizer/special_tokens_map.json", {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>"})

    summary: Dict[str, object] = {"path": path, "components": {}}
    for comp, file, specs in (
        ("unet", "diffusion_pytorch_model.safetensors", _unet_specs(C, ctx, dtype)),
        ("text_encoder", "model.safetensors", _text_encoder_specs(ctx, 2, 4096, dtype)),
        ("vae", "diffusion_pytorch_model.safetensors", _vae_specs(64, dtype)),
    ):
        shapes = {n: s for n, _, s in specs}
        size = write_safetensors(os.path.join(tmp, comp, file), specs, lambda n: _values(seed, n, shapes[n]),
                                 metadata={"format": "pt"})
        summary["components"][comp] = {"tensors": len(specs), "bytes": size,
                                       "weights": int(sum(np.prod(s) for _, _, s in specs))}
    os.replace(tmp, path)
    return summary


def llm_specs(layers: int, hidden: int, intermediate: int, vocab: int, dtype: str = "BF16",
              kv_dim: Optional[int] = None, qkv_bias: bool = False) -> List[Spec]:
    """Tensor names and shapes of a Llama-style transformer as diffusion language models
    (Dream-7B, LLaDA-8B) store it: token embedding, per layer four attention and three MLP
    projections with two RMSNorms, a final norm and the output head. ``kv_dim``: the width of
    the key and value projections under grouped-query attention (Dream-7B: 4 of 28 heads of 128,
    512); ``qkv_bias``: biases on q/k/v (Qwen2-style, as Dream has)."""
    kv = kv_dim or hidden
    specs: List[Spec] = [("model.embed_tokens.weight", dtype, (vocab, hidden))]
    for i in range(layers):
        p = f"model.layers.{i}"
        for n, out in (("q_proj", hidden), ("k_proj", kv), ("v_proj", kv), ("o_proj", hidden)):
            specs.append((f"{p}.self_attn.{n}.weight", dtype, (out, hidden)))
            if qkv_bias and n != "o_proj":
                specs.append((f"{p}.self_attn.{n}.bias", dtype, (out,)))
        specs.append((f"{p}.mlp.gate_proj.weight", dtype, (intermediate, hidden)))
        specs.append((f"{p}.mlp.up_proj.weight", dtype, (intermediate, hidden)))
        specs.append((f"{p}.mlp.down_proj.weight", dtype, (hidden, intermediate)))
        specs.append((f"{p}.input_layernorm.weight", dtype, (hidden,)))
        specs.append((f"{p}.post_attention_layernorm.weight", dtype, (hidden,)))
    specs.append(("model.norm.weight", dtype, (hidden,)))
    specs.append(("lm_head.weight", dtype, (vocab, hidden)))
    return specs


def generate_diffusion_lm(path: "os.PathLike[str] | str", layers: int = 2, hidden: int = 4096,
                          intermediate: int = 11008, vocab: int = 32000, seed: int = 0,
                          overwrite: bool = False, kv_dim: Optional[int] = None,
                          qkv_bias: bool = False) -> Dict[str, object]:
    """Writes a Dream-style diffusion language model in Hugging Face layout (config.json with
    model_type "Dream", model.safetensors in bf16). The default widths are those of a 7B model;
    ``layers`` sets the depth (a 7B model has 28-32)."""
    path = os.fspath(path)
    if os.path.exists(path):
        if not overwrite:
            raise FileExistsError(f"{path} exists; pass overwrite=True")
        shutil.rmtree(path)
    tmp = f"{path}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
        json.dump({"architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": hidden,
                   "intermediate_size": intermediate, "num_hidden_layers": layers, "vocab_size": vocab,
                   "torch_dtype": "bfloat16"}, f, indent=2)
    specs = llm_specs(layers, hidden, intermediate, vocab, kv_dim=kv_dim, qkv_bias=qkv_bias)
    shapes = {n: s for n, _, s in specs}
    size = write_safetensors(os.path.join(tmp, "model.safetensors"), specs, lambda n: _values(seed, n, shapes[n]),
                             metadata={"format": "pt"})
    os.replace(tmp, path)
    return {"path": path, "tensors": len(specs), "bytes": size,
            "weights": int(sum(np.prod(s) for _, _, s in specs))}
