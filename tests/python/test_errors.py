"""Failures: each raises the documented class with a message naming the culprit, leaves no
staging directories behind, and never touches the input."""

import json
import os
import struct

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import (
    ArrowQuantV2,
    ConfigurationError,
    DiffusionQuantConfig,
    ModelFormatError,
    ModelNotFoundError,
    NonFiniteWeightError,
    UnsupportedFeatureError,
)

from conftest import layer_weights, leftovers, tree_digest, write_model_file


@pytest.fixture
def model_dir(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    arrays = layer_weights(rng, 3)
    write_model_file(src / "model.safetensors", arrays)
    (src / "config.json").write_text(json.dumps({"model_type": "dit"}))
    return src, arrays


def _assert_clean(parent, out):
    assert not os.path.exists(out)
    assert leftovers(parent) == []


def test_missing_model_path_raises_model_not_found_naming_it_and_creates_nothing(tmp_path, quantizer):
    missing = tmp_path / "does-not-exist"
    out = tmp_path / "out"
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ModelNotFoundError) as info:
        quantizer.quantize_diffusion_model(missing, out)
    assert str(missing) in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    _assert_clean(tmp_path, out)
    assert sorted(os.listdir(tmp_path)) == before


def test_output_inside_the_input_directory_is_refused(model_dir, quantizer):
    src, _ = model_dir
    before = tree_digest(src)
    with pytest.raises(ConfigurationError, match="inside"):
        quantizer.quantize_diffusion_model(src, src / "quantized")
    assert tree_digest(src) == before
    assert not os.path.exists(src / "quantized")


def test_output_equal_to_the_input_is_refused(model_dir, quantizer):
    src, _ = model_dir
    before = tree_digest(src)
    with pytest.raises(ConfigurationError):
        quantizer.quantize_diffusion_model(src, src, DiffusionQuantConfig(overwrite=True))
    assert tree_digest(src) == before


def test_output_containing_the_input_is_refused_even_with_overwrite(model_dir, quantizer):
    src, _ = model_dir
    before = tree_digest(src.parent)
    with pytest.raises(ConfigurationError):
        quantizer.quantize_diffusion_model(src, src.parent, DiffusionQuantConfig(overwrite=True))
    assert tree_digest(src.parent) == before


def test_existing_output_is_refused_unless_overwrite(model_dir, tmp_path, quantizer):
    src, _ = model_dir
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(ConfigurationError, match="exists"):
        quantizer.quantize_diffusion_model(src, out)
    assert (out / "keep.txt").read_text() == "precious"
    assert leftovers(tmp_path) == []
    result = quantizer.quantize_diffusion_model(src, out, DiffusionQuantConfig(overwrite=True))
    assert not (out / "keep.txt").exists()
    assert (out / "manifest.json").exists()
    assert len(aq.load(out)) == 3
    assert result["errors"] == []
    assert leftovers(tmp_path) == []


def test_existing_file_as_output_is_refused_even_with_overwrite(model_dir, tmp_path, quantizer):
    src, _ = model_dir
    out = tmp_path / "a-file"
    out.write_text("x")
    with pytest.raises(ConfigurationError):
        quantizer.quantize_diffusion_model(src, out, DiffusionQuantConfig(overwrite=True))
    assert out.read_text() == "x"


def _corrupt_truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 100])


def _corrupt_header_length(path):
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) + 10)
    path.write_bytes(bytes(data))


def _corrupt_tiny(path):
    path.write_bytes(b"\x01\x02\x03")


def _corrupt_not_json(path):
    body = b"{not json at all"
    path.write_bytes(struct.pack("<Q", len(body)) + body)


def _corrupt_overlapping(path):
    header = {"a.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
              "b.weight": {"dtype": "F32", "shape": [4, 4], "data_offsets": [32, 96]}}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00" * 96)


def _corrupt_shape_mismatch(path):
    header = {"a.weight": {"dtype": "F32", "shape": [4, 5], "data_offsets": [0, 64]}}
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + b"\x00" * 64)


@pytest.mark.parametrize("corrupt", [_corrupt_truncated, _corrupt_header_length, _corrupt_tiny, _corrupt_not_json,
                                     _corrupt_overlapping, _corrupt_shape_mismatch],
                         ids=lambda f: f.__name__[len("_corrupt_"):])
def test_corrupted_safetensors_raises_model_format_error_naming_the_file(model_dir, tmp_path, quantizer, corrupt):
    src, _ = model_dir
    weights = src / "model.safetensors"
    corrupt(weights)
    before = tree_digest(src)
    out = tmp_path / "out"
    with pytest.raises(ModelFormatError) as info:
        quantizer.quantize_diffusion_model(src, out)
    assert str(weights) in str(info.value)
    _assert_clean(tmp_path, out)
    assert tree_digest(src) == before


def test_a_failed_run_creates_no_directories(model_dir, tmp_path, quantizer):
    # "The output appears only when complete": a failing run must not leave the output's
    # parent folders behind either.
    src, _ = model_dir
    _corrupt_truncated(src / "model.safetensors")
    out = tmp_path / "new" / "nested" / "out"
    with pytest.raises(ModelFormatError):
        quantizer.quantize_diffusion_model(src, out)
    assert not (tmp_path / "new").exists()


def test_non_safetensors_checkpoint_is_reported_as_unsupported(tmp_path, quantizer):
    src = tmp_path / "src"
    src.mkdir()
    (src / "pytorch_model.bin").write_bytes(b"\x80\x02not really a pickle")
    with pytest.raises(UnsupportedFeatureError, match="safetensors"):
        quantizer.quantize_diffusion_model(src, tmp_path / "out")
    _assert_clean(tmp_path, tmp_path / "out")


def test_directory_without_weights_raises_model_not_found(tmp_path, quantizer):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    with pytest.raises(ModelNotFoundError):
        quantizer.quantize_diffusion_model(src, tmp_path / "out")
    _assert_clean(tmp_path, tmp_path / "out")


def test_unknown_component_is_a_configuration_error_listing_the_available_ones(demo_pipeline, tmp_path, quantizer):
    before = tree_digest(demo_pipeline)
    with pytest.raises(ConfigurationError) as info:
        quantizer.quantize_diffusion_model(demo_pipeline, tmp_path / "out",
                                           DiffusionQuantConfig(components=["transformer"]))
    assert "transformer" in str(info.value) and "unet" in str(info.value)
    _assert_clean(tmp_path, tmp_path / "out")
    assert tree_digest(demo_pipeline) == before


def _nan_model(tmp_path, rng, bad_value=np.nan):
    src = tmp_path / "src"
    src.mkdir()
    arrays = layer_weights(rng, 3)
    bad = arrays["blocks.1.linear.weight"]
    bad[5, 7] = bad_value
    write_model_file(src / "model.safetensors", arrays)
    return src, arrays


@pytest.mark.parametrize("bad_value", [np.nan, np.inf, -np.inf], ids=["nan", "inf", "-inf"])
def test_non_finite_weight_with_fail_fast_raises_naming_the_tensor(tmp_path, rng, quantizer, bad_value):
    src, _ = _nan_model(tmp_path, rng, bad_value)
    before = tree_digest(src)
    out = tmp_path / "out"
    with pytest.raises(NonFiniteWeightError) as info:
        quantizer.quantize_diffusion_model(src, out, DiffusionQuantConfig(fail_fast=True))
    assert "blocks.1.linear.weight" in str(info.value)
    assert "[5, 7]" in str(info.value)
    _assert_clean(tmp_path, out)
    assert tree_digest(src) == before


def test_non_finite_weight_without_fail_fast_is_collected_and_stored_unquantized(tmp_path, rng, quantizer):
    src, arrays = _nan_model(tmp_path, rng)
    before = tree_digest(src)
    out = tmp_path / "out"
    result = quantizer.quantize_diffusion_model(src, out, DiffusionQuantConfig(fail_fast=False))
    assert [e["name"] for e in result["errors"]] == ["blocks.1.linear.weight"]
    assert "blocks.1.linear.weight" in result["errors"][0]["error"]
    assert "blocks.1.linear.weight" in {s["name"] for s in result["skipped"]}
    model = aq.load(out)
    t = model["blocks.1.linear.weight"]
    assert not t.quantized
    loaded = t.numpy()
    np.testing.assert_array_equal(loaded, arrays["blocks.1.linear.weight"])  # NaN at the same place
    assert np.isnan(loaded[5, 7])
    assert model["blocks.0.linear.weight"].quantized and model["blocks.2.linear.weight"].quantized
    assert leftovers(tmp_path) == []
    assert tree_digest(src) == before
    assert quantizer.validate_quality(src, out)["passed"] is True


def test_non_finite_weight_with_nonfinite_keep_is_kept_without_error(tmp_path, rng, quantizer):
    src, arrays = _nan_model(tmp_path, rng)
    out = tmp_path / "out"
    result = quantizer.quantize_diffusion_model(src, out, DiffusionQuantConfig(nonfinite="keep", fail_fast=True))
    assert result["errors"] == []
    skipped = {s["name"]: s["reason"] for s in result["skipped"]}
    assert "non-finite" in skipped["blocks.1.linear.weight"]
    np.testing.assert_array_equal(aq.load(out)["blocks.1.linear.weight"].numpy(), arrays["blocks.1.linear.weight"])


def test_invalid_config_json_from_the_core_is_a_configuration_error(tmp_path, quantizer, model_dir):
    src, _ = model_dir
    # the engine checks its configuration again: bad JSON or a bad value is a ConfigurationError
    with pytest.raises(ConfigurationError):
        aq._core.quantize_model(str(src), str(tmp_path / "out"), json.dumps({"bit_width": 7}), None)
    with pytest.raises(ConfigurationError):
        aq._core.quantize_model(str(src), str(tmp_path / "out"), "not json", None)
    _assert_clean(tmp_path, tmp_path / "out")


def test_input_files_are_unchanged_by_a_successful_run(demo_pipeline, tmp_path, quantizer):
    before = tree_digest(demo_pipeline)
    quantizer.quantize_diffusion_model(demo_pipeline, tmp_path / "out",
                                       DiffusionQuantConfig.from_profile("edge", components=["unet", "vae"]))
    assert tree_digest(demo_pipeline) == before
    assert leftovers(tmp_path) == []
