"""ggml's block types as quantization schemes (q8_0, q6_k, q5_k, q4_k, q3_k, q2_k, iq4_xs, iq4_nl).

`_core.encode_array(W, 0, scheme=T)` must produce exactly ggml's block bytes for the row-major
matrix, so that any ggml consumer decodes them as we do. Checked here against two independent
decoders -- gguf-py's numpy `gguf.quants.dequantize` and the C library's own `to_float` through
ggml-python -- bit for bit, on ordinary, odd-shaped and extreme inputs; and against ggml's own
encoder (`ggml_quantize_chunk`) for the error it reaches. Each test that needs a peer package
skips without it.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import _core

# scheme -> (weights per block, bytes per block), from ggml's src/ggml-common.h
TYPES = {
    "q8_0": (32, 34),
    "q6_k": (256, 210),
    "q5_k": (256, 176),
    "q4_k": (256, 144),
    "q3_k": (256, 110),
    "q2_k": (256, 84),
    "iq4_xs": (256, 136),
    "iq4_nl": (32, 18),
}
ALL = list(TYPES)
BLOCK32 = [t for t in ALL if TYPES[t][0] == 32]
BLOCK256 = [t for t in ALL if TYPES[t][0] == 256]


# ---- helpers ---------------------------------------------------------------------------------

def encode(W: np.ndarray, scheme: str, **kw):
    return _core.encode_array(np.ascontiguousarray(W, dtype=np.float32), 0, scheme=scheme,
                              num_threads=kw.pop("num_threads", 1), **kw)


def rel_error(W: np.ndarray, D: np.ndarray, weight: np.ndarray | None = None) -> float:
    """||W - D||_F / ||W||_F in float64, optionally with a per-column weight on the squares."""
    W = W.astype(np.float64)
    e = (W - D.astype(np.float64)) ** 2
    w2 = W ** 2
    if weight is not None:
        e, w2 = e * weight, w2 * weight
    return float(np.sqrt(e.sum() / w2.sum()))


def gguf_decode(codes: bytes, rows: int, scheme: str) -> np.ndarray:
    import gguf
    from gguf.quants import dequantize

    raw = np.frombuffer(codes, np.uint8).reshape(rows, -1)
    return np.asarray(dequantize(raw, getattr(gguf.GGMLQuantizationType, scheme.upper())), dtype=np.float32)


def ggml_type(scheme: str) -> int:
    import ggml

    return getattr(ggml, "GGML_TYPE_" + scheme.upper())


def ggml_decode(codes: bytes, rows: int, cols: int, scheme: str) -> np.ndarray:
    import ggml

    out = np.empty((rows, cols), np.float32)
    src = ctypes.create_string_buffer(codes, len(codes))
    ggml.ggml_get_type_traits(ggml_type(scheme)).contents.to_float(
        ctypes.cast(src, ctypes.c_void_p), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows * cols)
    return out


def ggml_encode(W: np.ndarray, scheme: str, importance: np.ndarray | None = None) -> bytes:
    """ggml's own encoder (llama.cpp's quantize path) on the same matrix."""
    import ggml

    W = np.ascontiguousarray(W, dtype=np.float32)
    rows, cols = W.shape
    t = ggml_type(scheme)
    row_size = ggml.ggml_row_size(t, cols)
    buf = (ctypes.c_uint8 * (row_size * rows))()
    imp = None if importance is None else importance.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
    ggml.ggml_quantize_chunk(t, W.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                             ctypes.c_void_p(ctypes.addressof(buf)), 0, rows, cols, imp)
    return bytes(buf)


def bits_equal(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(np.array_equal(np.ascontiguousarray(a, np.float32).view(np.uint32),
                                                      np.ascontiguousarray(b, np.float32).view(np.uint32)))


def first_mismatch(a: np.ndarray, b: np.ndarray) -> str:
    bad = np.argwhere(a.view(np.uint32) != b.view(np.uint32))
    if not len(bad):
        return "shapes differ: %s vs %s" % (a.shape, b.shape)
    i = tuple(bad[0])
    return f"{len(bad)} values differ, first at {i}: ours {a[i]!r} vs {b[i]!r}"


def assert_independent_decoders_agree(enc, scheme: str) -> None:
    """Our decode() against whichever of gguf-py / ggml-python is installed (extreme-input tests)."""
    ours = enc.decode()
    try:
        import gguf  # noqa: F401
    except ImportError:
        pass
    else:
        ref = gguf_decode(enc.codes, enc.rows, scheme)
        assert bits_equal(ours, ref), "gguf-py: " + first_mismatch(ours, ref)
    try:
        import ggml  # noqa: F401
    except ImportError:
        pass
    else:
        ref = ggml_decode(enc.codes, enc.rows, enc.cols, scheme)
        assert bits_equal(ours, ref), "ggml to_float: " + first_mismatch(ours, ref)


def varied(rows: int, cols: int, seed: int) -> np.ndarray:
    """Gaussian rows, a heavy-tailed row, a row with an outlier, a row of mixed sign bias."""
    rng = np.random.default_rng(seed)
    W = rng.normal(0.0, 0.02, (rows, cols)).astype(np.float32)
    if rows > 1:
        W[1] = rng.standard_t(3, cols) * 0.02
    if rows > 2:
        W[2, cols // 3] = 0.5
    if rows > 3:
        W[3] += 0.03
    return W


def shapes():
    """(scheme, rows, cols): 1, 3 and 7 rows of 3 super-blocks; for 32-weight types also row
    lengths that are multiples of 32 but not of 256."""
    out = []
    for t in ALL:
        out += [(t, 1, 768), (t, 3, 768), (t, 7, 768)]
        if t in BLOCK32:
            out += [(t, 1, 160), (t, 3, 160), (t, 7, 288), (t, 2, 32)]
    return out


SHAPES = shapes()
SHAPE_IDS = [f"{t}-{r}x{c}" for t, r, c in SHAPES]


@pytest.fixture
def gauss():
    return np.random.default_rng(1234).normal(0.0, 1.0, (64, 1024)).astype(np.float32)


# ---- layout ----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheme,rows,cols", SHAPES, ids=SHAPE_IDS)
def test_codes_are_rows_times_ggml_row_size_bytes_and_info_names_the_ggml_type(scheme, rows, cols):
    enc = encode(varied(rows, cols, 1), scheme)
    block, nbytes = TYPES[scheme]
    assert len(enc.codes) == rows * (cols // block) * nbytes
    info = enc.info()
    assert info["scheme"] == scheme
    assert info["ggml_type"] == scheme.upper()
    assert info["bits_per_weight"] == pytest.approx(8.0 * nbytes / block)
    assert (enc.rows, enc.cols) == (rows, cols)


@pytest.mark.parametrize("scheme", ALL)
def test_codes_have_ggml_row_size_per_row(scheme):
    ggml = pytest.importorskip("ggml")
    enc = encode(varied(3, 768, 2), scheme)
    assert len(enc.codes) == 3 * ggml.ggml_row_size(ggml_type(scheme), 768)


# ---- bit-exact against independent decoders -------------------------------------------------

@pytest.mark.parametrize("scheme,rows,cols", SHAPES, ids=SHAPE_IDS)
def test_decode_is_bit_identical_to_gguf_py_dequantize_of_our_codes(scheme, rows, cols):
    pytest.importorskip("gguf")
    enc = encode(varied(rows, cols, 3), scheme)
    ours, ref = enc.decode(), gguf_decode(enc.codes, rows, scheme)
    assert bits_equal(ours, ref), first_mismatch(ours, ref)


@pytest.mark.parametrize("scheme,rows,cols", SHAPES, ids=SHAPE_IDS)
def test_decode_is_bit_identical_to_ggml_to_float_of_our_codes(scheme, rows, cols):
    pytest.importorskip("ggml")
    enc = encode(varied(rows, cols, 4), scheme)
    ours, ref = enc.decode(), ggml_decode(enc.codes, rows, cols, scheme)
    assert bits_equal(ours, ref), first_mismatch(ours, ref)


@pytest.mark.parametrize("scheme", ALL)
def test_decode_rows_equals_the_same_rows_of_decode(scheme):
    enc = encode(varied(7, 768, 5), scheme)
    whole = enc.decode()
    out = np.empty((3, 768), np.float32)
    enc.decode_rows(2, 3, out)
    assert bits_equal(out, whole[2:5])


# ---- special inputs --------------------------------------------------------------------------

@pytest.mark.parametrize("value", [0.5, -1.25, 3.0])
@pytest.mark.parametrize("scheme", ALL)
def test_a_constant_block_decodes_to_its_value(scheme, value):
    block = TYPES[scheme][0]
    W = varied(2, 3 * block, 6)
    W[0, :block] = value           # first block of row 0 constant, the rest varied
    W[1, block:2 * block] = value  # a constant block between varied ones
    enc = encode(W, scheme)
    D = enc.decode()
    err = max(np.abs(D[0, :block] - value).max(), np.abs(D[1, block:2 * block] - value).max())
    assert err <= 1e-3 * abs(value), f"{scheme}: constant {value} decodes with max error {err:.4g}"
    assert_independent_decoders_agree(enc, scheme)


@pytest.mark.parametrize("value", [0.01, 0.5, -0.5])
@pytest.mark.parametrize("scheme", BLOCK256)
def test_a_constant_32_weight_sub_block_inside_a_varied_block_is_no_worse_than_ggml(scheme, value):
    pytest.importorskip("ggml")
    W = varied(4, 512, 7)
    W[:, 64:96] = value            # third sub-block of every row's first super-block
    ours = encode(W, scheme).decode()[:, 64:96]
    theirs = ggml_decode(ggml_encode(W, scheme), 4, 512, scheme)[:, 64:96]
    e_ours = float(np.sqrt(np.mean((ours.astype(np.float64) - value) ** 2)))
    e_ggml = float(np.sqrt(np.mean((theirs.astype(np.float64) - value) ** 2)))
    if abs(value) >= 0.1 * float(np.abs(W).mean()):
        assert e_ours <= 2.0 * e_ggml + 1e-3 * abs(value), \
            f"{scheme}: constant sub-block {value}: RMS error ours {e_ours:.4g}, ggml {e_ggml:.4g}"
    # A value small beside its block's weights costs little of the block's squared error, which
    # is what the encoder minimises: there only the whole block is held to ggml's error.
    whole_ours = np.linalg.norm(encode(W, scheme).decode()[:, :256] - W[:, :256])
    whole_ggml = np.linalg.norm(ggml_decode(ggml_encode(W, scheme), 4, 512, scheme)[:, :256] - W[:, :256])
    assert whole_ours <= whole_ggml, f"{scheme}: block error {whole_ours:.4g} above ggml's {whole_ggml:.4g}"


@pytest.mark.parametrize("scheme", ALL)
def test_an_all_zero_row_decodes_to_zeros_and_an_all_zero_matrix_reports_no_error(scheme):
    W = varied(3, 768, 8)
    W[1] = 0.0
    enc = encode(W, scheme)
    D = enc.decode()
    assert np.all(D[1] == 0.0)
    assert np.all(np.isfinite(D))
    assert_independent_decoders_agree(enc, scheme)
    zero = encode(np.zeros((2, 768), np.float32), scheme)
    assert np.all(zero.decode() == 0.0)
    assert zero.info()["relative_error"] == 0.0
    assert_independent_decoders_agree(zero, scheme)


@pytest.mark.parametrize("scale", [1e-8, 3e-7, 1e-6, 1e-5])
@pytest.mark.parametrize("scheme", ALL)
def test_tiny_magnitudes_decode_finite_and_no_worse_than_all_zeros(scheme, scale):
    """Below float16's range the block scales flush to zero and all zeros is the best decode
    left; no decode may be farther from the weights than all zeros (relative error 1)."""
    W = (np.random.default_rng(9).normal(0.0, 1.0, (8, 512)) * scale).astype(np.float32)
    enc = encode(W, scheme)
    D = enc.decode()
    assert np.all(np.isfinite(D))
    r = rel_error(W, D)
    assert r <= 1.0 + 1e-9, f"{scheme} at scale {scale:g}: relative error {r:.4f} (all zeros: 1.0)"
    assert_independent_decoders_agree(enc, scheme)


@pytest.mark.parametrize("scale", [1e4, 1e5])
@pytest.mark.parametrize("scheme", ALL)
def test_huge_magnitudes_decode_with_the_relative_error_of_scale_1(scheme, scale):
    """Scaling the weights by 1e4 or 1e5 (largest |x| ~ 5e5: every block scale still fits float16)
    changes nothing but the scales: the relative error is that of scale 1."""
    base = np.random.default_rng(10).normal(0.0, 1.0, (8, 512)).astype(np.float32)
    W = (base * scale).astype(np.float32)
    enc = encode(W, scheme)
    D = enc.decode()
    assert np.all(np.isfinite(D))
    r, r1 = rel_error(W, D), rel_error(base, encode(base, scheme).decode())
    assert r <= 1.01 * r1 + 1e-6, f"{scheme} at scale {scale:g}: relative error {r:.5f}, at scale 1 {r1:.5f}"
    assert_independent_decoders_agree(enc, scheme)


@pytest.mark.parametrize("scheme", ALL)
def test_values_near_float16_overflow_of_the_block_scales_decode_finite_and_better_than_zeros(scheme):
    """A Gaussian of standard deviation 1e6 (largest |x| 4.7e6): a sub-block minimum over
    63 x 65504 (q4_k, q5_k) or 15 x 65504 (q2_k) overflows a float16 dmin computed as ggml does;
    the codes must still decode finite (a clamped scale clips instead), closer than zeros."""
    W = (np.random.default_rng(0).normal(0.0, 1.0, (64, 1024)) * 1e6).astype(np.float32)
    enc = encode(W, scheme)
    D = enc.decode()
    bad = int(np.count_nonzero(~np.isfinite(D)))
    assert bad == 0, f"{scheme}: {bad} non-finite values in the decode of a 1e6-scale Gaussian"
    r = rel_error(W, D)
    assert r < 1.0, f"{scheme}: relative error {r:.4f} at scale 1e6"
    assert_independent_decoders_agree(enc, scheme)


@pytest.mark.parametrize("scheme", ALL)
def test_a_row_length_the_type_cannot_take_raises_a_configuration_error_naming_the_tensor(scheme):
    block = TYPES[scheme][0]
    bad = [100, block + 16] + ([288] if block == 256 else [48])
    for cols in bad:
        with pytest.raises(aq.ConfigurationError, match=r"blk\.7\.ffn_down\.weight") as e:
            encode(np.ones((2, cols), np.float32), scheme, name="blk.7.ffn_down.weight")
        assert isinstance(e.value, ValueError)
        assert scheme in str(e.value) and str(cols) in str(e.value)


# ---- quality against ggml's own encoder ------------------------------------------------------

@pytest.mark.parametrize("scheme", ALL)
def test_error_is_at_most_ggml_quantize_chunk_on_a_seeded_gaussian_64x1024(scheme, gauss):
    pytest.importorskip("ggml")
    ours = rel_error(gauss, encode(gauss, scheme).decode())
    theirs = rel_error(gauss, ggml_decode(ggml_encode(gauss, scheme), 64, 1024, scheme))
    assert ours <= theirs, f"{scheme}: relative RMSE ours {ours:.5f}, ggml {theirs:.5f}"


@pytest.mark.parametrize("scheme", ALL)
def test_an_importance_vector_lowers_the_importance_weighted_error(scheme, gauss):
    rng = np.random.default_rng(11)
    imp = np.ones(1024, np.float32)
    imp[rng.choice(1024, 8, replace=False)] = 1000.0  # a few columns that matter much more
    plain = rel_error(gauss, encode(gauss, scheme).decode(), imp)
    weighted = rel_error(gauss, encode(gauss, scheme, importance=imp).decode(), imp)
    assert weighted < plain, f"{scheme}: importance-weighted error with the vector {weighted:.5f}, without {plain:.5f}"


# ---- determinism -----------------------------------------------------------------------------

@pytest.mark.parametrize("scheme", ALL)
def test_one_and_two_threads_produce_identical_codes(scheme, gauss):
    imp = np.random.default_rng(12).lognormal(0.0, 1.0, 1024).astype(np.float32)
    for kw in ({}, {"importance": imp}):
        a = encode(gauss, scheme, num_threads=1, **kw).codes
        b = encode(gauss, scheme, num_threads=2, **kw).codes
        assert a == b
