"""progress_callback(message, progress): regular, monotone, ending at 1.0, and a failing callback
does not hurt the run."""

import os
import re
import warnings

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig

from conftest import layer_weights, leftovers, write_model_file

COUNT = re.compile(r"(\d+)/(\d+)")


@pytest.fixture
def many_layers(tmp_path, rng):
    src = tmp_path / "src"
    src.mkdir()
    arrays = layer_weights(rng, 34, shape=(32, 64))
    for i in range(3):
        arrays[f"blocks.{i}.linear.bias"] = rng.standard_normal(32).astype(np.float32)
    write_model_file(src / "model.safetensors", arrays)
    return src, arrays


def _counts(message):
    m = COUNT.search(message)
    assert m, f"no N/M count in {message!r}"
    return int(m.group(1)), int(m.group(2))


def test_callback_is_called_every_ten_layers_and_once_at_the_end(many_layers, tmp_path, quantizer):
    src, arrays = many_layers
    calls = []
    result = quantizer.quantize_diffusion_model(src, tmp_path / "out", progress_callback=lambda m, p: calls.append((m, p)))
    total = len(arrays)
    assert total >= 30
    assert len(calls) >= total // 10 + 1
    for message, progress in calls:
        assert isinstance(message, str) and isinstance(progress, float)
        assert 0.0 <= progress <= 1.0
    counts = [_counts(m) for m, _ in calls]
    assert all(m == total for _, m in counts)
    done = [n for n, _ in counts]
    assert done == sorted(done)
    # never more than 10 layers between two calls
    assert done[0] <= 10
    assert all(b - a <= 10 for a, b in zip(done, done[1:]))
    # progress never goes back and ends at exactly 1.0, once, on the last call
    progresses = [p for _, p in calls]
    assert progresses == sorted(progresses)
    assert progresses[-1] == 1.0 and progresses.count(1.0) == 1
    assert done[-1] == total
    assert result["errors"] == []


def test_messages_carry_the_layer_count_and_an_eta(many_layers, tmp_path, quantizer):
    src, _ = many_layers
    calls = []
    quantizer.quantize_diffusion_model(src, tmp_path / "out", progress_callback=lambda m, p: calls.append((m, p)))
    intermediate = [m for m, p in calls if p < 1.0]
    assert intermediate, "no call before the end"
    for message in intermediate:
        assert "ETA" in message
        _counts(message)
    _counts(calls[-1][0])


def test_a_raising_callback_is_reported_once_and_the_run_completes(many_layers, tmp_path, quantizer):
    src, arrays = many_layers
    calls = []

    def bad(message, progress):
        calls.append(progress)
        raise ValueError("callback exploded")

    out = tmp_path / "out"
    with pytest.warns(RuntimeWarning, match="progress_callback") as record:
        result = quantizer.quantize_diffusion_model(src, out, progress_callback=bad)
    runtime = [w for w in record if issubclass(w.category, RuntimeWarning)]
    assert len(runtime) == 1
    assert "callback exploded" in str(runtime[0].message)
    assert len(calls) > 1  # later calls went on
    assert any("callback exploded" in w for w in result["warnings"])
    # the model is complete and valid
    assert quantizer.validate_quality(src, out)["passed"] is True
    assert len(aq.load(out)) == len(arrays)
    assert leftovers(tmp_path) == []


def test_a_callback_that_always_raises_appears_once_in_the_result_warnings(many_layers, tmp_path, quantizer):
    # "An exception raised by the callback is reported once (a RuntimeWarning, and in the
    # result's warnings)" -- not once per call.
    src, _ = many_layers
    calls = []

    def bad(message, progress):
        calls.append(progress)
        raise ValueError("callback exploded")

    with pytest.warns(RuntimeWarning):
        result = quantizer.quantize_diffusion_model(src, tmp_path / "out", progress_callback=bad)
    assert len(calls) > 1
    mentions = [w for w in result["warnings"] if "callback exploded" in w]
    assert len(mentions) == 1, result["warnings"]


def test_keyboard_interrupt_in_the_callback_stops_the_run_and_leaves_nothing(many_layers, tmp_path, quantizer):
    src, _ = many_layers

    def interrupt(message, progress):
        raise KeyboardInterrupt

    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        quantizer.quantize_diffusion_model(src, out, progress_callback=interrupt)
    assert not out.exists()
    assert leftovers(tmp_path) == []


def test_no_callback_means_no_progress_output(many_layers, tmp_path, quantizer, capsys):
    src, _ = many_layers
    quantizer.quantize_diffusion_model(src, tmp_path / "out")
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
