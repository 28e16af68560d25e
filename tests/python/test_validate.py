"""validate_quality: recomputes quality from the files and refuses models that do not match."""

import os
import shutil

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig, ValidationError

from conftest import layer_weights, np_cosine, read_safetensors, write_model_file


@pytest.fixture
def quantized_pair(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    arrays = layer_weights(rng, 4, shape=(64, 160))
    arrays["blocks.0.linear.bias"] = rng.standard_normal(64).astype(np.float32)
    write_model_file(src / "model.safetensors", arrays)
    out = tmp_path / "q"
    result = ArrowQuantV2().quantize_diffusion_model(src, out, DiffusionQuantConfig(bit_width=4, group_size=32))
    return src, out, result, arrays


def test_a_good_model_passes_and_matches_the_quantize_report(quantized_pair, quantizer):
    src, out, result, _ = quantized_pair
    report = quantizer.validate_quality(src, out)
    assert report["passed"] is True
    assert report["failures"] == []
    quantized = {l["name"]: l["cosine_similarity"] for l in result["layers"] if l["quantized"]}
    assert set(report["per_layer_accuracy"]) == set(quantized)
    for name, cos in report["per_layer_accuracy"].items():
        assert cos == pytest.approx(quantized[name], abs=1e-12)
    assert report["compression_ratio"] == pytest.approx(result["compression_ratio"], rel=1e-12)
    assert report["cosine_similarity"] == pytest.approx(result["cosine_similarity"], abs=1e-12)
    kept = [l for l in report["layers"] if not l["quantized"]]
    assert kept and all(l["identical_to_source"] for l in kept)


def test_per_layer_accuracy_is_the_numpy_cosine_of_source_and_loaded(quantized_pair, quantizer):
    src, out, _, arrays = quantized_pair
    report = quantizer.validate_quality(src, out)
    model = aq.load(out)
    for name, cos in report["per_layer_accuracy"].items():
        assert np_cosine(arrays[name], model[name].numpy()) == pytest.approx(cos, abs=1e-9)


def test_pipeline_validates_per_component(demo_pipeline, demo_quantized, quantizer):
    out, result = demo_quantized
    report = quantizer.validate_quality(demo_pipeline, out)
    assert report["passed"] is True
    quantized = {l["name"]: l["cosine_similarity"] for l in result["layers"] if l["quantized"]}
    assert set(report["per_layer_accuracy"]) == set(quantized)
    assert all(k.startswith("unet/") for k in report["per_layer_accuracy"])
    for name, cos in report["per_layer_accuracy"].items():
        assert cos == pytest.approx(quantized[name], abs=1e-12)
    assert report["compression_ratio"] == pytest.approx(result["compression_ratio"], rel=1e-12)


def test_validation_fails_when_layers_are_below_min_accuracy(tmp_path, rng, quantizer):
    src = tmp_path / "src"
    src.mkdir()
    write_model_file(src / "model.safetensors", layer_weights(rng, 3, shape=(64, 128)))
    out = tmp_path / "q"
    quantizer.quantize_diffusion_model(src, out, DiffusionQuantConfig(bit_width=2, min_accuracy=0.99,
                                                                      enable_fallback=False))
    report = quantizer.validate_quality(src, out)
    assert report["passed"] is False
    assert {f["name"] for f in report["failures"]} == set(report["per_layer_accuracy"])
    assert all(c < 0.99 for c in report["per_layer_accuracy"].values())


def _replace_source(src, arrays):
    os.remove(src / "model.safetensors")
    write_model_file(src / "model.safetensors", arrays)


def test_a_tensor_with_a_different_shape_raises_validation_error_naming_it(quantized_pair, quantizer, rng):
    src, out, _, arrays = quantized_pair
    changed = dict(arrays)
    changed["blocks.2.linear.weight"] = rng.standard_normal((64, 128)).astype(np.float32)
    _replace_source(src, changed)
    with pytest.raises(ValidationError, match=r"blocks\.2\.linear\.weight"):
        quantizer.validate_quality(src, out)


def test_a_tensor_missing_from_the_original_raises_validation_error_naming_it(quantized_pair, quantizer):
    src, out, _, arrays = quantized_pair
    changed = {k: v for k, v in arrays.items() if k != "blocks.1.linear.weight"}
    _replace_source(src, changed)
    with pytest.raises(ValidationError, match=r"blocks\.1\.linear\.weight"):
        quantizer.validate_quality(src, out)


def test_an_original_tensor_missing_from_the_quantized_model_raises_validation_error_naming_it(
        quantized_pair, quantizer, rng):
    src, out, _, arrays = quantized_pair
    changed = dict(arrays)
    changed["blocks.9.extra.weight"] = rng.standard_normal((8, 8)).astype(np.float32)
    _replace_source(src, changed)
    with pytest.raises(ValidationError, match=r"blocks\.9\.extra\.weight"):
        quantizer.validate_quality(src, out)


def test_a_different_dtype_raises_validation_error(quantized_pair, quantizer):
    src, out, _, arrays = quantized_pair
    changed = dict(arrays)
    changed["blocks.3.linear.weight"] = arrays["blocks.3.linear.weight"].astype(np.float16)
    _replace_source(src, changed)
    with pytest.raises(ValidationError, match=r"blocks\.3\.linear\.weight"):
        quantizer.validate_quality(src, out)


def test_a_kept_tensor_whose_source_changed_fails_validation(quantized_pair, quantizer):
    src, out, _, arrays = quantized_pair
    changed = dict(arrays)
    changed["blocks.0.linear.bias"] = arrays["blocks.0.linear.bias"] + np.float32(1.0)
    _replace_source(src, changed)
    report = quantizer.validate_quality(src, out)
    assert report["passed"] is False
    assert [f["name"] for f in report["failures"]] == ["blocks.0.linear.bias"]


def test_validating_a_missing_quantized_model_raises_model_not_found(quantized_pair, quantizer, tmp_path):
    src, _, _, _ = quantized_pair
    with pytest.raises(aq.ModelNotFoundError):
        quantizer.validate_quality(src, tmp_path / "nothing-here")


def test_validation_against_another_model_with_the_same_names_reports_low_similarity(quantized_pair, quantizer, rng):
    src, out, _, arrays = quantized_pair
    other = {k: (rng.standard_normal(v.shape).astype(np.float32) if v.ndim == 2 else v) for k, v in arrays.items()}
    _replace_source(src, other)
    report = quantizer.validate_quality(src, out)
    assert report["passed"] is False
    assert all(abs(c) < 0.3 for c in report["per_layer_accuracy"].values())


def test_validation_recomputes_from_the_files_and_catches_altered_codes(quantized_pair, quantizer):
    import pyarrow as pa
    import pyarrow.parquet as pq

    src, out, _, _ = quantized_pair
    path = out / "weights.parquet"
    table = pq.read_table(path)
    rows = table.to_pylist()
    victim = next(r for r in rows if r["encoding"] == "quantized")
    victim["codes"] = bytes(255 - b for b in victim["codes"])  # every code mirrored
    pq.write_table(pa.Table.from_pylist(rows, schema=table.schema), path, row_group_size=1)
    report = quantizer.validate_quality(src, out)
    assert report["passed"] is False
    assert report["per_layer_accuracy"][victim["name"]] < 0.5
    by_name = {l["name"]: l for l in report["layers"]}
    assert by_name[victim["name"]]["matches_recorded"] is False
    others = [l for n, l in by_name.items() if n != victim["name"] and l["quantized"]]
    assert others and all(l["matches_recorded"] for l in others)
    assert [f["name"] for f in report["failures"]] == [victim["name"]]


def test_every_component_of_a_fully_quantized_pipeline_validates(demo_pipeline, demo_quantized_all, quantizer):
    out, result = demo_quantized_all
    report = quantizer.validate_quality(demo_pipeline, out, num_threads=2)
    assert report["passed"] is True
    assert {k.split("/")[0] for k in report["per_layer_accuracy"]} == {"text_encoder", "unet", "vae"}
    assert report["compression_ratio"] == pytest.approx(result["compression_ratio"], rel=1e-12)
    assert report["quantized_layers"] == sum(1 for l in result["layers"] if l["quantized"])
