"""What the run journal costs and what resume saves (issue 13), on a Dream-7B-shaped model.

Every run journals each finished tensor (one Arrow IPC file) and writes weights.parquet from the
journal, so that a killed run can be resumed. This measures, in fresh processes on one generated
model (Dream-7B's tensor shapes, `--layers` of its 28 decoder layers, bf16):

- a full run of this build: time, the part spent writing weights.parquet from the journal, peak
  RSS above the process's baseline;
- with `--baseline DIR` (a folder holding an older `arrow_quant_v2` package, e.g. one built from
  the commit before the journal), the same run of that build, alternated with this one's
  (`--rounds`), as a ratio: the machine's speed drifts;
- a run killed with SIGKILL once `--kill-at` of the weights are done, then resumed: the resumed
  run's time against a full run's, and the result byte-identical to the full run.

    .venv/bin/python benchmarks/bench_resume.py [--layers 1] [--profile local] [--baseline DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile

from _measure import PEAK_PREAMBLE, build_env
from arrow_quant_v2.demo import generate_diffusion_lm

# imports first: the baseline is the resident set with the package loaded
CHILD = "import json, sys, time\nimport arrow_quant_v2 as aq\n" + PEAK_PREAMBLE + r"""
model, out, profile, resume, kill_at = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1", float(sys.argv[5])
cfg = aq.DiffusionQuantConfig.from_profile(profile, overwrite=True)
def progress(message, fraction):
    if kill_at > 0 and fraction >= kill_at:
        print("killing at", fraction, flush=True)
        import os, signal
        os.kill(os.getpid(), signal.SIGKILL)
kwargs = {"resume": True} if resume else {}
t = time.perf_counter()
r = aq.ArrowQuantV2().quantize_diffusion_model(model, out, cfg, progress_callback=progress, **kwargs)
dt = time.perf_counter() - t
print(json.dumps({"seconds": dt, "peak": status('VmHWM:') - base, "journal": r.get("parquet_from_journal_s"),
                  "resumed": (r.get("resume") or {}).get("tensors", 0), "tensors": len(r["layers"])}))
"""


def run(model: str, out: str, profile: str, pythonpath: str | None = None, resume: bool = False,
        kill_at: float = 0.0) -> dict:
    env = build_env(pythonpath)
    p = subprocess.run([sys.executable, "-c", CHILD, model, out, profile, "1" if resume else "0", str(kill_at)],
                       capture_output=True, text=True, env=env)
    if kill_at > 0:
        assert p.returncode == -signal.SIGKILL, p.stderr
        return {}
    if p.returncode != 0:
        raise RuntimeError(p.stderr)
    return json.loads(p.stdout.strip().splitlines()[-1])


def digest(root: str) -> dict:
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            with open(os.path.join(d, f), "rb") as fh:
                out[os.path.relpath(os.path.join(d, f), root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--profile", default="local")
    p.add_argument("--baseline", help="folder with another build of arrow_quant_v2 to compare with")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--kill-at", type=float, default=0.6)
    p.add_argument("--workdir")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="aq-resume-")
    try:
        model = os.path.join(work, "dream")
        info = generate_diffusion_lm(model, layers=a.layers, hidden=3584, intermediate=18944, vocab=152064,
                                     overwrite=True, kv_dim=512, qkv_bias=True)
        full = os.path.join(work, "full")
        rows = []
        for _ in range(a.rounds):
            rows.append(("this build", run(model, full, a.profile)))
            if a.baseline:
                rows.append(("baseline", run(model, os.path.join(work, "base"), a.profile, pythonpath=a.baseline)))
        reference = digest(full)
        out = os.path.join(work, "resumed")
        run(model, out, a.profile, kill_at=a.kill_at)
        resumed = run(model, out, a.profile, resume=True)
        same = digest(out) == reference
        print(f"Dream-7B shapes, {a.layers} layer(s) ({info['weights'] / 1e9:.3f} G weights, bf16), profile "
              f"`{a.profile}`:\n")
        print("| run | time | of which weights.parquet from the journal | peak RSS above baseline |")
        print("|---|---|---|---|")
        for name, r in rows:
            j = f"{r['journal']:.2f} s" if r.get("journal") is not None else "(no journal)"
            print(f"| {name} | {r['seconds']:.1f} s | {j} | {r['peak'] / 2**20:.0f} MiB |")
        this = [r["seconds"] for n, r in rows if n == "this build"]
        if a.baseline:
            base = [r["seconds"] for n, r in rows if n == "baseline"]
            print(f"\nthis build / baseline: {sum(this) / sum(base):.3f} (sum over {a.rounds} alternated rounds)")
        print(f"\nkilled at {a.kill_at:.0%} of the weights, then resumed: {resumed['resumed']} of {resumed['tensors']} "
              f"tensors taken over, {resumed['seconds']:.1f} s against {min(this):.1f} s for a full run; "
              f"byte-identical to the full run: {same}")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
