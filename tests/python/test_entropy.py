"""The entropy-coded scheme from Python: its configuration fields, the deployment profiles that use
it, the bits per weight it stores, and -- the proof that docs/format.md is complete -- a decoder
written here from the document alone (rANS chunks, escapes, centroids, the inverse rotation) that
reproduces what arrow_quant_v2.load returns, bit for bit.
"""

from __future__ import annotations

import math
import os
import struct
from typing import Dict, List

import numpy as np
import pyarrow.parquet as pq
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, ConfigurationError, DiffusionQuantConfig

from conftest import np_cosine, write_model_file

# ---------------------------------------------------------------------------------------------
# configuration
# ---------------------------------------------------------------------------------------------


def test_entropy_config_defaults():
    c = DiffusionQuantConfig(scheme="entropy")
    assert c.scheme == "entropy"
    assert c.target_bits_per_weight is None  # bit_width + 0.5
    assert c.rotate is False
    assert c.bit_width == 4
    assert c.validate() is c
    d = c.to_dict()
    assert d["scheme"] == "entropy" and d["target_bits_per_weight"] is None and d["rotate"] is False
    assert DiffusionQuantConfig.from_dict(d) == c
    assert DiffusionQuantConfig().scheme == "affine"


@pytest.mark.parametrize("value", [1, 1.0, 2.5, 4.5, 9, 12, 12.0])
def test_target_bits_per_weight_accepts_1_to_12(value):
    c = DiffusionQuantConfig(scheme="entropy", target_bits_per_weight=value)
    assert c.target_bits_per_weight == float(value)
    assert isinstance(c.target_bits_per_weight, float)
    c.validate()


@pytest.mark.parametrize("value", [0, 0.99, 12.01, 13, -4.5, float("nan"), float("inf"), "4.5", True, [4.5]])
def test_target_bits_per_weight_rejects_values_outside_1_to_12(value):
    with pytest.raises(ConfigurationError, match="target_bits_per_weight"):
        DiffusionQuantConfig(scheme="entropy", target_bits_per_weight=value)
    c = DiffusionQuantConfig(scheme="entropy", target_bits_per_weight=3.0)
    with pytest.raises(ConfigurationError, match="target_bits_per_weight"):
        c.target_bits_per_weight = value
    assert c.target_bits_per_weight == 3.0, "a rejected assignment leaves the field as it was"


def test_target_bits_per_weight_applies_to_the_entropy_scheme_only(tmp_path, rng):
    c = DiffusionQuantConfig(target_bits_per_weight=4.5)  # scheme affine
    with pytest.raises(ConfigurationError, match="entropy"):
        c.validate()
    # and nothing runs with it
    path = write_model_file(tmp_path / "m.safetensors", {"a.weight": rng.standard_normal((64, 64)).astype(np.float32)})
    with pytest.raises(ConfigurationError):
        ArrowQuantV2().quantize_diffusion_model(path, tmp_path / "out", config=c)
    assert not os.path.exists(tmp_path / "out")
    with pytest.raises(ConfigurationError):
        ArrowQuantV2().quantize({"a.weight": np.ones((64, 64), np.float32)}, config=c)
    # switching the scheme makes the same field valid; None is valid with either scheme
    c.scheme = "entropy"
    c.validate()
    DiffusionQuantConfig(target_bits_per_weight=None).validate()


@pytest.mark.parametrize("value", [1, 0, None, "true", "yes", 1.0])
def test_rotate_must_be_a_bool(value):
    with pytest.raises(ConfigurationError, match="rotate"):
        DiffusionQuantConfig(scheme="entropy", rotate=value)
    c = DiffusionQuantConfig(scheme="entropy", rotate=True)
    assert c.rotate is True
    with pytest.raises(ConfigurationError, match="rotate"):
        c.rotate = value
    assert c.rotate is True


def test_scheme_must_be_affine_or_entropy():
    for bad in ("Entropy", "rans", "", None, 1):
        with pytest.raises(ConfigurationError, match="scheme"):
            DiffusionQuantConfig(scheme=bad)


@pytest.mark.parametrize("profile,bits", [("edge", 2), ("local", 4), ("cloud", 8)])
def test_profiles_take_the_entropy_scheme_as_the_archive_format(profile, bits):
    # the profiles run small (ggml types); scheme="entropy" on top of one keeps its width
    c = DiffusionQuantConfig.from_profile(profile, scheme="entropy")
    assert c.scheme == "entropy"
    assert c.bit_width == bits
    assert c.target_bits_per_weight is None
    c.validate()
    # fields given explicitly win over the profile
    assert DiffusionQuantConfig.from_profile(profile, scheme="affine").scheme == "affine"


def _neutral_model(rng) -> Dict[str, np.ndarray]:
    """Layers without a sensitive name, large enough to quantize, plus a kept bias."""
    return {
        "blocks.0.attn.qkv.weight": (0.02 * rng.standard_normal((192, 256))).astype(np.float32),
        "blocks.0.mlp.fc1.weight": (0.02 * rng.standard_t(4.0, size=(256, 192))).astype(np.float32),
        "blocks.0.conv.weight": (0.05 * rng.standard_normal((64, 32, 3, 3))).astype(np.float32),
        "blocks.0.mlp.fc1.bias": (0.01 * rng.standard_normal(256)).astype(np.float32),
    }


@pytest.mark.parametrize("profile", ["edge", "local", "cloud"])
def test_entropy_profiles_store_at_most_bit_width_plus_one_half_bits_per_weight(profile, tmp_path, rng):
    arrays = _neutral_model(rng)
    path = write_model_file(tmp_path / "model.safetensors", arrays)
    config = DiffusionQuantConfig.from_profile(profile, scheme="entropy")
    result = ArrowQuantV2().quantize_diffusion_model(path, tmp_path / "out", config=config)
    budget = config.bit_width + 0.5
    layers = {l["tensor"]: l for l in result["layers"]}
    for name, a in arrays.items():
        l = layers[name]
        if a.ndim < 2:
            assert not l["quantized"]
            continue
        assert l["quantized"], f"{name}: {l['reason']} (rejected {l['rejected_bits']})"
        assert l["rejected_bits"] == [], f"{name} fell back at {profile}: {l}"
        assert l["bits"] == config.bit_width
        assert l["bits_per_weight"] <= budget, f"{name}: {l['bits_per_weight']} bits per weight > {budget}"
        assert l["bits_per_weight"] == pytest.approx(8.0 * l["stored_bytes"] / a.size)
        assert l["cosine_similarity"] >= config.min_accuracy
    quantized = [l for l in result["layers"] if l["quantized"]]
    total_bits = 8.0 * sum(l["stored_bytes"] for l in quantized)
    total_weights = sum(arrays[l["tensor"]].size for l in quantized)
    assert total_bits / total_weights <= budget
    # the stored scheme of every entropy-coded tensor records the budget it aimed at
    for row in pq.read_table(tmp_path / "out" / "weights.parquet").to_pylist():
        if row["scheme"] is not None and row["scheme"]["kind"] == "entropy":
            assert row["scheme"]["target_bpw"] == budget
            assert row["entropy"] is not None and row["zero_points"] is None


def test_a_target_sets_the_budget(tmp_path, rng):
    arrays = _neutral_model(rng)
    path = write_model_file(tmp_path / "model.safetensors", arrays)
    config = DiffusionQuantConfig(scheme="entropy", bit_width=4, target_bits_per_weight=3.3, min_accuracy=0.0)
    result = ArrowQuantV2().quantize_diffusion_model(path, tmp_path / "out", config=config)
    for l in result["layers"]:
        if l["quantized"]:
            assert l["bits_per_weight"] <= 3.3, l
    rows = [r for r in pq.read_table(tmp_path / "out" / "weights.parquet").to_pylist() if r["scheme"]]
    assert rows and all(r["scheme"]["kind"] == "entropy" and r["scheme"]["target_bpw"] == 3.3 for r in rows)


def test_validate_quality_reproduces_the_recorded_cosines_of_an_entropy_model(tmp_path, rng):
    arrays = _neutral_model(rng)
    path = write_model_file(tmp_path / "model.safetensors", arrays)
    config = DiffusionQuantConfig(scheme="entropy", rotate=True, bit_width=3)
    q = ArrowQuantV2()
    result = q.quantize_diffusion_model(path, tmp_path / "out", config=config)
    v = q.validate_quality(path, tmp_path / "out")
    assert v["passed"], v
    recorded = {l["tensor"]: l["cosine_similarity"] for l in result["layers"] if l["quantized"]}
    assert recorded and set(v["per_layer_accuracy"]) == set(recorded)
    for name, cos in recorded.items():
        assert v["per_layer_accuracy"][name] == cos, name


@pytest.mark.parametrize("target", [None, 4.2])
@pytest.mark.parametrize("rotate", [False, True])
def test_a_few_outliers_do_not_wipe_out_the_rest_of_a_tensor(rng, rotate, target):
    """Three weights 10^4 times the rest of a 64 x 96 layer: the outliers dominate the tensor's
    norm, so its cosine stays high whatever happens to the other weights -- which must still be
    quantized within the budget, not zeroed. (A budget of 4.2 at bit_width 4 leaves no room for
    4-bit fixed-rate codes, so the entropy coder itself is what is measured.)"""
    a = (0.02 * rng.standard_normal((64, 96))).astype(np.float32)
    planted = [(3, 5), (10, 40), (63, 95)]
    for k, (r, c) in enumerate(planted):
        a[r, c] = (1 if k % 2 == 0 else -1) * 0.02 * 1e4
    config = DiffusionQuantConfig(scheme="entropy", rotate=rotate, target_bits_per_weight=target)
    out = ArrowQuantV2().quantize({"blocks.0.ff.weight": a}, config=config)
    q = out["blocks.0.ff.weight"]
    assert q.quantized, q.reason
    d = q.dequantize()
    rest = np.ones(a.shape, bool)
    rest[[r for r, _ in planted], :] = False
    assert np_cosine(a[rest], d[rest]) >= 0.95, (
        f"the other rows come back with cosine {np_cosine(a[rest], d[rest]):.3f} "
        f"({q.bits_per_weight:.2f} bits per weight stored, {q.scheme})")
    for r, c in planted:
        assert abs(float(d[r, c]) - float(a[r, c])) <= 0.01 * abs(float(a[r, c]))


# ---------------------------------------------------------------------------------------------
# an independent decoder, from docs/format.md alone
# ---------------------------------------------------------------------------------------------

_MASK64 = (1 << 64) - 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _column_signs(cols: int) -> np.ndarray:
    """-1 where bit 0 of splitmix64(0x5851F42D4C957F2D + j) is 1."""
    return np.array([-1.0 if _splitmix64((0x5851F42D4C957F2D + j) & _MASK64) & 1 else 1.0 for j in range(cols)],
                    dtype=np.float32)


def _butterflies(x: np.ndarray, block: int) -> np.ndarray:
    """h = 1, 2, ..., B/2: (a, b) -> (a + b, a - b) on elements (i, i + h) of each block, i with bit
    h clear; float32 throughout."""
    rows, cols = x.shape
    v = x.reshape(rows, cols // block, block).astype(np.float32)
    h = 1
    while h < block:
        w = v.reshape(rows, cols // block, block // (2 * h), 2, h)
        a, b = w[:, :, :, 0, :].copy(), w[:, :, :, 1, :].copy()
        w[:, :, :, 0, :] = a + b
        w[:, :, :, 1, :] = a - b
        v = w.reshape(rows, cols // block, block)
        h *= 2
    return v.reshape(rows, cols)


def _unrotate(x: np.ndarray, block: int) -> np.ndarray:
    """The inverse: the same butterflies, the same multiplication by the float32 constant
    1/sqrt(B), then the signs."""
    y = _butterflies(x, block)
    y = (y * np.float32(1.0 / math.sqrt(block))).astype(np.float32)
    return (y * _column_signs(x.shape[1])[None, :]).astype(np.float32)


def _largest_power_of_two_block(cols: int) -> int:
    b = 1
    while b < 256 and cols % (2 * b) == 0:
        b *= 2
    return b


def _decode_chunk(chunk: bytes, n: int, freqs: List[int], escape_symbol: int, symbol_min: int):
    """Codes of one chunk: uint32 E, E float32 escaped codes, then the rANS stream (four uint32
    states, then uint16 words); symbol i uses state i mod 4. Returns (codes, escaped mask)."""
    (count,) = struct.unpack_from("<I", chunk, 0)
    escaped = struct.unpack_from(f"<{count}f", chunk, 4)
    pos = 4 + 4 * count
    x = list(struct.unpack_from("<4I", chunk, pos))
    pos += 16
    assert (len(chunk) - pos) % 2 == 0, "a rANS stream is whole 16-bit words after the states"
    words = np.frombuffer(chunk, dtype="<u2", offset=pos).tolist()
    cum = [0]
    for f in freqs:
        cum.append(cum[-1] + f)
    assert cum[-1] == 1 << 15
    owner = [0] * (1 << 15)
    for k, f in enumerate(freqs):
        for slot in range(cum[k], cum[k] + f):
            owner[slot] = k
    out = [0.0] * n
    is_escaped = [False] * n
    wi = ei = 0
    for i in range(n):
        lane = i & 3
        st = x[lane]
        slot = st & 0x7FFF
        k = owner[slot]
        st = freqs[k] * (st >> 15) + slot - cum[k]
        if st < 0x10000:
            st = (st << 16) | words[wi]
            wi += 1
        x[lane] = st
        if k == escape_symbol:
            out[i] = escaped[ei]
            is_escaped[i] = True
            ei += 1
        else:
            out[i] = symbol_min + k
    assert wi == len(words), "every word of the stream is read"
    assert ei == count, "every escaped code is used"
    return np.array(out, dtype=np.float64), np.array(is_escaped)


def decode_entropy_row(row: dict) -> np.ndarray:
    """One weights.parquet row of an entropy-coded tensor -> float32 array of its shape."""
    shape = row["shape"]
    rows = shape[0]
    cols = int(np.prod(shape[1:]))
    ent = row["entropy"]
    steps = np.frombuffer(row["scales"], dtype="<f4")
    assert steps.size == rows
    freqs = ent["frequencies"]
    centroids = np.array(ent["centroids"], dtype=np.float32)
    codes = row["codes"]
    offsets = ent["chunk_offsets"]
    chunk_rows = ent["chunk_rows"]
    nchunks = -(-rows // chunk_rows)
    assert len(offsets) == nchunks + 1 and offsets[0] == 0 and offsets[-1] == len(codes)
    qf = np.empty(rows * cols, dtype=np.float64)
    esc = np.zeros(rows * cols, dtype=bool)
    for j in range(nchunks):
        r0 = j * chunk_rows
        nr = min(chunk_rows, rows - r0)
        qf[r0 * cols:(r0 + nr) * cols], esc[r0 * cols:(r0 + nr) * cols] = _decode_chunk(
            codes[offsets[j]:offsets[j + 1]], nr * cols, freqs, ent["escape_symbol"], ent["symbol_min"])
    esc = esc.reshape(rows, cols)
    qf = qf.reshape(rows, cols)
    q = np.where(esc, 0, qf).astype(np.int64)  # direct codes (escapes handled below)
    m = np.abs(q)
    sign = np.where(q < 0, np.float32(-1.0), np.float32(1.0))
    # 1 <= m <= 8: sign(q) * (m + centroids[m-1]) * s, the parenthesis rounded to float32 first
    small = (m >= 1) & (m <= 8)
    mag = (m.astype(np.float32) + centroids[np.clip(m, 1, 8) - 1]).astype(np.float32)
    v_small = ((sign * mag).astype(np.float32) * steps[:, None]).astype(np.float32)
    # otherwise float32(q) * s (0 for q = 0)
    v_other = (q.astype(np.float32) * steps[:, None]).astype(np.float32)
    v = np.where(small, v_small, v_other).astype(np.float32)
    # an escaped code e (float32) gives e * s
    v_esc = (qf.astype(np.float32) * steps[:, None]).astype(np.float32)
    v = np.where(esc, v_esc, v).astype(np.float32)
    rotation = row["scheme"]["rotation"]
    if rotation > 1:
        assert rotation == _largest_power_of_two_block(cols)
        v = _unrotate(v, rotation)
    return v.reshape(shape)


def _quantize_file(tmp_path, arrays, **config) -> str:
    path = write_model_file(tmp_path / "model.safetensors", arrays)
    out = tmp_path / "out"
    cfg = DiffusionQuantConfig(scheme="entropy", min_accuracy=0.0, **config)
    ArrowQuantV2().quantize_diffusion_model(path, out, config=cfg)
    return os.fspath(out)


def _rows_by_name(out: str) -> Dict[str, dict]:
    return {r["name"]: r for r in pq.read_table(os.path.join(out, "weights.parquet")).to_pylist()}


def _entropy_arrays(rng) -> Dict[str, np.ndarray]:
    plain = (0.02 * rng.standard_t(4.0, size=(64, 96))).astype(np.float32)
    escapes = (0.02 * rng.standard_normal((64, 96))).astype(np.float32)
    for k, (r, c) in enumerate([(3, 5), (10, 40), (63, 95)]):  # 10^4 times the rest
        escapes[r, c] = (1 if k % 2 == 0 else -1) * 0.02 * 1e4
    for k, (r, c) in enumerate([(20, 7), (41, 0)]):  # and far beyond any code range's symbols
        escapes[r, c] = (1 if k % 2 == 0 else -1) * 0.02 * 1e8
    chunks = (0.05 * rng.standard_normal((70, 2048))).astype(np.float32)  # chunks of 32 rows
    return {"blocks.0.plain.weight": plain, "blocks.0.escapes.weight": escapes,
            "blocks.0.chunks.weight": chunks}


@pytest.mark.parametrize("rotate", [False, True])
def test_a_decoder_written_from_the_format_document_reproduces_load(tmp_path, rng, rotate):
    arrays = _entropy_arrays(rng)
    # bit_width 4 with a budget of 4.2: every fixed-rate alternative of the width costs more
    out = _quantize_file(tmp_path, arrays, bit_width=4, target_bits_per_weight=4.2, rotate=rotate)
    rows = _rows_by_name(out)
    model = aq.load(out)
    for name, a in arrays.items():
        row = rows[name]
        assert row["encoding"] == "quantized", row["reason"]
        assert row["scheme"]["kind"] == "entropy", f"{name} stored as {row['scheme']}"
        assert row["scheme"]["rotation"] == (_largest_power_of_two_block(a.shape[1]) if rotate else 1)
        assert row["zero_points"] is None
        mine = decode_entropy_row(row)
        theirs = model[name].numpy()
        assert mine.dtype == theirs.dtype == np.float32
        assert np.array_equal(mine, theirs), f"{name}: {np.sum(mine != theirs)} values differ"
        # the recorded figures describe these values
        assert row["metrics"]["cosine"] == pytest.approx(np_cosine(a, mine), abs=1e-12)
        # stored_bytes: codes, steps and the entropy fields at their types' sizes
        e = row["entropy"]
        expect = (len(row["codes"]) + len(row["scales"]) + 4 + 4 + 4 + 2 * len(e["frequencies"])
                  + 4 * len(e["chunk_offsets"]) + 4 * len(e["centroids"]))
        assert row["stored_bytes"] == expect
    if not rotate:
        esc = rows["blocks.0.escapes.weight"]["entropy"]
        assert esc["escape_symbol"] == len(esc["frequencies"]) - 1, "the test wants escaped codes"
        assert len(rows["blocks.0.chunks.weight"]["entropy"]["chunk_offsets"]) >= 3, "the test wants chunks"
        # the escaped weights come back (no clipping)
        d = model["blocks.0.escapes.weight"].numpy()
        a = arrays["blocks.0.escapes.weight"]
        steps = np.frombuffer(rows["blocks.0.escapes.weight"]["scales"], dtype="<f4")
        for r, c in [(20, 7), (41, 0)]:
            assert abs(float(d[r, c]) - float(a[r, c])) <= 0.5 * steps[r] * 1.0001 + abs(float(a[r, c])) * 1e-6


# ---------------------------------------------------------------------------------------------
# in-memory quantization equals the files
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rotate", [False, True])
def test_in_memory_entropy_arrays_dequantize_to_what_a_saved_model_loads(tmp_path, rng, rotate):
    arrays = {
        "blocks.0.attn.to_q.weight": (0.02 * rng.standard_normal((160, 256))).astype(np.float32),
        "blocks.0.ff.weight": (0.02 * rng.standard_t(4.0, size=(256, 160))).astype(np.float32),
        "blocks.0.conv.weight": (0.05 * rng.standard_normal((48, 16, 3, 3))).astype(np.float32),
        "blocks.0.ff.bias": (0.01 * rng.standard_normal(256)).astype(np.float32),
    }
    config = DiffusionQuantConfig(scheme="entropy", rotate=rotate)
    mem = ArrowQuantV2().quantize(arrays, config=config)
    path = write_model_file(tmp_path / "model.safetensors", arrays)
    ArrowQuantV2().quantize_diffusion_model(path, tmp_path / "out", config=config)
    model = aq.load(tmp_path / "out")
    rows = _rows_by_name(os.fspath(tmp_path / "out"))
    for name, a in arrays.items():
        q = mem[name]
        assert q.quantized == model[name].quantized, name
        d = q.dequantize()
        assert d.shape == a.shape
        assert np.array_equal(d, model[name].numpy()), f"{name}: in memory and on disk differ"
        if not q.quantized:
            continue
        assert q.nbytes == rows[name]["stored_bytes"]
        assert q.bits_per_weight <= config.bit_width + 0.5
        assert q.cosine_similarity == rows[name]["metrics"]["cosine"]
        if rows[name]["scheme"]["kind"] == "entropy":
            assert q.scheme == f"entropy_{config.bit_width + 0.5:.2f}" + ("_rot" if rotate else "")
            assert q.scales.dtype == np.float32 and q.scales.size == a.shape[0], "one float32 step per row"
            assert q.codes == rows[name]["codes"]
    assert mem["blocks.0.ff.weight"].scheme.startswith("entropy"), "the 256 x 160 layer is entropy-coded"


def test_encoded_entropy_arrays_decode_by_whole_chunks(rng):
    a = (0.02 * rng.standard_normal((300, 512))).astype(np.float32)  # chunks of 128 rows
    enc = aq._core.encode_array(a, 4, scheme="entropy", target_bpw=4.2)
    info = enc.info()
    assert info["scheme_kind"] == "entropy"
    assert info["bits_per_weight"] <= 4.2
    assert info["bits_per_weight"] == pytest.approx(8.0 * enc.stored_bytes / a.size)
    unit = enc.decode_granularity
    assert unit == info["entropy"]["chunk_rows"] and 300 % unit != 0
    full = enc.decode()
    for r0 in range(0, 300, unit):
        nr = min(unit, 300 - r0)
        out = np.empty((nr, 512), np.float32)
        enc.decode_rows(r0, nr, out)
        assert np.array_equal(out, full[r0:r0 + nr])
    with pytest.raises(ConfigurationError):
        enc.decode_rows(1, unit, np.empty((unit, 512), np.float32))  # not on a chunk boundary
    with pytest.raises(ConfigurationError):
        enc.decode_rows(0, unit - 1, np.empty((unit - 1, 512), np.float32))
