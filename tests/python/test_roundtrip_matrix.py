"""Every bit width x group size x symmetry: the file, the in-memory quantizer and the format's
formula (recomputed with numpy from the packed codes) agree exactly."""

import math
import os

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
from arrow_quant_v2 import _core

from conftest import np_cosine, np_relative_error, packed_code_len, reference_decode, stored_values, write_model_file

BITS = [2, 3, 4, 8]
GROUPS = [0, 32, 64, 128, 256]

# cols = 200 everywhere: no group size divides it, so every row ends in a shorter group (and
# 256 > 200 makes one short group per row). Odd row counts give bit streams that end mid-byte.
SPECS = {
    "blocks.0.linear.weight": ((37, 200), "F32"),
    "blocks.0.conv.weight": ((13, 8, 5, 5), "F32"),   # a convolution: rows 13, cols 8*5*5 = 200
    "blocks.1.proj.weight": ((24, 200), "BF16"),
    "blocks.1.half.weight": ((11, 200), "F16"),
    "blocks.2.heavy.weight": ((300, 200), "F32"),      # more rows than one block of the engine
}


@pytest.fixture(scope="module")
def matrix_source(tmp_path_factory):
    rng = np.random.default_rng(7)
    arrays = {}
    for name, (shape, _) in SPECS.items():
        if "heavy" in name:
            a = rng.standard_t(4.0, size=shape).astype(np.float32) * 0.02
        else:
            a = rng.standard_normal(shape).astype(np.float32) * np.exp(rng.standard_normal((shape[0],) + (1,) * (len(shape) - 1))).astype(np.float32)
        arrays[name] = a
    dtypes = {n: d for n, (_, d) in SPECS.items()}
    d = tmp_path_factory.mktemp("matrix")
    path = write_model_file(d / "model.safetensors", arrays, dtypes)
    return path, stored_values(arrays, dtypes), d


def _config(bits, group, symmetric):
    # no fallback, no sensitive-layer promotion: every tensor is quantized at exactly `bits`
    return DiffusionQuantConfig(bit_width=bits, group_size=group, symmetric=symmetric, enable_fallback=False,
                                sensitive_patterns=[], min_tensor_size=0, num_threads=2)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", GROUPS, ids=lambda g: f"g{g}")
@pytest.mark.parametrize("bits", BITS, ids=lambda b: f"int{b}")
def test_file_memory_and_formula_agree(matrix_source, bits, group, symmetric):
    path, values, root = matrix_source
    out = root / f"out-{bits}-{group}-{int(symmetric)}"
    config = _config(bits, group, symmetric)
    result = ArrowQuantV2().quantize_diffusion_model(path, out, config=config)
    layers = {l["name"]: l for l in result["layers"]}
    model = aq.load(out)
    in_memory = ArrowQuantV2().quantize(values, config=config)
    for name, src in values.items():
        t = model[name]
        assert t.quantized and t.bits == bits and t.group_size == group
        loaded = t.numpy()
        assert loaded.dtype == np.float32 and loaded.shape == src.shape

        # 1. the in-memory quantizer (same kernels) gives exactly the loaded values
        mem = in_memory[name]
        assert mem.quantized and mem.bits == bits
        np.testing.assert_array_equal(loaded, mem.dequantize())
        assert mem.codes == t.packed().codes

        # 2. the report's per-layer cosine is the numpy cosine of source vs loaded
        assert np_cosine(src, loaded) == pytest.approx(layers[name]["cosine_similarity"], abs=1e-9)
        assert np_relative_error(src, loaded) == pytest.approx(layers[name]["relative_error"], rel=1e-9, abs=1e-12)

        # 3. the packed form decodes, by the documented formula, to the loaded values
        p = t.packed()
        numel = int(np.prod(src.shape))
        rows = src.shape[0]
        cols = numel // rows
        gpr = math.ceil(cols / (group or cols))
        assert len(p.codes) == packed_code_len(numel, bits)
        assert p.scales.size == rows * gpr
        if symmetric:
            assert p.zero_points is None
        else:
            assert p.zero_points is not None and p.zero_points.size == rows * gpr
        np.testing.assert_array_equal(reference_decode(p, src.shape), loaded)

        # 4. the codes use the range of the bit width, and quality is sane
        codes = np.asarray(_core.unpack_codes(p.codes, 0, numel, bits))
        assert codes.max() < 2 ** bits
        assert np_cosine(src, loaded) > {2: 0.8, 3: 0.9, 4: 0.97, 8: 0.999}[bits]

        # 5. the stored size is what the layer reports
        stored = len(p.codes) + p.scales.nbytes + (0 if p.zero_points is None else p.zero_points.nbytes)
        assert layers[name]["stored_bytes"] == stored == t.stored_bytes


def test_tiny_weights_get_float32_scales_and_still_decode_by_the_formula(tmp_path):
    # Scales under float16's smallest normal (6.1e-5) are stored as float32.
    rng = np.random.default_rng(3)
    arrays = {"blocks.0.tiny.weight": (rng.standard_normal((16, 200)) * 1e-7).astype(np.float32)}
    path = write_model_file(tmp_path / "model.safetensors", arrays)
    config = _config(4, 64, False)
    ArrowQuantV2().quantize_diffusion_model(path, tmp_path / "out", config=config)
    t = aq.load(tmp_path / "out")["blocks.0.tiny.weight"]
    assert t.info["scale_type"] == "f32"
    p = t.packed()
    assert p.scales.dtype == np.float32
    loaded = t.numpy()
    np.testing.assert_array_equal(reference_decode(p, (16, 200)), loaded)
    np.testing.assert_array_equal(loaded, ArrowQuantV2().quantize(arrays, config=config)["blocks.0.tiny.weight"].dequantize())
    assert np_cosine(arrays["blocks.0.tiny.weight"], loaded) > 0.97


@pytest.mark.parametrize("bits", [1, 2, 3, 4, 5, 6, 7, 8])
def test_pack_and_unpack_codes_follow_the_little_endian_bit_stream(bits):
    # code i occupies stream bits [i*bits, (i+1)*bits); stream bit k is bit k%8 of byte k//8
    rng = np.random.default_rng(bits)
    n = 101
    codes = rng.integers(0, 2 ** bits, size=n, dtype=np.uint8)
    packed = _core.pack_codes(codes, bits)
    assert len(packed) == packed_code_len(n, bits)
    stream = np.unpackbits(np.frombuffer(packed, np.uint8), bitorder="little")
    weights = 1 << np.arange(bits)
    decoded = np.array([int(stream[i * bits:(i + 1) * bits] @ weights) for i in range(n)])
    np.testing.assert_array_equal(decoded, codes)
    np.testing.assert_array_equal(np.asarray(_core.unpack_codes(packed, 0, n, bits)), codes)
    # any window of the stream
    np.testing.assert_array_equal(np.asarray(_core.unpack_codes(packed, 17, 40, bits)), codes[17:57])
    # bits past the last code are zero
    assert not stream[n * bits:].any()


def test_pack_codes_rejects_a_code_that_does_not_fit():
    with pytest.raises(aq.ConfigurationError):
        _core.pack_codes(np.array([0, 4], np.uint8), 2)


def test_unpack_codes_rejects_a_too_short_stream():
    with pytest.raises(aq.ModelFormatError):
        _core.unpack_codes(b"\x00", 0, 3, 4)


hypothesis = pytest.importorskip("hypothesis")
from hypothesis import given, settings, strategies as st  # noqa: E402


@settings(max_examples=60, deadline=None, derandomize=True)
@given(rows=st.integers(1, 40), cols=st.integers(1, 300), bits=st.sampled_from(BITS), group=st.sampled_from(GROUPS),
       symmetric=st.booleans(), scale=st.sampled_from([1e-3, 1.0, 300.0]), seed=st.integers(0, 2 ** 16))
def test_any_shape_decodes_by_the_formula_and_packs_tightly(rows, cols, bits, group, symmetric, scale, seed):
    a = (np.random.default_rng(seed).standard_normal((rows, cols)) * scale).astype(np.float32)
    cfg = DiffusionQuantConfig(bit_width=bits, group_size=group, symmetric=symmetric, enable_fallback=False,
                               sensitive_patterns=[], min_tensor_size=0)
    q = ArrowQuantV2().quantize({"w": a}, config=cfg)["w"]
    assert q.quantized and q.bits == bits
    assert len(q.codes) == packed_code_len(rows * cols, bits)
    assert q.scales.size == rows * math.ceil(cols / (group or cols))
    deq = q.dequantize()
    np.testing.assert_array_equal(reference_decode(q, a.shape), deq)
    assert np.isfinite(deq).all()
    # no wild values: no weight moves by more than the tensor's largest magnitude
    assert np.abs(deq - a).max() <= np.abs(a).max() * 1.01 + 1e-30


def _decode_row_with_numpy_only(row):
    """docs/format.md's recipe: the Parquet row alone, numpy alone (no ArrowQuant code)."""
    bits, g, sym = row["scheme"]["bits"], row["scheme"]["group_size"], row["scheme"]["symmetric"]
    sdt = np.float16 if row["scheme"]["scale_type"] == "f16" else np.float32
    rows = row["shape"][0]
    cols = int(np.prod(row["shape"][1:]))
    g = g or cols
    stream = np.unpackbits(np.frombuffer(row["codes"], np.uint8), bitorder="little")
    codes = (stream[: rows * cols * bits].reshape(-1, bits).astype(np.int64) @ (1 << np.arange(bits)))
    codes = codes.reshape(rows, cols).astype(np.float32)
    s = np.frombuffer(row["scales"], sdt).astype(np.float32).reshape(rows, -1)
    group = np.arange(cols) // g
    if sym:
        w = s[:, group] * (codes - np.float32(2 ** (bits - 1)))
    else:
        z = np.frombuffer(row["zero_points"], sdt).astype(np.float32).reshape(rows, -1)
        w = (s[:, group] * codes).astype(np.float32) + z[:, group]
    return w.reshape(row["shape"])


@pytest.mark.parametrize("bits,group,symmetric", [(2, 64, False), (3, 0, True), (4, 256, False), (8, 32, True)])
def test_weights_parquet_decodes_with_pyarrow_and_numpy_alone(matrix_source, bits, group, symmetric):
    import pyarrow.parquet as pq

    path, values, root = matrix_source
    out = root / f"pure-{bits}-{group}-{int(symmetric)}"
    ArrowQuantV2().quantize_diffusion_model(path, out, config=_config(bits, group, symmetric))
    f = pq.ParquetFile(out / "weights.parquet")
    model = aq.load(out)
    seen = 0
    for i in range(f.metadata.num_row_groups):
        row = f.read_row_group(i).to_pylist()[0]
        assert row["encoding"] == "quantized"
        np.testing.assert_array_equal(_decode_row_with_numpy_only(row), model[row["name"]].numpy())
        seen += 1
    assert seen == len(values)
