"""The accuracy fallback: a layer under min_accuracy moves up 2 -> 3 -> 4 -> 8 -> kept."""

import numpy as np
import pyarrow.parquet as pq
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig

from conftest import layer_weights, np_cosine, write_model_file

LADDER = [2, 3, 4, 8]


@pytest.fixture
def gaussian_model(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    arrays = layer_weights(rng, 4, shape=(64, 256))
    arrays["blocks.9.heavy.weight"] = rng.standard_t(3.0, size=(64, 256)).astype(np.float32)
    write_model_file(src / "model.safetensors", arrays)
    return src, arrays


def test_layers_below_min_accuracy_fall_back_to_higher_bits(gaussian_model, tmp_path, quantizer):
    src, arrays = gaussian_model
    out = tmp_path / "out"
    result = quantizer.quantize_diffusion_model(src, out, DiffusionQuantConfig(bit_width=2, min_accuracy=0.99))
    layers = {l["name"]: l for l in result["layers"]}
    fallbacks = {f["name"]: f for f in result["fallbacks"]}
    assert set(fallbacks) == set(arrays)  # 2-bit Gaussian weights never reach 0.99
    model = aq.load(out)
    rows = {r["name"]: r for r in pq.read_table(out / "weights.parquet").to_pylist()}
    for name, f in fallbacks.items():
        rejected = f["rejected_bits"]
        assert rejected[0] == 2
        assert rejected == LADDER[: len(rejected)]  # consecutive rungs of the ladder
        final = f["final"]
        assert final == LADDER[len(rejected)]
        assert layers[name]["bits"] == final and layers[name]["rejected_bits"] == rejected
        assert layers[name]["cosine_similarity"] >= 0.99
        assert model[name].bits == final
        assert rows[name]["rejected_bits"] == rejected
        assert np_cosine(arrays[name], model[name].numpy()) >= 0.99
    assert result["fallback_layers"] == len(fallbacks)
    assert quantizer.validate_quality(src, out)["passed"] is True


def test_every_rejected_rung_was_really_below_min_accuracy(gaussian_model, quantizer):
    _, arrays = gaussian_model
    name = "blocks.0.linear.weight"
    cfg = DiffusionQuantConfig(bit_width=2, min_accuracy=0.99, enable_fallback=False, sensitive_patterns=[])
    for bits in (2, 3):
        q = quantizer.quantize({name: arrays[name]}, config=cfg.replace(bit_width=bits))[name]
        assert q.cosine_similarity < 0.99


def test_without_fallback_layers_keep_two_bits(gaussian_model, tmp_path, quantizer):
    src, arrays = gaussian_model
    out = tmp_path / "out"
    result = quantizer.quantize_diffusion_model(
        src, out, DiffusionQuantConfig(bit_width=2, min_accuracy=0.99, enable_fallback=False))
    assert result["fallbacks"] == []
    for layer in result["layers"]:
        assert layer["bits"] == 2 and layer["rejected_bits"] == []
        assert layer["cosine_similarity"] < 0.99
    assert {aq.load(out)[n].bits for n in arrays} == {2}


def test_an_exhausted_ladder_keeps_the_tensor_unquantized(gaussian_model, tmp_path, quantizer):
    src, arrays = gaussian_model
    out = tmp_path / "out"
    result = quantizer.quantize_diffusion_model(src, out, DiffusionQuantConfig(bit_width=4, min_accuracy=1.0))
    for f in result["fallbacks"]:
        assert f["rejected_bits"] == [4, 8] and f["final"] == "kept"
    assert {f["name"] for f in result["fallbacks"]} == set(arrays)
    model = aq.load(out)
    for name, a in arrays.items():
        assert not model[name].quantized
        np.testing.assert_array_equal(model[name].numpy(), a)
    assert result["compression_ratio"] == pytest.approx(1.0)


def test_in_memory_quantize_applies_the_same_fallback_as_files(gaussian_model, tmp_path, quantizer):
    # QuantizedArray.dequantize() "returns exactly what a saved model would load for the same
    # weights"; with a fallback in play the file holds the fallen-back bits.
    src, arrays = gaussian_model
    cfg = DiffusionQuantConfig(bit_width=2, min_accuracy=0.99)
    out = tmp_path / "out"
    quantizer.quantize_diffusion_model(src, out, cfg)
    model = aq.load(out)
    mem = quantizer.quantize(arrays, config=cfg)
    for name in arrays:
        assert mem[name].bits == model[name].bits, name
        np.testing.assert_array_equal(mem[name].dequantize(), model[name].numpy())
