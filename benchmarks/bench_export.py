"""Export at 7B size: GGUF (and, for affine codes, compressed-tensors) of a Dream-7B-shaped model,
each step in a fresh process whose time and peak RSS above its baseline are reported.

    python benchmarks/bench_export.py --model DIR [--work DIR]

DIR is a Hugging Face checkpoint directory (benchmarks/bench_calib_large.py --model dream writes a
Dream-7B-shaped one, bf16), without a calibration.parquet (the engine would use it). Steps: quantize with the `local` profile (Q4_K, embeddings and head
Q8_0) into WORK/q4k; export it to WORK/q4k.gguf; quantize with symmetric int4 g128 affine codes
into WORK/int4; export that as compressed-tensors into WORK/int4-ct. The exported bytes of ggml
layers are the stored ones (a change of container), so their output error is the quantizer's
(BENCHMARKS.md, "ggml block types").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

CHILD = r"""
import json, sys, time
import arrow_quant_v2 as aq
from arrow_quant_v2.export import export_compressed_tensors, export_gguf
def status(key):
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(key):
                return int(line.split()[1]) * 1024
base = status('VmRSS:')
step, src, dst = sys.argv[1:4]
t = time.perf_counter()
if step == 'quantize-q4k':
    r = aq.ArrowQuantV2().quantize_diffusion_model(src, dst, aq.DiffusionQuantConfig.from_profile('local', overwrite=True))
    out = {'bits_per_weight': r['bits_per_weight']}
elif step == 'quantize-int4':
    r = aq.ArrowQuantV2().quantize_diffusion_model(src, dst, aq.DiffusionQuantConfig(
        bit_width=4, group_size=128, symmetric=True, overwrite=True, sensitive_patterns=[]))
    out = {'bits_per_weight': r['bits_per_weight']}
elif step == 'gguf':
    r = export_gguf(src, dst, overwrite=True, arch='diffusers')
    out = {'bytes': r['bytes'], 'types': r['types'], 'copied': r['copied']}
else:
    r = export_compressed_tensors(src, dst, overwrite=True)
    out = {'bytes': r['bytes'], 'groups': r['groups']}
out.update(seconds=time.perf_counter() - t, peak_above_baseline=status('VmHWM:') - base)
print(json.dumps(out))
"""


def run(step: str, src: str, dst: str) -> dict:
    p = subprocess.run([sys.executable, "-c", CHILD, step, src, dst], stdout=subprocess.PIPE, text=True)
    if p.returncode:
        raise SystemExit(f"{step} failed ({p.returncode})")
    return json.loads(p.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--work", default="/tmp/aq-bench-export")
    ap.add_argument("--steps", default="quantize-q4k,gguf,quantize-int4,compressed-tensors")
    a = ap.parse_args()
    os.makedirs(a.work, exist_ok=True)
    paths = {"quantize-q4k": (a.model, os.path.join(a.work, "q4k")),
             "gguf": (os.path.join(a.work, "q4k"), os.path.join(a.work, "q4k.gguf")),
             "quantize-int4": (a.model, os.path.join(a.work, "int4")),
             "compressed-tensors": (os.path.join(a.work, "int4"), os.path.join(a.work, "int4-ct"))}
    results = {}
    for step in a.steps.split(","):
        results[step] = run(step, *paths[step])
        print(step, json.dumps(results[step]), file=sys.stderr, flush=True)
    print("| step | seconds | peak RSS above baseline | output |\n|---|---|---|---|")
    for step, r in results.items():
        size = f"{r['bytes'] / 2 ** 30:.2f} GiB" if "bytes" in r else f"{r['bits_per_weight']:.3f} bits/weight"
        print(f"| {step} | {r['seconds']:.1f} | {r['peak_above_baseline'] / 2 ** 30:.2f} GiB | {size} |")


if __name__ == "__main__":
    main()
