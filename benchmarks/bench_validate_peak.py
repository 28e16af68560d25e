"""Peak RSS of validate_quality on a Dream-7B-shaped model (issue 13): this build against another
build (`--baseline DIR`, a folder holding an older arrow_quant_v2 package), alternated in fresh
processes. The model (Dream-7B's shapes, `--layers` decoder layers plus the 545 M-weight embedding
and head, bf16) is generated and quantized with the `local` profile once, in `--workdir`.

    .venv/bin/python benchmarks/bench_validate_peak.py --baseline DIR [--layers 1] [--workdir W]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

from _measure import PEAK_PREAMBLE, build_env
from arrow_quant_v2.demo import generate_diffusion_lm

# imports first: the baseline is the resident set with the package loaded
CHILD = "import sys, time, json, arrow_quant_v2 as aq\n" + PEAK_PREAMBLE + r"""
if sys.argv[3] == 'quantize':
    aq.ArrowQuantV2().quantize_diffusion_model(sys.argv[1], sys.argv[2],
                                               aq.DiffusionQuantConfig.from_profile('local', overwrite=True))
t = time.perf_counter()
if sys.argv[3] == 'validate':
    aq.ArrowQuantV2().validate_quality(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mib": (status('VmHWM:') - base) / 2**20}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="aq-validate-")
    model, quant = os.path.join(work, "dream"), os.path.join(work, "q")
    if not os.path.exists(model):
        generate_diffusion_lm(model, layers=a.layers, hidden=3584, intermediate=18944, vocab=152064,
                              overwrite=True, kv_dim=512, qkv_bias=True)
    subprocess.run([sys.executable, "-c", CHILD, model, quant, "quantize"], check=True, capture_output=True)
    print("| build | validate_quality time | peak RSS above baseline |\n|---|---|---|")
    for _ in range(a.rounds):
        for name, path in (("this build", None), ("baseline", a.baseline)):
            env = build_env(path)
            r = subprocess.run([sys.executable, "-c", CHILD, model, quant, "validate"], capture_output=True,
                               text=True, env=env, check=True)
            d = json.loads(r.stdout.strip().splitlines()[-1])
            print(f"| {name} | {d['seconds']:.1f} s | {d['peak_mib']:.0f} MiB |")


if __name__ == "__main__":
    main()
