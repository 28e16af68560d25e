"""Faults: SIGTERM, kill -9, a disk that fills up, stale staging directories, and resume.

A run stopped any way leaves either nothing or (killed outright, or interrupted with resume) its
hidden staging directory, which the next run into the same output removes or, with resume,
continues from: the result is byte-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from conftest import tree_digest

from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
from arrow_quant_v2.errors import ArrowQuantError
from safetensors.numpy import save_file

TENSORS = 48


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    d = tmp_path_factory.mktemp("faults") / "model"
    d.mkdir()
    rng = np.random.default_rng(7)
    weights = {f"blocks.{i}.attn.to_q.weight": rng.standard_normal((256, 512)).astype(np.float32)
               for i in range(TENSORS)}
    weights["blocks.0.norm.weight"] = np.ones(512, np.float32)
    save_file(weights, str(d / "model.safetensors"))
    (d / "config.json").write_text(json.dumps({"_class_name": "Toy"}))
    return d


def hidden(parent, name):
    return sorted(e for e in os.listdir(parent) if e.startswith(f".{name}.arrowquant-"))


# The child quantizes with a progress callback that prints each call (so the parent knows it is
# under way) and slows the run a little, so that a signal lands in the middle.
CHILD = textwrap.dedent("""
    import sys, time
    from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
    model, out, resume = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
    def progress(message, fraction):
        print(f"progress {fraction:.3f}", flush=True)
        time.sleep(0.15)
    cfg = DiffusionQuantConfig.from_profile("local", num_threads=1)
    r = ArrowQuantV2().quantize_diffusion_model(model, out, config=cfg, progress_callback=progress, resume=resume)
    print("done", flush=True)
""")


def run_child_and_signal(model, out, sig, resume=False, after=0.2):
    """Starts the child, waits until it reports a fraction >= after, sends sig, waits for it."""
    p = subprocess.Popen([sys.executable, "-c", CHILD, str(model), str(out), "1" if resume else "0"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    seen = 0.0
    for line in p.stdout:
        if line.startswith("progress"):
            seen = float(line.split()[1])
            if seen >= after:
                p.send_signal(sig)
                break
    _, err = p.communicate(timeout=120)
    assert 0 < seen < 1, f"the child did not stop in the middle (last fraction {seen}): {err}"
    return p.returncode, err


def config():
    return DiffusionQuantConfig.from_profile("local", num_threads=1)


@pytest.fixture(scope="module")
def reference(model, tmp_path_factory):
    out = tmp_path_factory.mktemp("reference") / "out"
    ArrowQuantV2().quantize_diffusion_model(model, out, config=config())
    return tree_digest(out)


def test_sigterm_stops_like_ctrl_c_and_leaves_nothing(model, tmp_path):
    out = tmp_path / "out"
    rc, err = run_child_and_signal(model, out, signal.SIGTERM)
    assert rc == -signal.SIGTERM, err  # ends as SIGTERM asks, after cleaning up
    assert "terminated by SIGTERM" in err
    assert not out.exists()
    assert hidden(tmp_path, "out") == []


def test_sigterm_with_resume_keeps_the_run_for_the_next_resume(model, tmp_path, reference):
    out = tmp_path / "out"
    rc, err = run_child_and_signal(model, out, signal.SIGTERM, resume=True)
    assert rc == -signal.SIGTERM, err
    assert "the same command with resume continues" in err
    assert not out.exists() and len(hidden(tmp_path, "out")) == 1
    r = ArrowQuantV2().quantize_diffusion_model(model, out, config=config(), resume=True)
    assert 0 < r["resume"]["tensors"] < TENSORS + 1
    assert tree_digest(out) == reference
    assert hidden(tmp_path, "out") == []


def test_after_kill_9_the_next_run_removes_the_stale_staging_directory(model, tmp_path, reference):
    out = tmp_path / "out"
    rc, _ = run_child_and_signal(model, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    stale = hidden(tmp_path, "out")
    assert len(stale) == 1 and not out.exists()  # nothing can clean up after kill -9 itself
    r = ArrowQuantV2().quantize_diffusion_model(model, out, config=config())
    assert r["resume"]["tensors"] == 0
    assert hidden(tmp_path, "out") == []
    assert tree_digest(out) == reference


def test_resume_after_kill_9_is_byte_identical_to_an_uninterrupted_run(model, tmp_path, reference):
    out = tmp_path / "out"
    rc, _ = run_child_and_signal(model, out, signal.SIGKILL, after=0.5)
    assert rc == -signal.SIGKILL
    [stale] = hidden(tmp_path, "out")
    r = ArrowQuantV2().quantize_diffusion_model(model, out, config=config(), resume=True)
    assert r["resume"]["resumed_from"] == str(tmp_path / stale)
    assert r["resume"]["tensors"] >= TENSORS // 3
    assert len(r["layers"]) == TENSORS + 1
    assert tree_digest(out) == reference
    assert hidden(tmp_path, "out") == []


def test_resume_in_the_same_process_after_ctrl_c(model, tmp_path, reference):
    out = tmp_path / "out"
    calls = []

    def stop_halfway(message, fraction):
        calls.append(fraction)
        if fraction >= 0.5:
            raise KeyboardInterrupt

    q = ArrowQuantV2()
    with pytest.raises(KeyboardInterrupt, match="kept in"):
        q.quantize_diffusion_model(model, out, config=config(), progress_callback=stop_halfway, resume=True)
    assert len(hidden(tmp_path, "out")) == 1
    r = q.quantize_diffusion_model(model, out, config=config(), resume=True)
    assert r["resume"]["tensors"] > 0
    assert tree_digest(out) == reference


def test_ctrl_c_without_resume_leaves_nothing(model, tmp_path):
    out = tmp_path / "out"

    def stop(message, fraction):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt, match="no output was written"):
        ArrowQuantV2().quantize_diffusion_model(model, out, config=config(), progress_callback=stop)
    assert not out.exists() and hidden(tmp_path, "out") == []


def test_resume_with_another_config_starts_over_and_says_why(model, tmp_path):
    out = tmp_path / "out"
    rc, _ = run_child_and_signal(model, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    other = DiffusionQuantConfig.from_profile("edge", num_threads=1)
    r = ArrowQuantV2().quantize_diffusion_model(model, out, config=other, resume=True)
    assert r["resume"]["tensors"] == 0
    assert "the configuration differs" in r["resume"]["reason"]
    assert any("the configuration differs" in w for w in r["warnings"])
    fresh = tmp_path / "fresh"
    ArrowQuantV2().quantize_diffusion_model(model, fresh, config=other)
    assert tree_digest(out) == tree_digest(fresh)


def test_resume_after_the_source_changed_starts_over(model, tmp_path):
    src = tmp_path / "model"
    src.mkdir()
    for f in os.listdir(model):
        (src / f).write_bytes((model / f).read_bytes())
    out = tmp_path / "out"
    rc, _ = run_child_and_signal(src, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    os.utime(src / "model.safetensors", ns=(1, 1))  # another modification time: another file
    r = ArrowQuantV2().quantize_diffusion_model(src, out, config=config(), resume=True)
    assert r["resume"]["tensors"] == 0 and "source weights changed" in r["resume"]["reason"]


def test_a_live_runs_staging_directory_is_never_touched(model, tmp_path):
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        live = tmp_path / f".out.arrowquant-tmp-{sleeper.pid}-1-0"
        live.mkdir()
        (live / "weights.parquet").write_bytes(b"partial")
        ArrowQuantV2().quantize_diffusion_model(model, tmp_path / "out", config=config())
        assert live.exists() and (live / "weights.parquet").read_bytes() == b"partial"
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_dead_runs_staging_directory_without_owner_file_is_removed(model, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = tmp_path / f".out.arrowquant-tmp-{gone.pid}-1-0"
    dead.mkdir()
    (dead / "weights.parquet").write_bytes(b"partial")
    unrelated = tmp_path / f".other.arrowquant-tmp-{gone.pid}-1-0"
    unrelated.mkdir()
    ArrowQuantV2().quantize_diffusion_model(model, tmp_path / "out", config=config())
    assert not dead.exists()
    assert unrelated.exists()  # another destination's: not this run's business


def test_a_replacement_killed_after_moving_the_old_output_aside_gets_it_back(model, tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    out = tmp_path / "out"
    aside = tmp_path / f".out.arrowquant-old-{gone.pid}-1-0"
    aside.mkdir()
    (aside / "manifest.json").write_text("{}")
    with pytest.raises(ArrowQuantError, match="already exists"):
        ArrowQuantV2().quantize_diffusion_model(model, out, config=config())
    assert (out / "manifest.json").read_text() == "{}" and not aside.exists()


DISK_FULL = textwrap.dedent("""
    import resource, signal, sys
    from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
    from arrow_quant_v2.errors import ArrowQuantError
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # writes past the limit fail with EFBIG instead
    resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
    try:
        ArrowQuantV2().quantize_diffusion_model(sys.argv[1], sys.argv[2],
                                                config=DiffusionQuantConfig.from_profile("local", num_threads=1),
                                                resume=len(sys.argv) > 3)
    except ArrowQuantError as e:
        print(type(e).__name__, e)
        sys.exit(3)
""")


def test_a_write_that_fails_midway_names_the_file_and_leaves_nothing(model, tmp_path):
    # A file-size limit makes writes fail as a full disk does (EFBIG rather than ENOSPC): the
    # weights file grows past 1 MiB once the journal's tensors are written into it.
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", DISK_FULL, str(model), str(out)], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "weights.parquet" in r.stdout and "File too large" in r.stdout, r.stdout
    assert not out.exists() and hidden(tmp_path, "out") == []


def test_a_resumable_run_that_fails_keeps_its_tensors_for_the_next_resume(model, tmp_path, reference):
    # With resume, an error (here the full disk while weights.parquet is written from the journal)
    # keeps the staging directory, as an interruption does: after making room, the same command
    # with resume continues from the journal.
    out = tmp_path / "out"
    r = subprocess.run([sys.executable, "-c", DISK_FULL, str(model), str(out), "resume"], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 3, r.stdout + r.stderr
    assert "File too large" in r.stdout and "are kept in" in r.stdout, r.stdout
    assert "the same command with resume continues from there" in r.stdout
    assert not out.exists() and len(hidden(tmp_path, "out")) == 1
    res = ArrowQuantV2().quantize_diffusion_model(model, out, config=config(), resume=True)
    assert 0 < res["resume"]["tensors"] <= TENSORS + 1  # the tensors journaled before the write failed
    assert tree_digest(out) == reference
    assert hidden(tmp_path, "out") == []


def test_cli_resume_flag(model, tmp_path, reference):
    out = tmp_path / "out"
    rc, _ = run_child_and_signal(model, out, signal.SIGKILL)
    assert rc == -signal.SIGKILL
    cli = os.path.join(os.path.dirname(sys.executable), "arrowquant")
    r = subprocess.run([cli, "quantize", str(model), str(out), "--profile", "local", "--threads", "1", "--resume"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "resumed" in r.stdout
    assert tree_digest(out) == reference
