"""The README's report figures: the trained digits DiT (benchmarks/trained) recorded along its own
sampler, quantized at W4A8 with timestep-aware GPTQ, and reported with ``arrowquant report``.

    .venv/bin/python benchmarks/report_example.py [--out docs/report] [--workdir W]

Writes the figures (error.png, heatmap.png, bits.png, activations.png) into --out and the page
beside the quantized model in the work folder, and prints how long the report took.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_diffusion as B  # noqa: E402

import arrow_quant_v2 as aq  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "report"))
    p.add_argument("--workdir")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="aq-report-")
    try:
        model = os.path.join(work, "digits_dit")
        if not os.path.exists(os.path.join(model, "calibration.parquet")):
            shutil.copytree(B.Digits.src, model, dirs_exist_ok=True)
            task = B.Digits.__new__(B.Digits)  # only its calibration: no reference samples, no scorer
            task.fp, task.samples, task.steps = B.M.load_digits_dit(B.Digits.src), 64, 50
            task.calibrate(model, max_samples=100)
        cfg = aq.DiffusionQuantConfig(bit_width=4, group_size=32, activation_bits=8, num_time_groups=5,
                                      overwrite=True)
        r = aq.ArrowQuantV2().quantize_diffusion_model(model, os.path.join(work, "digits-w4a8"), cfg)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "arrow_quant_v2.cli", "report", r["quantized_path"], "--against",
                        model, "--figures", os.path.abspath(a.out)], check=True)
        print(f"report made in {time.perf_counter() - t:.1f} s (a fresh process, imports included); figures in "
              f"{os.path.abspath(a.out)}")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
