"""Quantization quality: the error-minimizing scale search beats plain min/max everywhere, and
the reported metrics are the true ones."""

import numpy as np
import pytest

from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig

from conftest import np_cosine, np_relative_error

SHAPE = (256, 1024)


@pytest.fixture(scope="module")
def distributions():
    rng = np.random.default_rng(11)
    return {
        "gaussian": (rng.standard_normal(SHAPE) * 0.02).astype(np.float32),
        "student_t4": (rng.standard_t(4.0, size=SHAPE) * 0.02).astype(np.float32),
    }


def _quantize(w, **fields):
    cfg = DiffusionQuantConfig(enable_fallback=False, sensitive_patterns=[], **fields)
    return ArrowQuantV2().quantize({"blocks.0.linear.weight": w}, config=cfg)["blocks.0.linear.weight"]


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("dist", ["gaussian", "student_t4"])
def test_search_has_lower_error_than_minmax_at_every_bit_width(distributions, dist, symmetric):
    w = distributions[dist]
    for bits in (2, 3, 4, 8):
        search = _quantize(w, bit_width=bits, symmetric=symmetric)
        minmax = _quantize(w, bit_width=bits, symmetric=symmetric, scale_method="minmax")
        e_search = np_relative_error(w, search.dequantize())
        e_minmax = np_relative_error(w, minmax.dequantize())
        assert e_search < e_minmax, (dist, bits, e_search, e_minmax)
        assert np_cosine(w, search.dequantize()) >= np_cosine(w, minmax.dequantize())


@pytest.mark.parametrize("method", ["search", "minmax"])
@pytest.mark.parametrize("dist", ["gaussian", "student_t4"])
def test_error_falls_as_bits_rise_and_reported_metrics_are_exact(distributions, dist, method):
    w = distributions[dist]
    errors = []
    for bits in (2, 3, 4, 8):
        q = _quantize(w, bit_width=bits, scale_method=method, group_size=64)
        deq = q.dequantize()
        err = np_relative_error(w, deq)
        errors.append(err)
        assert q.relative_error == pytest.approx(err, rel=1e-9)
        assert q.cosine_similarity == pytest.approx(np_cosine(w, deq), abs=1e-9)
    assert errors == sorted(errors, reverse=True) and len(set(errors)) == 4


def test_smaller_groups_do_not_increase_error(distributions):
    w = distributions["student_t4"]
    errs = [np_relative_error(w, _quantize(w, bit_width=3, group_size=g).dequantize()) for g in (0, 256, 128, 64, 32)]
    assert errs == sorted(errs, reverse=True)


@pytest.mark.parametrize("symmetric", [False, True], ids=["asym", "sym"])
@pytest.mark.parametrize("group", [32, 128, 0], ids=lambda g: f"g{g}")
def test_search_is_never_worse_than_minmax_on_any_group(distributions, group, symmetric):
    # min/max is among the search's candidates, so no single group may lose
    for dist, w in distributions.items():
        w64 = w.astype(np.float64)
        glen = group or SHAPE[1]
        for bits in (2, 4):
            s = _quantize(w, bit_width=bits, group_size=group, symmetric=symmetric).dequantize()
            m = _quantize(w, bit_width=bits, group_size=group, symmetric=symmetric, scale_method="minmax").dequantize()
            es = ((w64 - s) ** 2).reshape(SHAPE[0], -1, glen).sum(-1)
            em = ((w64 - m) ** 2).reshape(SHAPE[0], -1, glen).sum(-1)
            assert (es <= em * (1 + 1e-5)).all(), (dist, bits)
