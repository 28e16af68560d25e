"""ArrowQuantV2.quantize: in-memory arrays (LoRA, ControlNet deltas) to QuantizedArray."""

import math

import numpy as np
import pytest

from arrow_quant_v2 import (
    ArrowQuantV2,
    ConfigurationError,
    DiffusionQuantConfig,
    NonFiniteWeightError,
    QuantizedArray,
)

from conftest import np_cosine, np_relative_error, packed_code_len, reference_decode


@pytest.fixture
def lora(rng):
    return {
        "lora.down.weight": (rng.standard_normal((16, 320)) * 0.01).astype(np.float32),
        "lora.up.weight": (rng.standard_normal((320, 16)) * 0.01).astype(np.float32),
        "controlnet.conv.weight": rng.standard_normal((32, 16, 3, 3)).astype(np.float32),
        "controlnet.conv.bias": rng.standard_normal(32).astype(np.float32),
        "alpha": np.array(8.0, np.float32),
    }


def test_returns_a_quantized_array_per_input_with_its_shape(quantizer, lora):
    out = quantizer.quantize(lora)
    assert list(out) == list(lora)
    for name, a in lora.items():
        q = out[name]
        assert isinstance(q, QuantizedArray)
        assert q.name == name and q.shape == a.shape
        d = q.dequantize()
        assert d.shape == a.shape and d.dtype == np.float32


def test_matrices_are_quantized_close_to_the_source(quantizer, lora):
    out = quantizer.quantize(lora)
    for name in ("lora.down.weight", "lora.up.weight", "controlnet.conv.weight"):
        q = out[name]
        assert q.quantized and q.bits == 4
        assert np_cosine(lora[name], q.dequantize()) > 0.98
        assert q.cosine_similarity == pytest.approx(np_cosine(lora[name], q.dequantize()), abs=1e-9)
        assert q.relative_error == pytest.approx(np_relative_error(lora[name], q.dequantize()), rel=1e-9)


def test_arrays_of_fewer_than_two_dimensions_are_kept_exactly(quantizer, lora):
    out = quantizer.quantize(lora)
    for name in ("controlnet.conv.bias", "alpha"):
        q = out[name]
        assert not q.quantized and q.reason
        assert q.codes is None
        np.testing.assert_array_equal(q.dequantize(), lora[name])
        assert q.nbytes == lora[name].nbytes


def test_kept_arrays_are_copies(quantizer, lora):
    out = quantizer.quantize(lora)
    lora["controlnet.conv.bias"][0] = 1234.0
    assert out["controlnet.conv.bias"].dequantize()[0] != 1234.0


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_bit_width_argument_is_honoured(quantizer, lora, bits):
    name = "lora.down.weight"
    q = quantizer.quantize({name: lora[name]}, bit_width=bits)[name]
    assert q.bits == bits
    assert len(q.codes) == packed_code_len(lora[name].size, bits)


def test_bit_width_argument_overrides_the_config_and_keeps_the_rest(quantizer, lora):
    name = "lora.up.weight"
    # min_accuracy 0: the cloud profile's 0.99 would (rightly) send a 3-bit layer up the fallback ladder
    cfg = DiffusionQuantConfig.from_profile("cloud", scheme="affine", min_accuracy=0.0)
    q = quantizer.quantize({name: lora[name]}, bit_width=3, config=cfg)[name]
    assert (q.bits, q.group_size, q.symmetric) == (3, 0, True)
    assert cfg.bit_width == 8  # the caller's config is not modified


@pytest.mark.parametrize("bits,group,symmetric", [(2, 64, False), (3, 32, True), (4, 128, False), (8, 0, True)])
def test_bits_per_weight_counts_codes_scales_and_zero_points(quantizer, lora, bits, group, symmetric):
    name = "lora.down.weight"
    cfg = DiffusionQuantConfig(bit_width=bits, group_size=group, symmetric=symmetric, enable_fallback=False)
    q = quantizer.quantize({name: lora[name]}, config=cfg)[name]
    rows, cols = lora[name].shape
    groups = rows * math.ceil(cols / (group or cols))
    zp = 0 if q.zero_points is None else q.zero_points.nbytes
    assert (q.zero_points is None) == symmetric
    assert q.scales.size == groups
    assert q.nbytes == len(q.codes) + q.scales.nbytes + zp
    assert q.bits_per_weight == pytest.approx(8 * (len(q.codes) + q.scales.nbytes + zp) / lora[name].size)
    # and the packed form decodes by the documented formula
    np.testing.assert_array_equal(reference_decode(q, lora[name].shape), q.dequantize())


def test_float16_and_float64_inputs_are_quantized_from_their_float32_values(quantizer, rng):
    base = rng.standard_normal((24, 160))
    out = quantizer.quantize({"w16": base.astype(np.float16), "w64": base, "w32": base.astype(np.float32)})
    ref16 = quantizer.quantize({"w16": base.astype(np.float16).astype(np.float32)})["w16"]
    np.testing.assert_array_equal(out["w16"].dequantize(), ref16.dequantize())
    np.testing.assert_array_equal(out["w64"].dequantize(), out["w32"].dequantize())
    assert out["w16"].dequantize(np.float16).dtype == np.float16


def test_integer_arrays_are_kept_unchanged(quantizer):
    ids = np.arange(4096, dtype=np.int64).reshape(64, 64)
    q = quantizer.quantize({"ids": ids})["ids"]
    assert not q.quantized
    np.testing.assert_array_equal(q.dequantize(np.int64), ids)


def test_tensor_like_objects_with_numpy_are_accepted(quantizer, lora):
    class FakeTensor:
        def __init__(self, a):
            self.a = a
            self.dtype = "torch.float32"

        def detach(self):
            return self

        def cpu(self):
            return self

        def numpy(self):
            return self.a

    name = "lora.down.weight"
    got = quantizer.quantize({name: FakeTensor(lora[name])})[name]
    ref = quantizer.quantize({name: lora[name]})[name]
    np.testing.assert_array_equal(got.dequantize(), ref.dequantize())


def test_nested_lists_are_accepted(quantizer, rng):
    a = rng.standard_normal((32, 64)).astype(np.float32)
    got = quantizer.quantize({"w": a.tolist()})["w"]
    ref = quantizer.quantize({"w": a})["w"]
    np.testing.assert_array_equal(got.dequantize(), ref.dequantize())


def test_weights_must_be_a_mapping(quantizer, lora):
    with pytest.raises(ConfigurationError, match="dict"):
        quantizer.quantize(list(lora.values()))


def test_invalid_bit_width_argument_raises_configuration_error(quantizer, lora):
    with pytest.raises(ConfigurationError, match="bit_width"):
        quantizer.quantize(lora, bit_width=7)


def test_non_finite_values_raise_or_are_kept_by_policy(quantizer, rng):
    a = rng.standard_normal((32, 64)).astype(np.float32)
    a[2, 3] = np.inf
    with pytest.raises(NonFiniteWeightError, match=r"\[2, 3\]"):
        quantizer.quantize({"w": a})
    kept = quantizer.quantize({"w": a}, config=DiffusionQuantConfig(nonfinite="keep"))["w"]
    assert not kept.quantized
    np.testing.assert_array_equal(kept.dequantize(), a)


def test_no_files_are_written(quantizer, lora, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    quantizer.quantize(lora)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("shape", [(0, 64), (64, 0)])
def test_empty_matrices_round_trip_when_min_tensor_size_is_zero(quantizer, shape):
    q = quantizer.quantize({"w": np.zeros(shape, np.float32)}, config=DiffusionQuantConfig(min_tensor_size=0))["w"]
    assert q.dequantize().shape == shape
