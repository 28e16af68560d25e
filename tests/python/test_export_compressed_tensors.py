"""compressed-tensors export (docs/export.md): the checkpoint's quantization_config parses with
compressed-tensors' own models, and its own decompressor restores our affine weights exactly."""

from __future__ import annotations

import json

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ConfigurationError
from arrow_quant_v2.export import export_compressed_tensors

from conftest import write_model_file

torch = pytest.importorskip("torch")
ct = pytest.importorskip("compressed_tensors")
from safetensors.torch import load_file  # noqa: E402


def _model(tmp_path, rng):
    arrays = {
        "layers.0.mlp.up_proj.weight": rng.normal(0, 0.02, (64, 256)).astype(np.float32),
        "layers.0.mlp.down_proj.weight": rng.normal(0, 0.02, (32, 64)).astype(np.float32),
        "layers.0.self_attn.o_proj.weight": rng.normal(0, 0.02, (48, 96)).astype(np.float32),
        "layers.0.input_layernorm.weight": np.ones((256,), np.float32),
    }
    src = tmp_path / "src"
    src.mkdir()
    write_model_file(src / "model.safetensors", arrays)
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 256}))
    (src / "tokenizer.json").write_text("{}")
    return arrays, src


def test_compressed_tensors_restores_our_weights_exactly(tmp_path):
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationConfig

    rng = np.random.default_rng(0)
    arrays, src = _model(tmp_path, rng)
    out = tmp_path / "q"
    # int4 g32 everywhere, the o_proj at 8 bits per channel: two config groups
    aq.ArrowQuantV2().quantize_diffusion_model(src, out, aq.DiffusionQuantConfig(
        bit_width=4, group_size=32, symmetric=True, enable_fallback=False, min_tensor_size=0,
        sensitive_patterns=[], bit_overrides={"o_proj": 8}))
    r = export_compressed_tensors(out, tmp_path / "ct")
    assert r["packed"] == 3 and r["groups"] == {"int4_g32": 2, "int8_g32": 1}
    config = json.loads((tmp_path / "ct" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and (tmp_path / "ct" / "tokenizer.json").exists()
    qc = QuantizationConfig.model_validate(config["quantization_config"])  # their own schema
    assert qc.format == "pack-quantized"
    tensors = load_file(tmp_path / "ct" / "model.safetensors")
    ours = aq.load(out)
    schemes = {t: g for g in qc.config_groups.values() for t in g.targets}
    for name in arrays:
        if name.endswith("layernorm.weight"):
            assert torch.equal(tensors[name], torch.from_numpy(arrays[name]))
            continue
        layer = name[: -len(".weight")]
        state = {k[len(layer) + 1:]: v for k, v in tensors.items() if k.startswith(layer + ".")}
        w = PackedQuantizationCompressor.decompress(state, schemes[layer])["weight"]
        assert np.array_equal(w.numpy(), ours[name].numpy()), name


def test_layers_compressed_tensors_cannot_hold_are_named(tmp_path):
    rng = np.random.default_rng(1)
    _, src = _model(tmp_path, rng)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(src, out, aq.DiffusionQuantConfig(
        bit_width=4, group_size=32, enable_fallback=False, min_tensor_size=0))
    with pytest.raises(ConfigurationError, match=r"up_proj\.weight \(asymmetric codes"):
        export_compressed_tensors(out, tmp_path / "ct")
    rotated = tmp_path / "r"
    aq.ArrowQuantV2().quantize_diffusion_model(src, rotated, aq.DiffusionQuantConfig(
        bit_width=4, group_size=32, symmetric=True, rotate=True, enable_fallback=False, min_tensor_size=0))
    with pytest.raises(ConfigurationError, match=r"up_proj\.weight \(rotated\)"):
        export_compressed_tensors(rotated, tmp_path / "ct")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q", "r", "src"]


def test_export_command_to_compressed_tensors(tmp_path, capsys):
    from arrow_quant_v2.cli import main

    rng = np.random.default_rng(2)
    _, src = _model(tmp_path, rng)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(src, out, aq.DiffusionQuantConfig(
        bit_width=4, group_size=32, symmetric=True, min_tensor_size=0, sensitive_patterns=[]))
    assert main(["export", str(out), str(tmp_path / "ct"), "--to", "compressed-tensors"]) == 0
    assert "packed layers: 3 int4_g32" in capsys.readouterr().out
    assert main(["export", str(out), str(tmp_path / "ct2"), "--to", "compressed-tensors", "--requantize", "q4_k"]) == 2
    assert "--requantize, --arch and --packed-convs apply to --to gguf" in capsys.readouterr().err


def test_a_model_stored_in_pieces_exports_the_checkpoint_of_one_stored_whole(tmp_path):
    """Layers and kept weights are written a stored piece at a time (codes as int32 words, kept
    bfloat16 values as blocks of rows): the checkpoint equals the whole-stored model's byte for
    byte."""
    rng = np.random.default_rng(3)
    arrays = {"model.embed_tokens.weight": rng.normal(0, 0.02, (2048, 64)),  # kept: pieces of bf16 rows
              "layers.0.mlp.up_proj.weight": rng.normal(0, 0.02, (1536, 256)),
              "layers.0.mlp.down_proj.weight": rng.normal(0, 0.02, (256, 1536)),
              "layers.0.input_layernorm.weight": np.ones((256,))}
    src = tmp_path / "src"
    src.mkdir()
    write_model_file(src / "model.safetensors", {k: v.astype(np.float32) for k, v in arrays.items()},
                     dtypes={k: "BF16" for k in arrays})
    (src / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "hidden_size": 256}))
    files = []
    for piece_bytes in (None, 4096):
        extra = {"piece_bytes": piece_bytes} if piece_bytes else {}
        out = tmp_path / f"q-{piece_bytes}"
        aq.ArrowQuantV2().quantize_diffusion_model(src, out, aq.DiffusionQuantConfig(
            bit_width=4, group_size=64, symmetric=True, enable_fallback=False, sensitive_patterns=[],
            skip_patterns=["embed_tokens"], **extra))
        q = aq.load(out)
        assert all(len(q[n].pieces) > 1 for n in arrays if "layernorm" not in n) if piece_bytes \
            else all(len(q[n].pieces) == 1 for n in arrays)
        r = export_compressed_tensors(out, tmp_path / f"ct-{piece_bytes}")
        assert r["packed"] == 2
        files.append(tmp_path / f"ct-{piece_bytes}" / "model.safetensors")
    assert files[0].read_bytes() == files[1].read_bytes()
    kept = load_file(files[1])["model.embed_tokens.weight"]
    assert kept.dtype == torch.bfloat16 and kept.shape == (2048, 64)
