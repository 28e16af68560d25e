"""Quantizing on a Ray cluster (arrow_quant_v2.cluster, arrowquant quantize --ray, arrowquant zoo):
a local cluster of two nodes, started and stopped here, on this machine.

What must hold: a distributed run's output is byte-identical to the local run's, for any split
into parts, when a worker is killed mid-part, and when the driver does parts itself; a zoo runs
every model x profile and reports a corrupt model without stopping; without Ray the same calls
run here.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import numpy as np
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import cli
from arrow_quant_v2.cluster import quantize_distributed
from arrow_quant_v2.zoo import SUMMARY_FILE, format_summary, run_zoo

from conftest import leftovers, tree_digest, write_model_file

ray = pytest.importorskip("ray")  # scripts/test.sh installs it; without it the local fallback is tested below
from ray.cluster_utils import Cluster  # noqa: E402


@pytest.fixture(scope="module")
def cluster():
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    c.add_node(num_cpus=1)
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False, configure_logging=False)
    # a worker process started on each node before the tests time anything
    warm = ray.remote(lambda: (time.sleep(0.5), ray.get_runtime_context().get_node_id())[1])
    assert len(set(ray.get([warm.options(scheduling_strategy="SPREAD").remote() for _ in range(4)]))) == 2
    try:
        yield c
    finally:
        ray.shutdown()
        c.shutdown()


def _sharded_model(root, rng, layers=6, rows=256, cols=512):
    """An HF folder of two safetensors shards and their index, plus a config.json."""
    root.mkdir(parents=True)
    arrays = {f"blocks.{i}.{kind}.weight": (rng.standard_t(5.0, size=(rows, cols)) * 0.02).astype(np.float32)
              for i in range(layers) for kind in ("attn", "ff")}
    arrays["norm.weight"] = np.ones(cols, np.float32)
    names = list(arrays)
    half = len(names) // 2
    weight_map = {}
    for k, part in enumerate((names[:half], names[half:]), start=1):
        fname = f"model-{k:05d}-of-00002.safetensors"
        write_model_file(root / fname, {n: arrays[n] for n in part})
        weight_map.update({n: fname for n in part})
    (root / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (root / "config.json").write_text(json.dumps({"architectures": ["DiT"]}))
    return root


def _local(model, out, config):
    return aq.ArrowQuantV2().quantize_diffusion_model(model, out, config)


@pytest.mark.parametrize("settings", [dict(deployment_profile="edge"), dict(scheme="entropy", bit_width=3),
                                      dict(bit_width=4, group_size=64, piece_bytes=40000)],
                         ids=["edge", "entropy3", "affine4-pieces"])
def test_sharded_model_on_two_nodes_is_byte_identical_to_the_local_run(cluster, tmp_path, rng, settings):
    model = _sharded_model(tmp_path / "model", rng)
    config = aq.DiffusionQuantConfig(min_tensor_size=0, **settings)
    _local(model, tmp_path / "local", config)
    expected = tree_digest(tmp_path / "local")
    # parts of one tensor and of a few, each a task spread over both nodes
    for part_bytes, parts in ((1, 13), (3 * 256 * 512 * 4, 5)):  # 12 layers and the norm
        out = tmp_path / f"ray-{part_bytes}"
        r = quantize_distributed(str(model), str(out), config, cluster.address, part_bytes=part_bytes)
        assert tree_digest(out) == expected, part_bytes
        c = r["cluster"]
        assert c["parts"] == parts
        assert c["tensors_from_parts"] == 13 and c["tensors_by_driver"] == 0 and not c["failed_parts"]
        assert c["nodes"] == 2 and c["nodes_used"] == 2, c
    assert leftovers(tmp_path) == []


def test_the_public_api_and_the_command_line_run_on_the_cluster(cluster, tmp_path, rng, capsys):
    model = _sharded_model(tmp_path / "model", rng, layers=2)
    config = aq.DiffusionQuantConfig.from_profile("local", min_tensor_size=0)
    _local(model, tmp_path / "local", config)
    seen = []
    r = aq.ArrowQuantV2().quantize_diffusion_model(model, tmp_path / "api", config, cluster=cluster.address,
                                                    progress_callback=lambda m, p: seen.append((m, p)))
    assert r["cluster"]["backend"] == "ray" and tree_digest(tmp_path / "api") == tree_digest(tmp_path / "local")
    assert seen and seen[-1][1] == 1.0 and all(0.0 <= p <= 1.0 for _, p in seen)
    assert cli.main(["quantize", str(model), str(tmp_path / "cli"), "--profile", "local", "--min-tensor-size", "0",
                     "--ray", cluster.address, "--quiet"]) == 0
    assert "cluster             Ray" in capsys.readouterr().out
    assert tree_digest(tmp_path / "cli") == tree_digest(tmp_path / "local")


def _part_workers():
    """PIDs of Ray worker processes running a part right now (their title: ray::arrowquant_part)."""
    pids = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().startswith(b"ray::arrowquant_part"):
                    pids.append(int(pid))
        except OSError:
            continue
    return pids


def test_a_worker_killed_mid_part_changes_nothing(cluster, tmp_path, rng):
    # entropy-coded (three passes per tensor) 1024 x 1024 tensors, one per part: parts that last
    model = _sharded_model(tmp_path / "model", rng, layers=4, rows=1024, cols=1024)
    config = aq.DiffusionQuantConfig(scheme="entropy", bit_width=4, min_tensor_size=0)
    _local(model, tmp_path / "local", config)
    result, errors, killed = {}, [], []

    def drive():
        try:
            result["r"] = quantize_distributed(str(model), str(tmp_path / "ray"), config, cluster.address,
                                               part_bytes=1)
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=drive)
    t.start()
    deadline = time.monotonic() + 60
    while not killed and t.is_alive() and time.monotonic() < deadline:
        pids = _part_workers()
        if pids:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(pids[0])
        time.sleep(0.01)
    t.join(300)
    assert killed, "no part was caught running"
    assert not errors, errors
    assert tree_digest(tmp_path / "ray") == tree_digest(tmp_path / "local")
    c = result["r"]["cluster"]
    # Ray ran the killed part again: every tensor came from a part (8 layers and the norm)
    assert c["tensors_from_parts"] == 9 and c["tensors_by_driver"] == 0 and not c["failed_parts"], c


def test_an_interrupted_distributed_run_leaves_nothing_or_resumes(cluster, tmp_path, rng):
    model = _sharded_model(tmp_path / "model", rng, layers=4)
    config = aq.DiffusionQuantConfig(bit_width=4, min_tensor_size=0)
    _local(model, tmp_path / "local", config)

    def stop_after(n):
        calls = []

        def progress(done, total, wdone, wtotal, elapsed, eta, current):
            calls.append(current)
            return len(calls) > n  # True asks the run to stop, as Ctrl-C does

        return progress

    with pytest.raises(KeyboardInterrupt):
        quantize_distributed(str(model), str(tmp_path / "out"), config, cluster.address, part_bytes=1,
                             progress=stop_after(3))
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()
    with pytest.raises(KeyboardInterrupt):
        quantize_distributed(str(model), str(tmp_path / "out"), config, cluster.address, part_bytes=1,
                             progress=stop_after(3), resume=True)
    assert len(leftovers(tmp_path)) == 1  # kept for the resume
    r = quantize_distributed(str(model), str(tmp_path / "out"), config, cluster.address, part_bytes=1, resume=True)
    assert r["resume"]["resumed_from"] and r["resume"]["tensors"] >= 1
    assert tree_digest(tmp_path / "out") == tree_digest(tmp_path / "local")
    assert leftovers(tmp_path) == []


def test_a_part_error_is_raised_as_the_engine_would(cluster, tmp_path):
    (tmp_path / "model").mkdir()
    w = np.ones((64, 64), np.float32)
    w[3, 4] = np.nan
    write_model_file(tmp_path / "model" / "model.safetensors", {"blocks.0.weight": w})
    config = aq.DiffusionQuantConfig(min_tensor_size=0, fail_fast=True)
    with pytest.raises(aq.NonFiniteWeightError, match=r"blocks\.0\.weight.*\[3, 4\]"):
        quantize_distributed(str(tmp_path / "model"), str(tmp_path / "out"), config, cluster.address)
    assert leftovers(tmp_path) == [] and not (tmp_path / "out").exists()


def _zoo(tmp_path, rng):
    models = tmp_path / "models"
    for i in range(6):
        (models / f"m{i}").mkdir(parents=True)
        write_model_file(models / f"m{i}" / "model.safetensors",
                         {f"blocks.{k}.attn.weight": (rng.standard_normal((256, 512)) * 0.02).astype(np.float32)
                          for k in range(3)})
    with open(models / "m3" / "model.safetensors", "r+b") as f:
        f.write(b"\xff" * 8)  # a header length no file can have
    (tmp_path / "zoo.yaml").write_text(
        "output: out\nprofiles: [edge, local, cloud]\nconfig: {min_tensor_size: 0}\n"
        "models: [models/m0, models/m1, models/m2, models/m3, models/m4, {path: models/m5, name: five}]\n")
    return tmp_path / "zoo.yaml"


def test_a_zoo_of_six_models_and_three_profiles_reports_the_corrupt_one(cluster, tmp_path, rng, capsys):
    config = _zoo(tmp_path, rng)
    seen = []
    summary = run_zoo(config, cluster=cluster.address, progress=lambda done, total, row: seen.append((done, total)))
    assert summary["backend"] == "ray" and summary["nodes_used"] == 2
    assert summary["done"] == 15 and summary["failed"] == 3 and len(summary["jobs"]) == 18
    assert seen[-1] == (18, 18) and len(seen) == 18
    for row in summary["jobs"]:
        if row["name"] == "m3":
            assert row["status"] == "failed" and "ModelFormatError" in row["error"]
            assert "m3/model.safetensors" in row["error"] and "header length" in row["error"]
        else:
            assert row["status"] == "done", row
            assert row["bits_per_weight"] > 0 and row["worst_layer"].startswith("blocks.")
            # each job's output is the one a local run gives
            local = tmp_path / "check" / f"{row['name']}-{row['profile']}"
            _local(row["model"], local, aq.DiffusionQuantConfig.from_profile(row["profile"], min_tensor_size=0,
                                                                            overwrite=True, num_threads=1))
            assert tree_digest(row["output"]) == tree_digest(local)
    assert json.loads((tmp_path / "out" / SUMMARY_FILE).read_text())["failed"] == 3
    table = format_summary(summary)
    assert "| five | cloud |" in table and "failed: ModelFormatError" in table
    # the command: same summary, exit status 1 for the failed model
    assert cli.main(["zoo", str(config), "--ray", cluster.address, "--quiet"]) == 1
    assert "15 done, 3 failed" in capsys.readouterr().out


def test_without_ray_the_same_calls_run_here(tmp_path, rng, monkeypatch):
    import arrow_quant_v2.api as api
    import arrow_quant_v2.zoo as zoo

    monkeypatch.setattr(api, "ray_available", lambda: False)
    monkeypatch.setattr(zoo, "ray_available", lambda: False)
    model = _sharded_model(tmp_path / "model", rng, layers=2)
    config = aq.DiffusionQuantConfig(min_tensor_size=0)
    _local(model, tmp_path / "local", config)
    with pytest.warns(RuntimeWarning, match=r"needs Ray, which is not installed.*arrow_quant_v2\[ray\]"):
        r = aq.ArrowQuantV2().quantize_diffusion_model(model, tmp_path / "out", config, cluster="ray")
    assert "cluster" not in r and tree_digest(tmp_path / "out") == tree_digest(tmp_path / "local")
    with pytest.warns(RuntimeWarning, match="needs Ray"):
        summary = run_zoo(_zoo(tmp_path / "z", rng), cluster="ray")
    assert summary["backend"] == "local" and summary["done"] == 15 and summary["failed"] == 3


def test_cluster_argument_is_checked(tmp_path):
    with pytest.raises(aq.ConfigurationError, match="cluster must be"):
        aq.ArrowQuantV2().quantize_diffusion_model(tmp_path, tmp_path / "out", cluster=3)


def test_calibration_recorded_on_two_nodes_is_the_file_one_machine_records(cluster, tmp_path):
    pytest.importorskip("torch")
    from ray import cloudpickle

    import test_calibration_scale
    from arrow_quant_v2.cluster import record_on_ray
    from arrow_quant_v2.calibration import record_pipeline
    from test_calibration_shards import RUNS, SETUP, assert_same_recording

    # the workers cannot import the test modules: their classes travel by value
    cloudpickle.register_pickle_by_value(test_calibration_scale)

    Pipe, model = test_calibration_scale.Pipe, test_calibration_scale._model

    def make_pipe():
        return Pipe(model())

    single = tmp_path / "single.parquet"
    record_pipeline(make_pipe(), RUNS, 6, holdout_rule="sample", output_path=single, progress=False, **SETUP)
    r = record_on_ray(make_pipe, RUNS, 6, tmp_path / "ray.parquet", cluster=cluster.address, workers=3, **SETUP)
    assert r["backend"] == "ray" and r["shards"] == 3 and r["calls"] == 24 and r["nodes_used"] == 2, r
    assert_same_recording(r["path"], single)
    assert sorted(os.listdir(tmp_path)) == ["ray.parquet", "single.parquet"]  # the shards are gone
    # and the quantized model is the one the single file gives
    state = {k: v.detach().numpy() for k, v in make_pipe().transformer.state_dict().items()}
    (tmp_path / "model").mkdir()
    write_model_file(tmp_path / "model" / "model.safetensors", state)
    outs = []
    for name, calib in (("a", single), ("b", r["path"])):
        res = aq.ArrowQuantV2().quantize_diffusion_model(
            tmp_path / "model", tmp_path / name,
            aq.DiffusionQuantConfig(calibration_path=str(calib), min_tensor_size=0, num_time_groups=2))
        assert res["time_aware"]["applied"]
        outs.append(res)
    cos = [[l["cosine_similarity"] for l in o["layers"] if l["quantized"]] for o in outs]
    assert cos[0] and cos[0] == pytest.approx(cos[1], rel=1e-5)


def test_the_sequential_calibrated_path_quantizes_its_blocks_on_the_cluster(cluster, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("safetensors")
    import torch

    from arrow_quant_v2.calibration import calibrate_and_quantize
    from test_calibration_scale import SavablePipe
    from test_calibration_sequential import RUNS as SEQ_RUNS, PosDiT, _config

    torch.manual_seed(1)
    model = PosDiT(32).eval()
    kw = dict(num_inference_steps=4, num_bins=4, sequential=True, progress=False)
    here = calibrate_and_quantize(SavablePipe(model), SEQ_RUNS, tmp_path / "here", _config(), **kw)
    there = calibrate_and_quantize(SavablePipe(model), SEQ_RUNS, tmp_path / "there", _config(),
                                   cluster=cluster.address, **kw)
    assert there["cluster"]["backend"] == "ray" and "cluster" not in here
    # every block's run and the final one on the cluster: the same weights, the same file
    assert (tmp_path / "here" / "weights.parquet").read_bytes() == (tmp_path / "there" / "weights.parquet").read_bytes()
