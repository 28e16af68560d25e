"""Peak RSS of validate_quality (and with --measure, of the quantization itself and of GGUF
export) on a Dream-7B-shaped model (issue 13): this build against another build (`--baseline
DIR`, a folder holding an older arrow_quant_v2 package), alternated in fresh processes. The model
(Dream-7B's shapes, `--layers` decoder layers plus the embedding and head, bf16; `--vocab` sets
their rows: 152064 is Dream-7B's, a bigger one shows whether the peak follows the largest tensor)
is generated once in `--workdir`; validate_quality checks the output of this build's
quantization. `export`: export_gguf of that output (ggml layers written as stored);
`requantize`: export_gguf(requantize="q4_k") of an int4 g128 symmetric quantization (decoded and
encoded again); `compressed-tensors`: export_compressed_tensors of that quantization; `layer`: the
PyTorch runtime's packed layer of the embedding (`WeightsReader.layer`).

    .venv/bin/python benchmarks/bench_validate_peak.py --baseline DIR [--layers 1] [--vocab 152064]
        [--measure validate quantize export requantize compressed-tensors layer] [--profile local] [--workdir W]
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
t = time.perf_counter()
if sys.argv[3] == 'quantize':
    aq.ArrowQuantV2().quantize_diffusion_model(sys.argv[1], sys.argv[2],
                                               aq.DiffusionQuantConfig.from_profile(sys.argv[4], overwrite=True))
elif sys.argv[3] == 'quantize-int4':
    aq.ArrowQuantV2().quantize_diffusion_model(sys.argv[1], sys.argv[2],
                                               aq.DiffusionQuantConfig(bit_width=4, group_size=128, symmetric=True,
                                                                       overwrite=True))
elif sys.argv[3] == 'layer':
    emb = aq.load(sys.argv[2])['model.embed_tokens.weight']
    layer = emb._reader.layer(emb._index)  # the PyTorch runtime's packed layer of the embedding
elif sys.argv[3] == 'compressed-tensors':
    from arrow_quant_v2.export import export_compressed_tensors
    export_compressed_tensors(sys.argv[2], sys.argv[2] + '.ct', overwrite=True)
elif sys.argv[3] in ('export', 'requantize'):
    aq.export_gguf(sys.argv[2], sys.argv[2] + '.gguf', overwrite=True, arch='diffusers',
                   requantize='q4_k' if sys.argv[3] == 'requantize' else None)
else:
    aq.ArrowQuantV2().validate_quality(sys.argv[1], sys.argv[2])
print(json.dumps({"seconds": time.perf_counter() - t, "peak_mib": (status('VmHWM:') - base) / 2**20}))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--baseline", required=True)
    p.add_argument("--layers", type=int, default=1)
    p.add_argument("--vocab", type=int, default=152064)
    p.add_argument("--profile", default="local")
    p.add_argument("--measure", nargs="+", choices=("validate", "quantize", "export", "requantize", "compressed-tensors", "layer"), default=["validate"])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="aq-validate-")
    model, quant = os.path.join(work, f"dream-{a.vocab}"), os.path.join(work, f"q-{a.vocab}-{a.profile}")
    if not os.path.exists(model):
        generate_diffusion_lm(model, layers=a.layers, hidden=3584, intermediate=18944, vocab=a.vocab,
                              overwrite=True, kv_dim=512, qkv_bias=True)
    child = [sys.executable, "-c", CHILD]
    subprocess.run(child + [model, quant, "quantize", a.profile], check=True, capture_output=True)
    quant_int4 = os.path.join(work, f"q-{a.vocab}-int4-sym")
    if {"requantize", "compressed-tensors"} & set(a.measure):
        subprocess.run(child + [model, quant_int4, "quantize-int4", a.profile], check=True, capture_output=True)
    print(f"Dream-7B shapes, {a.layers} decoder layer(s), vocabulary {a.vocab} (embedding and head "
          f"{a.vocab * 3584 / 1e6:.0f} M weights each), profile `{a.profile}`:\n")
    print("| build | work | time | peak RSS above baseline |\n|---|---|---|---|")
    for _ in range(a.rounds):
        for work_kind in a.measure:
            for name, path in (("this build", None), ("baseline", a.baseline)):
                out = {"validate": quant, "export": quant, "layer": quant, "requantize": quant_int4,
                       "compressed-tensors": quant_int4}.get(work_kind, quant + "-again")
                r = subprocess.run(child + [model, out, work_kind, a.profile], capture_output=True, text=True,
                                   env=build_env(path))
                if r.returncode:
                    sys.exit(f"{name}, {work_kind}: exit {r.returncode}\n{r.stderr}")
                d = json.loads(r.stdout.strip().splitlines()[-1])
                print(f"| {name} | {work_kind} | {d['seconds']:.1f} s | {d['peak_mib']:.0f} MiB |", flush=True)


if __name__ == "__main__":
    main()
