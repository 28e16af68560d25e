"""End to end on a 7B-shaped diffusion language model (issues 3, 9): time and peak memory to quantize
with a profile (default `local`: Q4_K, embeddings and head at the sensitive Q8_0), on this
machine's cores.

A 7B model is 13-15 GB of bf16; generating it takes longer than quantizing it, so the benchmark
quantizes two scaled-down models with the exact tensor shapes of the 7B model (`--shape llama7b`:
hidden 4096, MLP 11008, vocabulary 32000, 32 layers; `--shape dream7b`: Dream-7B's 28 layers,
hidden 3584, MLP 18944, vocabulary 152064, 4 KV heads of 128, q/k/v biases) and L1 < L2 layers,
fits time = a + b * layers, and extrapolates to the full depth. Peak RSS does not grow with depth
(a bounded window of tensors is in flight), so the deeper run's peak stands for the full model.

    .venv/bin/python benchmarks/bench_7b.py [--layers 1 3] [--profile local] [--shape dream7b]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

from arrow_quant_v2.demo import generate_diffusion_lm, llm_specs

CHILD = r"""
import json, sys, time
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
print(json.dumps({"baseline": base, "peak": status('VmHWM:'), "seconds": dt, "bpw": r["bits_per_weight"],
                  "cos": r["cosine_similarity"], "min_cos": r["min_cosine_similarity"], "threads": r["num_threads"],
                  "modality": r["modality"], "journal": r.get("parquet_from_journal_s", 0.0)}))
"""


SHAPES = {
    # name: (layers, hidden, MLP, vocabulary, kv width, q/k/v biases, description)
    "llama7b": (32, 4096, 11008, 32000, None, False, "7B shapes (hidden 4096, MLP 11008, vocab 32000)"),
    "dream7b": (28, 3584, 18944, 152064, 512, True,
                "Dream-7B shapes (28 layers, hidden 3584, MLP 18944, vocab 152064, 4 KV heads, q/k/v biases)"),
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, nargs=2, default=(1, 3))
    p.add_argument("--profile", default="local")
    p.add_argument("--shape", choices=sorted(SHAPES), default="llama7b")
    p.add_argument("--workdir", default=None)
    a = p.parse_args()
    depth, hidden, mlp, vocab, kv, bias, described = SHAPES[a.shape]
    work = a.workdir or tempfile.mkdtemp(prefix="aq-7b-")
    full = sum(int(__import__("numpy").prod(s)) for _, _, s in llm_specs(depth, hidden, mlp, vocab, kv_dim=kv,
                                                                          qkv_bias=bias))
    rows = []
    try:
        for layers in a.layers:
            model = os.path.join(work, f"dlm-{layers}")
            t = time.perf_counter()
            info = generate_diffusion_lm(model, layers=layers, hidden=hidden, intermediate=mlp, vocab=vocab,
                                         overwrite=True, kv_dim=kv, qkv_bias=bias)
            gen = time.perf_counter() - t
            out = os.path.join(work, f"dlm-{layers}-q")
            res = subprocess.run([sys.executable, "-c", CHILD, model, out, a.profile], check=True,
                                 capture_output=True, text=True)
            d = json.loads(res.stdout.strip().splitlines()[-1])
            d.update(layers=layers, weights=info["weights"], gen=gen)
            rows.append(d)
            shutil.rmtree(model, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    (l1, r1), (l2, r2) = [(r["layers"], r) for r in rows]
    b = (r2["seconds"] - r1["seconds"]) / (l2 - l1)
    a0 = r1["seconds"] - b * l1
    t32 = a0 + depth * b
    print(f"Profile `{a.profile}` ({rows[0]['threads']} threads), {described}, bf16:\n")
    print("| layers | weights | quantize time | of which weights.parquet from the journal | M weights/s | bits/weight "
          "| mean cos | worst cos | peak RSS above baseline |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['layers']} | {r['weights'] / 1e9:.3f} G | {r['seconds']:.1f} s | {r['journal']:.2f} s | "
              f"{r['weights'] / r['seconds'] / 1e6:.0f} | "
              f"{r['bpw']:.3f} | {r['cos']:.5f} | {r['min_cos']:.5f} | {(r['peak'] - r['baseline']) / 2**20:.0f} MiB |")
    print(f"| {depth} (extrapolated: {a0:.1f} s + {b:.2f} s per layer) | {full / 1e9:.3f} G | {t32:.1f} s | | "
          f"{full / t32 / 1e6:.0f} | | | | {(rows[-1]['peak'] - rows[-1]['baseline']) / 2**20:.0f} MiB (as the deeper run) |")
    print()


if __name__ == "__main__":
    main()
