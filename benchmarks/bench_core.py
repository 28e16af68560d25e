"""Core engine benchmark (issue 2): compression and quality per profile, quantize throughput,
and peak memory on a generated multi-gigabyte model. Prints Markdown tables.

    python benchmarks/bench_core.py                 # profiles + throughput (about a minute)
    python benchmarks/bench_core.py --rss-gb 2.2    # also the peak-RSS run on a ~2.2 GB model

Run from the repository after ./scripts/setup.sh, with .venv/bin/python.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time

import numpy as np

import arrow_quant_v2 as aq
from arrow_quant_v2 import _core
from arrow_quant_v2.demo import generate_demo_pipeline


def machine() -> str:
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def profiles_table(workdir: str, base_channels: int) -> str:
    model = os.path.join(workdir, "model")
    info = generate_demo_pipeline(model, base_channels=base_channels, overwrite=True)
    unet = info["components"]["unet"]
    q = aq.ArrowQuantV2()
    lines = [f"Model: built-in default pipeline, base_channels={base_channels}: unet {unet['tensors']} tensors, "
             f"{unet['weights'] / 1e6:.1f} M weights, bf16 ({unet['bytes'] / 2**20:.1f} MiB).", "",
             "| profile | scheme | bits/weight (quantized layers) | bits/weight (all unet weights) | compression vs bf16 | "
             "mean layer cosine | worst layer cosine | fallbacks | validate |",
             "|---|---|---|---|---|---|---|---|---|"]
    for profile in ("edge", "local", "cloud"):
        cfg = aq.DiffusionQuantConfig.from_profile(profile, overwrite=True)
        out = os.path.join(workdir, f"out-{profile}")
        r = q.quantize_diffusion_model(model, out, cfg)
        v = q.validate_quality(model, out)
        scheme = (f"entropy-coded, {cfg.bit_width + 0.5:g} bits/weight budget" if cfg.scheme == "entropy" else
                  f"INT{cfg.bit_width} {'per-channel' if cfg.group_size == 0 else f'g{cfg.group_size}'} "
                  f"{'sym' if cfg.symmetric else 'asym'}")
        lines.append(f"| {profile} | {scheme} | {r['quantized_bits_per_weight']:.3f} | {r['bits_per_weight']:.3f} | "
                     f"{r['compression_ratio']:.2f}x | {v['cosine_similarity']:.5f} | {v['min_cosine_similarity']:.5f} | "
                     f"{r['fallback_layers']} | {'passed' if v['passed'] else 'FAILED'} |")
    return "\n".join(lines)


def quality_table() -> str:
    rng = np.random.default_rng(0)
    data = {
        "Gaussian": rng.normal(0, 0.02, (1024, 4096)).astype(np.float32),
        "Student-t(4)": (rng.standard_t(4, (1024, 4096)) * 0.02 / np.sqrt(2)).astype(np.float32),
    }
    lines = ["| data | bits | group | rel-RMSE min/max | rel-RMSE search | search / min-max |", "|---|---|---|---|---|---|"]
    for name, w in data.items():
        for bits, group in ((2, 64), (3, 128), (4, 128), (8, 0)):
            errs = {}
            for method in ("minmax", "search"):
                r = _core.encode_array(w, bits, group, bits == 8, method, 0, name)
                errs[method] = r.info()["relative_error"]
            lines.append(f"| {name} | {bits} | {group or 'per-channel'} | {errs['minmax']:.5f} | {errs['search']:.5f} | "
                         f"{errs['search'] / errs['minmax']:.3f} |")
    return "\n".join(lines)


def throughput_table() -> str:
    rng = np.random.default_rng(1)
    w = rng.normal(0, 0.02, (4096, 4096)).astype(np.float32)
    n = w.size
    lines = ["| scheme | bits/weight | 1 thread M weights/s | 2 threads M weights/s | 2 threads / 1 thread |",
             "|---|---|---|---|---|"]
    cases = [("affine int2 g64", dict(bits=2, group_size=64)),
             ("affine int4 g128", dict(bits=4, group_size=128)),
             ("affine int8 per-channel sym", dict(bits=8, group_size=0, symmetric=True)),
             ("entropy 2.5", dict(bits=2, scheme="entropy")),
             ("entropy 4.5", dict(bits=4, scheme="entropy")),
             ("entropy 8.5", dict(bits=8, scheme="entropy"))]
    for name, kw in cases:
        rates, bpw = {}, 0.0
        for threads in (1, 2):
            best = float("inf")
            for _ in range(3):
                t = time.perf_counter()
                e = _core.encode_array(w, num_threads=threads, name="bench", **kw)
                best = min(best, time.perf_counter() - t)
            rates[threads] = n / best / 1e6
            bpw = 8.0 * e.stored_bytes / n
        lines.append(f"| {name} | {bpw:.3f} | {rates[1]:.1f} | {rates[2]:.1f} | {rates[2] / rates[1]:.2f} |")
    return "\n".join(lines)


RSS_CHILD = r"""
import json, os, sys, time
import arrow_quant_v2 as aq
def status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
base = status('VmRSS:')
with open('/proc/self/clear_refs', 'w') as f:
    f.write('5')  # reset the peak (VmHWM) to the current resident set
cfg = aq.DiffusionQuantConfig.from_profile(sys.argv[3], overwrite=True)
t = time.perf_counter()
r = aq.ArrowQuantV2().quantize_diffusion_model(sys.argv[1], sys.argv[2], cfg)
dt = time.perf_counter() - t
print(json.dumps({"baseline": base, "peak": status('VmHWM:'), "seconds": dt,
                  "source_bytes": r["source_weight_bytes"], "weights": sum(
                      1 for _ in ()) , "compression": r["compression_ratio"], "threads": r["num_threads"]}))
"""


def rss_table(workdir: str, target_gb: float) -> str:
    # base_channels for the requested size: the unet grows with the square of the width
    from arrow_quant_v2.demo import _unet_specs

    C = 64
    while sum(int(np.prod(s)) for _, _, s in _unet_specs(C, 256, "BF16")) * 2 < target_gb * 1e9:
        C += 32
    model = os.path.join(workdir, "big")
    t = time.perf_counter()
    info = generate_demo_pipeline(model, base_channels=C, overwrite=True)
    gen = time.perf_counter() - t
    unet = info["components"]["unet"]
    lines = [f"Model: built-in default pipeline, base_channels={C}: unet {unet['weights'] / 1e9:.2f} G weights, "
             f"{unet['bytes'] / 1e9:.2f} GB bf16 (generated in {gen:.0f} s).", "",
             "| profile | peak RSS above baseline | baseline (interpreter + package) | time | M weights/s (all threads) | threads |",
             "|---|---|---|---|---|---|"]
    for profile in ("local",):
        out = os.path.join(workdir, f"big-{profile}")
        res = subprocess.run([sys.executable, "-c", RSS_CHILD, model, out, profile], check=True,
                             capture_output=True, text=True)
        d = json.loads(res.stdout.strip().splitlines()[-1])
        shutil.rmtree(out, ignore_errors=True)
        lines.append(f"| {profile} | {(d['peak'] - d['baseline']) / 2**20:.0f} MiB | {d['baseline'] / 2**20:.0f} MiB | "
                     f"{d['seconds']:.1f} s | {unet['weights'] / d['seconds'] / 1e6:.1f} | {d['threads']} |")
    shutil.rmtree(model, ignore_errors=True)
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-channels", type=int, default=128)
    p.add_argument("--rss-gb", type=float, default=0.0, help="also measure peak RSS on a generated model this large")
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    workdir = a.workdir or tempfile.mkdtemp(prefix="aq-bench-")
    try:
        print(f"Machine: {machine()}\n")
        print("### Compression and quality per profile\n")
        print(profiles_table(workdir, a.base_channels), "\n")
        print("### Scale search against plain min/max (1024x4096, same bits, same storage)\n")
        print(quality_table(), "\n")
        print("### Quantize throughput (4096x4096 float32 in memory: quantize, measure, pack or entropy-code)\n")
        print(throughput_table(), "\n")
        if a.rss_gb > 0:
            print("### Peak memory on a generated model\n")
            print(rss_table(workdir, a.rss_gb), "\n")
    finally:
        if a.workdir is None:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
