"""Calibration recorded in shares (issue 14): shards of one recording, each a share of its runs with
its calls numbered in the whole recording, merge into the file one recorder writes with the same
rules (holdout_rule="sample"), but for floating-point summation order in the Hessians and step
sums."""

from __future__ import annotations

import numpy as np
import pyarrow.parquet as pq
import pytest

torch = pytest.importorskip("torch")

import arrow_quant_v2 as aq  # noqa: E402
from arrow_quant_v2.calibration import (CalibrationRecorder, holdout_by_sample, load_calibration,  # noqa: E402
                                        merge_calibration, record_pipeline)
from arrow_quant_v2.errors import ConfigurationError, ModelFormatError  # noqa: E402

from test_calibration_scale import Pipe, _model  # noqa: E402

RUNS = [{"seed": s} for s in range(4)]
SETUP = dict(num_bins=3, max_samples=16, input_samples=8, hessian_bins=None)  # 4 runs x 6 steps: 24 calls, 16 kept


def _rows(path):
    return {(r["layer"], r["bin"], r["split"]): r for r in pq.read_table(path).to_pylist()}


def assert_same_recording(merged, single):
    """Every column equal, but step_sum and the Hessians up to summation order."""
    a, b = _rows(merged), _rows(single)
    assert a.keys() == b.keys()
    exact = total = 0
    for key in a:
        ra, rb = a[key], b[key]
        for col in ra:
            if col == "step_sum":
                assert ra[col] == pytest.approx(rb[col], rel=1e-12), key
            elif col == "hessian" and ra[col] is not None:
                ha, hb = np.asarray(ra[col]), np.asarray(rb[col])
                np.testing.assert_allclose(ha, hb, rtol=2e-6, atol=1e-6 * np.abs(hb).max(), err_msg=str(key))
                exact += int((ha == hb).sum())
                total += ha.size
            else:
                assert ra[col] == rb[col], (key, col)
    assert total and exact / total > 0.99  # float32 rounding of the same float64 sum, nearly always equal
    assert pq.ParquetFile(merged).schema_arrow.metadata[b"arrowquant.samples"] == \
        pq.ParquetFile(single).schema_arrow.metadata[b"arrowquant.samples"]


@pytest.mark.parametrize("splits", [[(0, 1), (1, 4)], [(0, 2), (2, 3), (3, 4)]], ids=["1+3", "2+1+1"])
def test_shards_merge_into_the_file_one_recorder_writes(tmp_path, splits):
    pipe = Pipe(_model())
    single = tmp_path / "single.parquet"
    record_pipeline(pipe, RUNS, 6, holdout_rule="sample", output_path=single, progress=False, **SETUP)
    shards = []
    for i, (a, b) in enumerate(splits):
        path = tmp_path / f"shard-{i}.parquet"
        # the last shard records in passes (max_memory), as a big model's would
        extra = dict(max_memory=3 * 16 * 16 * 8) if i == len(splits) - 1 else {}
        record_pipeline(Pipe(_model()), RUNS[a:b], 6, shard=(a, len(RUNS)), output_path=path, progress=False,
                        **SETUP, **extra)
        shards.append(path)
    merged = merge_calibration(shards[::-1], tmp_path / "merged.parquet")  # any order
    assert_same_recording(merged, single)
    # held-out rows and input samples are there to compare
    rows = _rows(single)
    assert any(k[2] == "holdout" for k in rows) and any(r["inputs"] for r in rows.values())
    # and the engine reads the merged file like the single one
    data = load_calibration(merged)
    assert len(data) > 0


def test_shards_and_the_engine_and_loader_keep_them_apart(tmp_path):
    path = tmp_path / "shard.parquet"
    record_pipeline(Pipe(_model()), RUNS[:2], 6, shard=(0, 4), output_path=path, progress=False, **SETUP)
    with pytest.raises(ModelFormatError, match="shard of a recording"):
        load_calibration(path)
    # the engine refuses it too, naming what to do
    (tmp_path / "model").mkdir()
    model = _model()
    state = {k: v.detach().numpy() for k, v in model.state_dict().items()}
    from conftest import write_model_file
    write_model_file(tmp_path / "model" / "model.safetensors", state)
    with pytest.raises(ModelFormatError, match="merge_calibration"):
        aq.ArrowQuantV2().quantize_diffusion_model(tmp_path / "model", tmp_path / "out",
                                                   aq.DiffusionQuantConfig(calibration_path=str(path)))


def test_merge_refuses_what_is_not_one_recording(tmp_path):
    a, b, c = (tmp_path / f"{n}.parquet" for n in "abc")
    record_pipeline(Pipe(_model()), RUNS[:2], 6, shard=(0, 4), output_path=a, progress=False, **SETUP)
    record_pipeline(Pipe(_model()), RUNS[1:3], 6, shard=(1, 4), output_path=b, progress=False, **SETUP)
    with pytest.raises(ConfigurationError, match="overlap"):
        merge_calibration([a, b], tmp_path / "m.parquet")
    record_pipeline(Pipe(_model()), RUNS[2:], 6, shard=(2, 4), output_path=c, progress=False,
                    **dict(SETUP, num_bins=5))
    with pytest.raises(ConfigurationError, match="num_bins"):
        merge_calibration([a, c], tmp_path / "m.parquet")
    plain = tmp_path / "plain.parquet"
    record_pipeline(Pipe(_model()), RUNS, 6, output_path=plain, progress=False, **SETUP)
    with pytest.raises(ModelFormatError, match="not a calibration shard"):
        merge_calibration([a, plain], tmp_path / "m.parquet")
    assert not (tmp_path / "m.parquet").exists()


def test_sharded_recording_needs_the_sample_rule_and_the_whole_count():
    with pytest.raises(ConfigurationError, match="holdout_rule='sample' and total_calls"):
        CalibrationRecorder(torch.nn.Linear(4, 4), call_offset=8, total_calls=16)
    with pytest.raises(ConfigurationError, match="holdout_rule='sample' and total_calls"):
        CalibrationRecorder(torch.nn.Linear(4, 4), holdout_rule="sample", shard=True)
    with pytest.raises(ConfigurationError, match="holdout_rule"):
        CalibrationRecorder(torch.nn.Linear(4, 4), holdout_rule="random")
    with pytest.raises(ConfigurationError, match="shard must be"):
        record_pipeline(Pipe(_model()), RUNS[:2], 6, shard=(3, 4), progress=False)


@pytest.mark.parametrize("every", [2, 3, 4, 8])
def test_the_sample_rule_holds_out_one_in_every_and_starves_no_stride(every):
    # consecutive samples (one bin's calls in one run): exactly one held out per group of `every`
    for group in range(200):
        assert sum(holdout_by_sample(group * every + i, every) for i in range(every)) == 1
    # a bin visited once per run is a stride of the run's recorded calls: independent draws
    p = 1 / every
    sigma = (40 * p * (1 - p)) ** 0.5
    for stride in range(every, 101):
        held = sum(holdout_by_sample(7 + k * stride, every) for k in range(40))
        assert abs(held - 40 * p) <= 4.5 * sigma + 1, (stride, held)
    assert not any(holdout_by_sample(s, 0) for s in range(100))
