"""GGUF export (docs/export.md): every tensor read back by gguf-py, ggml layers written as their
stored bytes, and a Flux-architecture transformer loaded by diffusers' own GGUF loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ConfigurationError
from arrow_quant_v2.export import export_gguf

from conftest import write_model_file

gguf = pytest.importorskip("gguf")
from gguf.quants import dequantize as gguf_dequantize  # noqa: E402


def _small_model(root, rng):
    arrays = {
        "blocks.0.attn.to_q.weight": rng.normal(0, 0.02, (64, 512)).astype(np.float32),   # Q4_K
        "blocks.0.ff.weight": rng.normal(0, 0.02, (48, 96)).astype(np.float32),           # rows of 96: IQ4_NL
        "blocks.0.conv.weight": rng.normal(0, 0.05, (32, 32, 3, 3)).astype(np.float32),   # 4-D: F16
        "blocks.0.attn.to_q.bias": rng.normal(0, 0.02, (64,)).astype(np.float32),         # F32
        "blocks.0.norm.weight": np.ones((512,), np.float32),
    }
    src = write_model_file(root / "model.safetensors", arrays)
    return arrays, src


def test_every_tensor_reads_back_with_gguf_py(tmp_path):
    rng = np.random.default_rng(0)
    arrays, src = _small_model(tmp_path, rng)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(
        src, out, aq.DiffusionQuantConfig(scheme="q4_k", enable_fallback=False, sensitive_patterns=[]))
    with pytest.warns(UserWarning, match=r"1 tensors of more than two dimensions .* blocks\.0\.conv\.weight"):
        r = export_gguf(out, tmp_path / "m.gguf")
    assert r["tensors"] == len(arrays) and r["copied"] == 2
    assert r["dequantized"] == ["blocks.0.conv.weight"] and r["requantized"] == []
    assert r["types"] == {"Q4_K": 1, "IQ4_NL": 1, "F16": 1, "F32": 2}
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    got = {t.name: t for t in reader.tensors}
    assert sorted(got) == sorted(arrays)
    q = aq.load(out)
    for name, a in arrays.items():
        t = got[name]
        if t.tensor_type in (gguf.GGMLQuantizationType.Q4_K, gguf.GGMLQuantizationType.IQ4_NL):
            w = gguf_dequantize(t.data, t.tensor_type).reshape(a.shape)
            assert np.array_equal(w, q[name].numpy()), name  # the stored bytes, decoded by gguf-py
            assert bytes(t.data.tobytes()) == q[name].packed().codes
        else:
            w = np.asarray(t.data).reshape(a.shape)
            np.testing.assert_array_equal(w, q[name].numpy().astype(w.dtype))
    assert got["blocks.0.attn.to_q.bias"].tensor_type == gguf.GGMLQuantizationType.F32
    assert got["blocks.0.conv.weight"].tensor_type == gguf.GGMLQuantizationType.F16
    assert reader.fields["general.architecture"].contents() == "diffusers"
    assert reader.fields["arrowquant.producer"].contents().startswith("arrow_quant_v2")


def test_affine_layers_are_refused_unless_requantized(tmp_path):
    rng = np.random.default_rng(1)
    arrays, src = _small_model(tmp_path, rng)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(src, out, aq.DiffusionQuantConfig(bit_width=4, group_size=32,
                                                                                 enable_fallback=False))
    with pytest.raises(ConfigurationError, match=r"blocks\.0\.attn\.to_q\.weight \(scheme int4_g32"):
        export_gguf(out, tmp_path / "m.gguf")
    assert not (tmp_path / "m.gguf").exists()
    r = export_gguf(out, tmp_path / "m.gguf", requantize="q4_k")
    # rows of 96 take no 256-weight block: the engine's fallback of about the same size
    assert r["requantized"] == ["blocks.0.attn.to_q.weight", "blocks.0.ff.weight"]
    assert r["types"]["Q4_K"] == 1 and r["types"]["IQ4_NL"] == 1
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    t = next(t for t in reader.tensors if t.name == "blocks.0.attn.to_q.weight")
    w = gguf_dequantize(t.data, t.tensor_type).reshape(64, 512)
    a = aq.load(out)["blocks.0.attn.to_q.weight"].numpy()
    assert np.linalg.norm(w - a) / np.linalg.norm(a) < 0.1  # encoded again from the affine codes' values
    with pytest.raises(ConfigurationError, match="exists"):
        export_gguf(out, tmp_path / "m.gguf", requantize="q4_k")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.gguf", "model.safetensors", "q"]
    src2 = write_model_file(tmp_path / "odd.safetensors", {"odd.weight": rng.normal(0, 0.02, (64, 40)).astype(np.float32)})
    aq.ArrowQuantV2().quantize_diffusion_model(src2, tmp_path / "q2", aq.DiffusionQuantConfig(
        bit_width=4, group_size=0, enable_fallback=False, min_tensor_size=0))
    with pytest.raises(ConfigurationError, match="'odd.weight' has rows of 40 weights; ggml block types need a multiple of 32"):
        export_gguf(tmp_path / "q2", tmp_path / "m2.gguf", requantize="q4_k")
    with pytest.raises(ConfigurationError, match="requantize must be None or a ggml type"):
        export_gguf(out, tmp_path / "m3.gguf", requantize="q4_0")


def test_diffusers_loads_an_exported_flux_transformer(tmp_path):
    """diffusers' own GGUF loader (from_single_file with GGUFQuantizationConfig) on our file: its
    forward equals the same architecture holding our dequantized weights to a relative 5e-3.
    gguf-py decodes our blocks to exactly our values (test above); diffusers dequantizes them in
    float16 arithmetic (d * scale, then * q - dmin * min, each rounded to 11 significant bits: up
    to 2^-11 = 4.9e-4 per weight), which is the whole difference: measured 6.2e-4 (Flux),
    1.6e-3 (SD3, with its positional table as F16), 7.2e-4 (UNet)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    torch.manual_seed(0)
    model = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                   attention_head_dim=64, num_attention_heads=4, joint_attention_dim=256,
                                   pooled_projection_dim=256, guidance_embeds=False, axes_dims_rope=(16, 24, 24)).eval()
    src = tmp_path / "flux"
    model.save_pretrained(src)
    out = tmp_path / "flux-q4k"
    aq.ArrowQuantV2().quantize_diffusion_model(
        src, out, aq.DiffusionQuantConfig(scheme="q4_k", enable_fallback=False, sensitive_patterns=[]))
    r = export_gguf(out, tmp_path / "flux.gguf")
    assert r["config_dir"] is not None and r["copied"] > 0
    loaded = FluxTransformer2DModel.from_single_file(
        str(tmp_path / "flux.gguf"), config=r["config_dir"], torch_dtype=torch.float32,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    ours = FluxTransformer2DModel.from_config(model.config).eval()
    ours.load_state_dict(aq.load(out).to_torch_state_dict(dtype=torch.float32))
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 256, generator=g),
                  pooled_projections=torch.randn(1, 256, generator=g), timestep=torch.tensor([0.5]),
                  img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3))
    with torch.no_grad():
        a = loaded(**inputs).sample
        b = ours(**inputs).sample
    err = float((a - b).norm() / b.norm())
    assert err < 5e-3, err


def test_export_command(tmp_path, capsys):
    from arrow_quant_v2.cli import main

    rng = np.random.default_rng(2)
    _, src = _small_model(tmp_path, rng)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(src, out, aq.DiffusionQuantConfig(scheme="q4_k"))
    assert main(["export", str(out), str(tmp_path / "m.gguf")]) == 0
    text = capsys.readouterr().out
    assert "wrote " in text and "ggml layers written as stored" in text
    assert main(["export", str(out), str(tmp_path / "m.gguf")]) == 2  # exists
    assert "exists; pass overwrite=True" in capsys.readouterr().err
    assert main(["export", str(out), str(tmp_path / "m.gguf"), "--overwrite", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["tensors"] == 5
    # original names need a UNet's (or Flux's) layout: a model without one is refused, by name
    assert main(["export", str(out), str(tmp_path / "o.gguf"), "--arch", "sd1"]) == 2
    assert "UNet2DConditionModel; config.json has None" in capsys.readouterr().err
    assert main(["export", str(out), str(tmp_path / "o.gguf"), "--arch", "flux"]) == 2
    assert "'blocks.0.attn.to_q.weight' has no name in the original flux layout" in capsys.readouterr().err
    assert main(["export", str(out), str(tmp_path / "o.gguf"), "--packed-convs"]) == 2
    assert "packed_convs is ComfyUI-GGUF's layout" in capsys.readouterr().err
    assert not (tmp_path / "o.gguf").exists()


def _diffusers_round_trip(tmp_path, cls, model, inputs, scheme="q4_k", **export_kw):
    """Quantizes `model` (saved with save_pretrained), exports it and loads the GGUF with diffusers'
    loader; returns (relative forward error against our dequantized weights, the export result)."""
    torch = pytest.importorskip("torch")
    from diffusers import GGUFQuantizationConfig

    src = tmp_path / "src"
    model.save_pretrained(src)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(
        src, out, aq.DiffusionQuantConfig(scheme=scheme, enable_fallback=False, sensitive_patterns=[]))
    r = export_gguf(out, tmp_path / "m.gguf", **export_kw)
    loaded = cls.from_single_file(str(tmp_path / "m.gguf"), config=r["config_dir"], torch_dtype=torch.float32,
                                  quantization_config=GGUFQuantizationConfig(compute_dtype=torch.float32))
    ours = cls.from_config(model.config).eval()
    ours.load_state_dict(aq.load(out).to_torch_state_dict(dtype=torch.float32))
    with torch.no_grad():
        a, b = loaded(**inputs).sample, ours(**inputs).sample
    return float((a - b).norm() / b.norm()), r


def test_diffusers_loads_an_exported_sd3_transformer(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                  num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
                                  pooled_projection_dim=256, out_channels=4, pos_embed_max_size=16).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 256, generator=g),
                  pooled_projections=torch.randn(1, 256, generator=g), timestep=torch.tensor([500.0]))
    err, r = _diffusers_round_trip(tmp_path, SD3Transformer2DModel, model, inputs)
    # the positional table (1, 256, 256) is 3-D: written F16; the patch embedding (16 wide) is kept
    assert r["copied"] > 0 and r["dequantized"] == ["pos_embed.pos_embed"]
    assert err < 5e-3, err


def test_diffusers_loads_an_exported_unet(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
                                 block_out_channels=(64, 128), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=256,
                                 attention_head_dim=8, norm_num_groups=32).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 8, 256, generator=g))
    err, r = _diffusers_round_trip(tmp_path, UNet2DConditionModel, model, inputs)
    assert r["copied"] > 0 and len(r["dequantized"]) > 0  # 3x3 convolutions written F16
    assert err < 5e-3, err


@pytest.mark.parametrize("sd35", [False, True])
def test_diffusers_converts_our_sd3_original_layout(tmp_path, sd35):
    """SD3 in its single-file layout (joint_blocks, x_block.attn.qkv joined as stored, the last
    block's context modulation with its halves exchanged), converted back by diffusers' own
    converter; SD 3.5's q/k norms and dual attention (attn2) too."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    extra = dict(qk_norm="rms_norm", dual_attention_layers=(0,)) if sd35 else {}
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=2, attention_head_dim=64,
                                  num_attention_heads=4, joint_attention_dim=256, caption_projection_dim=256,
                                  pooled_projection_dim=256, out_channels=4, pos_embed_max_size=16, **extra).eval()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, 8, 8, generator=g),
                  encoder_hidden_states=torch.randn(1, 8, 256, generator=g),
                  pooled_projections=torch.randn(1, 256, generator=g), timestep=torch.tensor([500.0]))
    err, r = _diffusers_round_trip(tmp_path, SD3Transformer2DModel, model, inputs, arch="sd3")
    names = {t.name for t in gguf.GGUFReader(tmp_path / "m.gguf").tensors}
    p = "model.diffusion_model."
    assert {p + "joint_blocks.1.x_block.attn.qkv.weight", p + "joint_blocks.1.context_block.adaLN_modulation.1.weight",
            p + "pos_embed", p + "final_layer.linear.weight"} <= names
    if sd35:
        assert {p + "joint_blocks.0.x_block.attn2.qkv.weight", p + "joint_blocks.0.x_block.attn.ln_q.weight"} <= names
    assert r["arch"] == "sd3" and r["copied"] > 0
    assert err < 5e-3, err


def _unet(sdxl=False):
    """A UNet2DConditionModel with SD's layout at small width: three levels of two resnets, attention
    on the down path's first two and the up path's last two levels (SDXL: the other way round, and
    the text-time embedding)."""
    from diffusers import UNet2DConditionModel

    kw = dict(sample_size=8, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64, 64),
              cross_attention_dim=64, attention_head_dim=8, norm_num_groups=32)
    if sdxl:
        kw.update(down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
                  up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
                  transformer_layers_per_block=(1, 1, 2), addition_embed_type="text_time",
                  addition_time_embed_dim=8, projection_class_embeddings_input_dim=64 + 6 * 8,
                  use_linear_projection=True)
    else:
        kw.update(down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
                  up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    return UNet2DConditionModel(**kw).eval()


@pytest.mark.parametrize("arch", ["sd1", "sdxl"])
def test_unets_under_original_names_load_in_diffusers(tmp_path, arch):
    """diffusers' single-file loader converts the original (LDM) names back with its own converter:
    every name must be the one it expects, or the state dict does not load."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import UNet2DConditionModel

    torch.manual_seed(0)
    model = _unet(sdxl=arch == "sdxl")
    g = torch.Generator().manual_seed(1)
    inputs = dict(sample=torch.randn(1, 4, 8, 8, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 8, 64, generator=g))
    if arch == "sdxl":
        inputs["added_cond_kwargs"] = dict(text_embeds=torch.randn(1, 64, generator=g),
                                           time_ids=torch.tensor([[8.0, 8.0, 0.0, 0.0, 8.0, 8.0]]))
    err, r = _diffusers_round_trip(tmp_path, UNet2DConditionModel, model, inputs, arch=arch)
    assert r["arch"] == arch and r["copied"] > 0
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    names = {t.name for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == arch
    assert all(n.startswith("model.diffusion_model.") for n in names)
    assert "model.diffusion_model.input_blocks.1.0.in_layers.2.weight" in names
    upsample = "output_blocks.2.1.conv.weight" if arch == "sd1" else "output_blocks.2.2.conv.weight"
    assert f"model.diffusion_model.{upsample}" in names
    if arch == "sdxl":
        assert "model.diffusion_model.label_emb.0.0.weight" in names
    assert err < 5e-3, err


def test_packed_convolutions_follow_comfyui_gguf(tmp_path):
    """With packed_convs, ggml convolutions keep their stored bytes as a 2-D tensor and their shape
    in comfy.gguf.orig_shape.<name> (an INT32 array, torch order), which ComfyUI-GGUF's loader
    reshapes the decoded tensor to."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    src = tmp_path / "src"
    _unet().save_pretrained(src)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(
        src, out, aq.DiffusionQuantConfig(scheme="q4_k", enable_fallback=False, sensitive_patterns=[]))
    r = export_gguf(out, tmp_path / "m.gguf", arch="sd1", packed_convs=True)
    assert r["dequantized"] == []
    q = aq.load(out)
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    packed = 0
    for t in reader.tensors:
        field = reader.get_field(f"comfy.gguf.orig_shape.{t.name}")
        if field is None:
            continue
        assert field.types == [gguf.GGUFValueType.ARRAY, gguf.GGUFValueType.INT32]
        shape = tuple(int(field.parts[i][0]) for i in field.data)
        w = gguf_dequantize(t.data, t.tensor_type).reshape(shape)
        packed += 1
        if t.name == "model.diffusion_model.input_blocks.1.0.in_layers.2.weight":
            ours = q["down_blocks.0.resnets.0.conv1.weight"]  # a single-model directory: no component
            assert shape == tuple(ours.shape) and np.array_equal(w, ours.numpy())
            assert bytes(t.data.tobytes()) == ours.packed().codes
    convs = [n for n in q.tensor_names() if len(q[n].shape) == 4 and q[n].quantized]
    assert packed == len(convs) > 10
    with pytest.raises(ConfigurationError, match="packed_convs"):
        export_gguf(out, tmp_path / "x.gguf", packed_convs=True)


def _flux(width_heads, head_dim, joint=64):
    from diffusers import FluxTransformer2DModel

    return FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                  attention_head_dim=head_dim, num_attention_heads=width_heads,
                                  joint_attention_dim=joint, pooled_projection_dim=joint,
                                  guidance_embeds=True).eval()


def _flux_inputs(torch, joint=64):
    g = torch.Generator().manual_seed(1)
    return dict(hidden_states=torch.randn(1, 16, 16, generator=g),
                encoder_hidden_states=torch.randn(1, 8, joint, generator=g),
                pooled_projections=torch.randn(1, joint, generator=g), timestep=torch.tensor([0.5]),
                img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3), guidance=torch.tensor([3.5]))


def test_flux_original_layout_joins_parts_as_stored(tmp_path):
    """img_attn.qkv / linear1 are their diffusers parts' rows one after the other, bytes as stored;
    final_layer.adaLN_modulation.1 has norm_out.linear's halves exchanged; a part in another type is
    refused unless requantized."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    src = tmp_path / "src"
    _flux(2, 128).save_pretrained(src)  # width 256: Q4_K rows
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(
        src, out, aq.DiffusionQuantConfig(scheme="q4_k", enable_fallback=False, sensitive_patterns=[]))
    r = export_gguf(out, tmp_path / "m.gguf", arch="flux")
    reader = gguf.GGUFReader(tmp_path / "m.gguf")
    got = {t.name: t for t in reader.tensors}
    assert reader.fields["general.architecture"].contents() == "flux"
    p = "model.diffusion_model."
    assert {p + "double_blocks.0.img_attn.qkv.weight", p + "double_blocks.0.txt_attn.qkv.weight",
            p + "single_blocks.0.linear1.weight", p + "single_blocks.0.linear2.weight", p + "img_in.weight",
            p + "final_layer.adaLN_modulation.1.weight", p + "double_blocks.0.img_attn.norm.query_norm.scale",
            p + "guidance_in.in_layer.weight"} <= set(got)
    q = aq.load(out)
    n = lambda name: q[name].numpy()  # noqa: E731
    qkv = got[p + "single_blocks.0.linear1.weight"]
    parts = ["single_transformer_blocks.0.attn.to_q.weight", "single_transformer_blocks.0.attn.to_k.weight",
             "single_transformer_blocks.0.attn.to_v.weight", "single_transformer_blocks.0.proj_mlp.weight"]
    assert bytes(qkv.data.tobytes()) == b"".join(q[x].packed().codes for x in parts)
    w = gguf_dequantize(qkv.data, qkv.tensor_type).reshape(-1, 256)
    assert np.array_equal(w, np.concatenate([n(x) for x in parts]))
    bias = np.asarray(got[p + "double_blocks.0.img_attn.qkv.bias"].data)
    assert np.array_equal(bias, np.concatenate([n(f"transformer_blocks.0.attn.to_{c}.bias") for c in "qkv"]))
    mod = got[p + "final_layer.adaLN_modulation.1.weight"]
    ref = n("norm_out.linear.weight")
    w = gguf_dequantize(mod.data, mod.tensor_type).reshape(ref.shape)
    half = ref.shape[0] // 2
    assert np.array_equal(w, np.concatenate([ref[half:], ref[:half]]))
    assert r["tensors"] == len(q.tensor_names()) - 2 * (2 * 2 + 3)  # weights and biases: two qkv of 3, linear1 of 4

    # one part in another type: refused, naming the joined tensor; requantize joins them
    out2 = tmp_path / "q2"
    aq.ArrowQuantV2().quantize_diffusion_model(
        src, out2, aq.DiffusionQuantConfig(scheme="q4_k", enable_fallback=False, sensitive_patterns=[],
                                           bit_overrides={r"transformer_blocks\.0\.attn\.to_v\.weight$": 8}))
    with pytest.raises(ConfigurationError, match=r"img_attn\.qkv\.weight \(joins"):
        export_gguf(out2, tmp_path / "m2.gguf", arch="flux")
    r2 = export_gguf(out2, tmp_path / "m2.gguf", arch="flux", requantize="q4_k")
    assert p + "double_blocks.0.img_attn.qkv.weight" in r2["requantized"]


@pytest.mark.parametrize("settings,requantize", [({"scheme": "q4_k"}, None), ({"scheme": "q8_0"}, None),
                                                 ({"bit_width": 4, "group_size": 64}, "q4_k"),
                                                 ({"scheme": "entropy"}, "q6_k")],
                         ids=["q4_k", "q8_0", "affine-requantized", "entropy-requantized"])
def test_a_model_stored_in_pieces_exports_the_bytes_of_one_stored_whole(tmp_path, settings, requantize):
    """Export reads a big tensor a stored piece at a time (a block of rows decoded at a time when
    encoding again): the GGUF equals the one from the same model stored whole, byte for byte, for
    layers copied, requantized and dequantized, a kept bfloat16 weight, and Flux's joined and
    half-exchanged tensors."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    torch.manual_seed(0)
    src = tmp_path / "src"
    _flux(2, 128).to(torch.bfloat16).save_pretrained(src)
    cfg = dict(settings, enable_fallback=False, sensitive_patterns=[], skip_patterns=[r"blocks\.0\.ff\.net\.0", "x_embedder"])
    files = []
    for piece_bytes in (None, 4096):
        out = tmp_path / f"q-{piece_bytes}"
        extra = {"piece_bytes": piece_bytes} if piece_bytes else {}
        aq.ArrowQuantV2().quantize_diffusion_model(src, out, aq.DiffusionQuantConfig(**cfg, **extra))
        q = aq.load(out)
        pieced = [n for n in q.tensor_names() if len(q[n].pieces) > 1]
        assert (len(pieced) > 5 and "norm_out.linear.weight" in pieced  # pieces of 256 rows
                and "transformer_blocks.0.ff.net.0.proj.weight" in pieced) if piece_bytes else not pieced
        files.append(tmp_path / f"m-{piece_bytes}.gguf")
        r = export_gguf(out, files[-1], arch="flux", requantize=requantize)
        assert r["tensors"] > 20 and (r["requantized"] if requantize else r["copied"])
    assert files[0].read_bytes() == files[1].read_bytes()
    kept = next(t for t in gguf.GGUFReader(files[1]).tensors if t.name.endswith("double_blocks.0.img_mlp.0.weight"))
    assert kept.tensor_type == gguf.GGMLQuantizationType.BF16


@pytest.mark.parametrize("scheme", ["q8_0"])
def test_diffusers_converts_our_flux_original_layout(tmp_path, scheme):
    """diffusers' own Flux converter (which assumes Flux's width, 3072) splits our joined tensors back:
    one block of each kind at full width (about 0.5 B weights), Q8_0 for a fast encode."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("diffusers")
    from diffusers import FluxTransformer2DModel

    torch.manual_seed(0)
    model = _flux(24, 128).to(torch.bfloat16)
    err, r = _diffusers_round_trip(tmp_path, FluxTransformer2DModel, model, _flux_inputs(torch), scheme=scheme,
                                   arch="flux")
    assert r["arch"] == "flux" and r["copied"] > 0
    assert err < 5e-3, err


def _dream_checkpoint(root, rng):
    """A Dream-architecture checkpoint (Qwen2 layout, Hugging Face names), with a byte-level BPE
    tokenizer.json trained here."""
    tokenizers = pytest.importorskip("tokenizers")
    d, ff, layers, vocab = 256, 512, 2, 320
    arrays = {"model.embed_tokens.weight": rng.normal(0, 0.02, (vocab, d)), "model.norm.weight": np.ones(d),
              "lm_head.weight": rng.normal(0, 0.02, (vocab, d))}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n, shape in (("self_attn.q_proj", (d, d)), ("self_attn.k_proj", (d // 2, d)), ("self_attn.v_proj", (d // 2, d)),
                         ("self_attn.o_proj", (d, d)), ("mlp.gate_proj", (ff, d)), ("mlp.up_proj", (ff, d)),
                         ("mlp.down_proj", (d, ff))):
            arrays[p + n + ".weight"] = rng.normal(0, 0.02, shape)
        for n in ("q_proj", "k_proj", "v_proj"):
            arrays[p + f"self_attn.{n}.bias"] = rng.normal(0, 0.02, arrays[p + f"self_attn.{n}.weight"].shape[:1])
        arrays[p + "input_layernorm.weight"] = np.ones(d)
        arrays[p + "post_attention_layernorm.weight"] = np.ones(d)
    src = root / "dream"
    src.mkdir()
    write_model_file(src / "model.safetensors", {k: v.astype(np.float32) for k, v in arrays.items()})
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>", "<|mask|>"],
                                             initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(["the quick brown fox jumps over the lazy dog"] * 50 + ["diffusion models denoise"] * 50,
                            trainer=trainer)
    tok.save(str(src / "tokenizer.json"))
    mask_id = tok.token_to_id("<|mask|>")
    (src / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>"}))
    (src / "config.json").write_text(json.dumps({
        "architectures": ["DreamModel"], "model_type": "Dream", "hidden_size": d, "num_hidden_layers": layers,
        "intermediate_size": ff, "num_attention_heads": 4, "num_key_value_heads": 2, "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0, "max_position_embeddings": 128, "vocab_size": vocab, "mask_token_id": mask_id,
        "bos_token_id": tok.token_to_id("<|endoftext|>"), "eos_token_id": tok.token_to_id("<|endoftext|>")}))
    return arrays, src, tok


def test_a_dream_model_is_written_as_llama_cpp_reads_it(tmp_path):
    rng = np.random.default_rng(5)
    arrays, src, tok = _dream_checkpoint(tmp_path, rng)
    out = tmp_path / "q"
    aq.ArrowQuantV2().quantize_diffusion_model(src, out, aq.DiffusionQuantConfig(scheme="q4_k", enable_fallback=False))
    r = export_gguf(out, tmp_path / "dream.gguf")  # arch detected from config.json
    assert r["arch"] == "dream"
    reader = gguf.GGUFReader(tmp_path / "dream.gguf")
    f = {k: v.contents() for k, v in reader.fields.items()}
    assert f["general.architecture"] == "dream"
    assert f["dream.block_count"] == 2 and f["dream.embedding_length"] == 256
    assert f["dream.feed_forward_length"] == 512 and f["dream.attention.head_count_kv"] == 2
    assert f["dream.attention.causal"] is False and f["dream.rope.freq_base"] == 1000000.0
    assert f["tokenizer.ggml.model"] == "gpt2" and f["tokenizer.ggml.pre"] == "qwen2"
    tokens = f["tokenizer.ggml.tokens"]
    word = tok.id_to_token(299)  # the trainer's last merge
    assert len(tokens) == 320 and tokens[299] == word and tokens[310] == "[PAD310]"
    types = f["tokenizer.ggml.token_type"]
    assert types[tok.token_to_id("<|mask|>")] == gguf.TokenType.CONTROL and types[310] == gguf.TokenType.UNUSED
    assert len(f["tokenizer.ggml.merges"]) > 0
    assert f["tokenizer.ggml.mask_token_id"] == tok.token_to_id("<|mask|>")
    assert f["tokenizer.ggml.eos_token_id"] == tok.token_to_id("<|endoftext|>")
    names = {t.name: t for t in reader.tensors}
    expected = {"token_embd.weight", "output_norm.weight", "output.weight"} | {
        f"blk.{i}.{n}" for i in range(2) for n in (
            "attn_q.weight", "attn_k.weight", "attn_v.weight", "attn_q.bias", "attn_k.bias", "attn_v.bias",
            "attn_output.weight", "ffn_gate.weight", "ffn_up.weight", "ffn_down.weight", "attn_norm.weight",
            "ffn_norm.weight")}
    assert set(names) == expected
    q = aq.load(out)
    assert bytes(names["blk.1.ffn_down.weight"].data.tobytes()) == q["model.layers.1.mlp.down_proj.weight"].packed().codes
    # transformers 5 writes RoPE's base inside rope_parameters
    cfg = json.loads((out / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_theta": cfg.pop("rope_theta"), "rope_type": "default"}
    (out / "config.json").write_text(json.dumps(cfg))
    export_gguf(out, tmp_path / "dream5.gguf")
    f5 = {k: v.contents() for k, v in gguf.GGUFReader(tmp_path / "dream5.gguf").fields.items()}
    assert f5["dream.rope.freq_base"] == 1000000.0
    cfg["rope_parameters"]["rope_type"] = "yarn"
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigurationError, match="RoPE scaling 'yarn' is not written"):
        export_gguf(out, tmp_path / "dream6.gguf")
    with pytest.raises(ConfigurationError, match="arch .dream. needs the model.s config.json"):
        export_gguf(aq.ArrowQuantV2().quantize_diffusion_model(
            _small_model(tmp_path, rng)[1], tmp_path / "img", aq.DiffusionQuantConfig(scheme="q4_k"))["quantized_path"],
            tmp_path / "x.gguf", arch="dream")
