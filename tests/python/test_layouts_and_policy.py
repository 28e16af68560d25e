"""Model discovery (layouts, shard indexes, pipelines with a transformer), modality detection and
the layer policy (overrides, sensitive layers, size threshold)."""

import json
import os
import shutil

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, ConfigurationError, DiffusionQuantConfig, ModelFormatError, ModelNotFoundError

from conftest import file_digest, leftovers, read_safetensors, write_model_file


def _w(rng, shape=(32, 64)):
    return rng.standard_normal(shape).astype(np.float32)


def _write_tree(root, weights=None, texts=None):
    for rel, arrays in (weights or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        write_model_file(root / rel, arrays)
    for rel, obj in (texts or {}).items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(obj if isinstance(obj, str) else json.dumps(obj))


def test_several_safetensors_without_an_index_is_a_format_error(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    _write_tree(src, {"a.safetensors": {"x": _w(rng)}, "b.safetensors": {"y": _w(rng)}})
    with pytest.raises(ModelFormatError, match="index"):
        quantizer.quantize_diffusion_model(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_a_sole_safetensors_file_with_another_name_is_found(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    _write_tree(src, {"weights-v2.safetensors": {"blocks.0.linear.weight": _w(rng)}}, {"config.json": {}})
    result = quantizer.quantize_diffusion_model(src, tmp_path / "out")
    assert [l["name"] for l in result["layers"]] == ["blocks.0.linear.weight"]
    assert not (tmp_path / "out" / "weights-v2.safetensors").exists()


def test_index_naming_a_missing_shard_raises_model_not_found(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    _write_tree(src, {"model-1.safetensors": {"x": _w(rng)}},
                {"model.safetensors.index.json": {"weight_map": {"x": "model-1.safetensors", "y": "model-2.safetensors"}}})
    with pytest.raises(ModelNotFoundError, match="model-2.safetensors"):
        quantizer.quantize_diffusion_model(src, tmp_path / "out")


def test_index_that_misplaces_a_tensor_raises_model_format_error_naming_it(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    _write_tree(src, {"model-1.safetensors": {"x.weight": _w(rng)}, "model-2.safetensors": {"y.weight": _w(rng)}},
                {"model.safetensors.index.json": {"weight_map": {"x.weight": "model-2.safetensors",
                                                                 "y.weight": "model-1.safetensors"}}})
    with pytest.raises(ModelFormatError, match="x.weight|y.weight"):
        quantizer.quantize_diffusion_model(src, tmp_path / "out")
    assert leftovers(tmp_path) == []


def test_index_escaping_the_directory_is_refused(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    _write_tree(src, {"model-1.safetensors": {"x": _w(rng)}},
                {"model.safetensors.index.json": {"weight_map": {"x": "../model-1.safetensors"}}})
    with pytest.raises(ModelFormatError):
        quantizer.quantize_diffusion_model(src, tmp_path / "out")


def test_pipeline_with_a_sharded_transformer_quantizes_it_and_drops_other_variants(tmp_path, rng, quantizer):
    src = tmp_path / "pixart"
    shard1 = "transformer/diffusion_pytorch_model-00001-of-00002.safetensors"
    shard2 = "transformer/diffusion_pytorch_model-00002-of-00002.safetensors"
    _write_tree(
        src,
        {shard1: {"transformer_blocks.0.attn1.to_q.weight": _w(rng)},
         shard2: {"transformer_blocks.1.attn1.to_q.weight": _w(rng)},
         "transformer/diffusion_pytorch_model.fp16.safetensors": {"transformer_blocks.0.attn1.to_q.weight": _w(rng)},
         "vae/diffusion_pytorch_model.safetensors": {"decoder.conv_in.weight": _w(rng)}},
        {"model_index.json": {"_class_name": "PixArtAlphaPipeline",
                              "transformer": ["diffusers", "PixArtTransformer2DModel"],
                              "vae": ["diffusers", "AutoencoderKL"], "scheduler": ["diffusers", "DDIMScheduler"],
                              "safety_checker": [None, None]},
         "transformer/config.json": {"_class_name": "PixArtTransformer2DModel"},
         "transformer/diffusion_pytorch_model.safetensors.index.json": {"weight_map": {
             "transformer_blocks.0.attn1.to_q.weight": os.path.basename(shard1),
             "transformer_blocks.1.attn1.to_q.weight": os.path.basename(shard2)}},
         "vae/config.json": {"_class_name": "AutoencoderKL"},
         "scheduler/scheduler_config.json": {"_class_name": "DDIMScheduler"}})
    out = tmp_path / "out"
    result = quantizer.quantize_diffusion_model(src, out)
    assert [c["name"] for c in result["components"]] == ["transformer"]
    assert result["modality"] == "image"
    assert sorted(l["name"] for l in result["layers"]) == ["transformer/transformer_blocks.0.attn1.to_q.weight",
                                                           "transformer/transformer_blocks.1.attn1.to_q.weight"]
    names = sorted(os.listdir(out / "transformer"))
    assert names == ["config.json", "weights.parquet"]  # no shards, no index, no fp16 variant
    assert file_digest(out / "vae" / "diffusion_pytorch_model.safetensors") == \
        file_digest(src / "vae" / "diffusion_pytorch_model.safetensors")


def test_components_on_a_single_model_directory_is_a_configuration_error(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    _write_tree(src, {"model.safetensors": {"x": _w(rng)}})
    with pytest.raises(ConfigurationError, match="unet"):
        quantizer.quantize_diffusion_model(src, tmp_path / "out", DiffusionQuantConfig(components=["unet"]))


def test_components_all_on_a_single_file_quantizes_it(tmp_path, rng, quantizer):
    path = write_model_file(tmp_path / "m.safetensors", {"blocks.0.linear.weight": _w(rng)})
    result = quantizer.quantize_diffusion_model(path, tmp_path / "out", DiffusionQuantConfig(components=["all"]))
    assert result["layers"][0]["quantized"]


@pytest.mark.parametrize("config,expected", [
    ({"model_type": "llada"}, "text"),
    ({"architectures": ["DreamModel"], "model_type": "Dream"}, "text"),
    ({"_name_or_path": "apple/DiffuCoder-7B-Instruct", "model_type": "Dream"}, "code"),
    ({"_class_name": "AudioLDM2UNet2DConditionModel"}, "audio"),
    ({"_class_name": "DiTTransformer2DModel"}, "image"),
])
def test_modality_is_detected_from_the_config(tmp_path, rng, quantizer, config, expected):
    src = tmp_path / "src"
    _write_tree(src, {"model.safetensors": {"blocks.0.linear.weight": _w(rng)}}, {"config.json": config})
    assert quantizer.quantize_diffusion_model(src, tmp_path / "out")["modality"] == expected


def test_a_stable_diffusion_fine_tune_named_dream_is_still_an_image_model(demo_pipeline, tmp_path, quantizer):
    # Many Stable Diffusion fine-tunes carry "dream" in their repository name (DreamShaper,
    # Dreamlike Photoreal); the UNet2DConditionModel class must decide, not the free-form name.
    src = tmp_path / "dreamshaper"
    shutil.copytree(demo_pipeline, src)
    index = json.loads((src / "model_index.json").read_text())
    index["_name_or_path"] = "Lykon/dreamshaper-8"
    (src / "model_index.json").write_text(json.dumps(index))
    result = quantizer.quantize_diffusion_model(src, tmp_path / "out")
    assert result["modality"] == "image", result["modality_evidence"]


def test_first_matching_bit_override_wins_and_sensitive_16_keeps(tmp_path, rng, quantizer):
    arrays = {"blocks.0.attn.to_q.weight": _w(rng), "blocks.0.attn.to_k.weight": _w(rng),
              "blocks.0.ff.weight": _w(rng), "time_embedding.linear_1.weight": _w(rng),
              "blocks.0.keep.weight": _w(rng)}
    path = write_model_file(tmp_path / "m.safetensors", arrays)
    cfg = DiffusionQuantConfig(bit_overrides={"to_q": 3, "attn": 8, "to_k": 2, "keep": 16},
                               sensitive_bit_width=16, enable_fallback=False)
    result = quantizer.quantize_diffusion_model(path, tmp_path / "out", cfg)
    layers = {l["name"]: l for l in result["layers"]}
    assert layers["blocks.0.attn.to_q.weight"]["bits"] == 3
    assert layers["blocks.0.attn.to_k.weight"]["bits"] == 8  # 'attn' comes before 'to_k'
    assert layers["blocks.0.ff.weight"]["bits"] == 4
    assert not layers["time_embedding.linear_1.weight"]["quantized"]
    assert not layers["blocks.0.keep.weight"]["quantized"]
    model = aq.load(tmp_path / "out")
    np.testing.assert_array_equal(model["blocks.0.keep.weight"].numpy(), arrays["blocks.0.keep.weight"])


def test_sensitive_layers_never_get_fewer_bits_than_the_default(tmp_path, rng, quantizer):
    path = write_model_file(tmp_path / "m.safetensors", {"conv_in.weight": _w(rng), "blocks.0.ff.weight": _w(rng)})
    result = quantizer.quantize_diffusion_model(path, tmp_path / "out",
                                                DiffusionQuantConfig(bit_width=8, sensitive_bit_width=4))
    assert {l["name"]: l["bits"] for l in result["layers"]} == {"conv_in.weight": 8, "blocks.0.ff.weight": 8}


def test_min_tensor_size_is_inclusive(tmp_path, rng, quantizer):
    arrays = {"blocks.0.exact.weight": _w(rng, (16, 64)), "blocks.0.under.weight": _w(rng, (15, 68))}
    path = write_model_file(tmp_path / "m.safetensors", arrays)
    result = quantizer.quantize_diffusion_model(path, tmp_path / "out", DiffusionQuantConfig(min_tensor_size=1024))
    layers = {l["name"]: l for l in result["layers"]}
    assert layers["blocks.0.exact.weight"]["quantized"]        # 1024 weights
    assert not layers["blocks.0.under.weight"]["quantized"]    # 1020 weights


def test_in_memory_quantize_follows_the_same_layer_policy_as_files(tmp_path, rng, quantizer):
    arrays = {"conv_in.weight": _w(rng), "blocks.0.small.weight": _w(rng, (8, 8)), "blocks.0.ff.weight": _w(rng),
              "blocks.0.skip.weight": _w(rng)}
    cfg = DiffusionQuantConfig(bit_width=2, skip_patterns=["skip"], enable_fallback=False)
    path = write_model_file(tmp_path / "m.safetensors", arrays)
    result = quantizer.quantize_diffusion_model(path, tmp_path / "out", cfg)
    mem = quantizer.quantize(arrays, config=cfg)
    for layer in result["layers"]:
        q = mem[layer["name"]]
        assert q.quantized == layer["quantized"]
        assert q.reason == layer["reason"]
        if q.quantized:
            assert q.bits == layer["bits"]


def test_result_reports_threads_and_bits_per_weight(tmp_path, rng, quantizer):
    arrays = {"blocks.0.ff.weight": _w(rng, (64, 128)), "blocks.0.ff.bias": _w(rng, (64,))}
    path = write_model_file(tmp_path / "m.safetensors", arrays)
    result = quantizer.quantize_diffusion_model(path, tmp_path / "out", DiffusionQuantConfig(num_threads=0))
    assert result["num_threads"] == aq._core.hardware_threads() >= 1
    total_weights = sum(a.size for a in arrays.values())
    stored = sum(l["stored_bytes"] for l in result["layers"])
    assert result["bits_per_weight"] == pytest.approx(8 * stored / total_weights, rel=1e-12)
    q = [l for l in result["layers"] if l["quantized"]]
    assert result["quantized_bits_per_weight"] == pytest.approx(
        8 * sum(l["stored_bytes"] for l in q) / sum(np.prod(l["shape"]) for l in q), rel=1e-12)


def test_a_model_of_symlinks_is_copied_inside_the_output(tmp_path):
    """Hugging Face cache snapshots are directories of symlinks into blobs/: the files they name
    are copied into the output (as their content), and nothing is written beside it."""
    import os

    import numpy as np

    from conftest import write_model_file

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    write_model_file(blobs / "w", {"a.weight": np.random.default_rng(0).normal(0, 1, (64, 256)).astype(np.float32)})
    (blobs / "c").write_text('{"architectures": ["X"]}')
    snap = tmp_path / "snapshots" / "abc"
    snap.mkdir(parents=True)
    os.symlink("../../blobs/w", snap / "model.safetensors")
    os.symlink("../../blobs/c", snap / "config.json")
    out = tmp_path / "out" / "q"
    out.parent.mkdir()
    r = aq.ArrowQuantV2().quantize_diffusion_model(snap, out, aq.DiffusionQuantConfig())
    assert (out / "config.json").read_text() == '{"architectures": ["X"]}' and not (out / "config.json").is_symlink()
    assert sorted(os.listdir(out)) == ["config.json", "manifest.json", "weights.parquet"]
    assert sorted(os.listdir(tmp_path)) == ["blobs", "out", "snapshots"] and os.listdir(tmp_path / "out") == ["q"]
    assert sorted(os.listdir(blobs)) == ["c", "w"]
    assert r["layers"][0]["tensor"] == "a.weight"
