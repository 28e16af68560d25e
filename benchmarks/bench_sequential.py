"""Sequential against parallel calibration on the trained models of issue 4.

calibrate_and_quantize(sequential=True) records each block with the earlier blocks already holding
their quantized weights (docs/calibration.md, "Sequential mode"); the default records every layer on
the full-precision model's inputs. Both run the same sampler on the same calibration seeds (101,
102; the evaluation uses seed 0), the same recorder options (10 step bins, a Hessian per bin, every
4th call held out) and the same config (GPTQ, groups of 64, 10 timestep groups, channel
equalization off), and are judged as bench_diffusion.py judges: the denoiser's output relative
error per tenth of the step range along the full-precision trajectory, and generation quality.

    python benchmarks/bench_sequential.py [--models digits text] [--bits 4 3 2]
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from typing import Any, Dict, List

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_diffusion as B  # noqa: E402

M = B.M
import arrow_quant_v2 as aq  # noqa: E402
from arrow_quant_v2.calibration import calibrate_and_quantize  # noqa: E402

SEEDS = (101, 102)


class DigitsPipe:
    """The digits DiT's DDIM sampler as a pipeline: pipe(seed=s, num_inference_steps=n)."""

    def __init__(self, task: B.Digits) -> None:
        self.model = task.fp
        self.samples = task.samples

    def __call__(self, seed: int, num_inference_steps: int) -> None:
        labels = (torch.arange(self.samples) + seed) % 10
        M.ddim_sample(self.model, labels, num_inference_steps, seed=seed)


class TextPipe:
    def __init__(self, task: B.Text) -> None:
        self.model = task.fp
        self.samples = task.samples

    def __call__(self, seed: int, num_inference_steps: int) -> None:
        M.mdlm_sample(self.model, num_samples=self.samples, steps=num_inference_steps, seed=seed)


def run(task: Any, pipe: Any, bits_list: List[int], work: str, max_samples: int) -> List[str]:
    cols = task.quality_columns()
    lines = [f"### {task.name}\n",
             "| bits | calibration | g0 | g1 | g2 | g3 | g4 | g5 | g6 | g7 | g8 | g9 | worst | mean | "
             + " | ".join(c[1] for c in cols) + " | recording s | quantize s |",
             "|---|---|" + "---|" * (B.GROUPS + 2) + "---|" * len(cols) + "---|---|"]
    extra: Dict[str, Any] = {"step_range": task.step_range}
    if task.step_kind == "mask_ratio":
        mask = task.mask_id
        extra = dict(step_kind="mask_ratio", step_arg=lambda a, kw: (a[0] == mask).float().mean())
    fp_state = {k: v.clone() for k, v in task.fp.state_dict().items()}
    for bits in bits_list:
        cfg = aq.DiffusionQuantConfig(**{**B.COMMON, "overwrite": False}, bit_width=bits, group_size=B.GROUP_SIZE,
                                      num_time_groups=B.GROUPS)
        for sequential in (False, True):
            label = "sequential" if sequential else "parallel"
            out = os.path.join(work, f"w{bits}-{label}")
            r = calibrate_and_quantize(pipe, [{"seed": s} for s in SEEDS], out, cfg, num_inference_steps=task.steps,
                                       max_samples=max_samples, source_dir=task.src, sequential=sequential,
                                       progress=False, num_bins=B.GROUPS, hessian_bins=None, holdout_hessians=True,
                                       holdout_every=4, **extra)
            for k, v in task.fp.state_dict().items():  # the sampler's model is back to full precision
                assert torch.equal(v, fp_state[k]), k
            model = task.load(aq.load(out).state_dict())
            errs = B.output_error_per_group(task, model)
            q = task.quality(model)
            rec = r["calibration_recording"]
            lines.append(f"| W{bits} | {label} | " + " | ".join(B.fmt(e) for e in errs)
                         + f" | {B.fmt(max(errs))} | {B.fmt(float(np.mean(errs)))} | "
                         + " | ".join(B.fmt(q[c[0]]) for c in cols)
                         + f" | {rec['seconds']:.1f} | {r['quantization_time_s']:.1f} |")
            print(f"  {task.name} W{bits} {label}: worst {max(errs):.4f} mean {np.mean(errs):.4f} {q} "
                  f"recording {rec['seconds']:.1f} s", file=sys.stderr, flush=True)
    lines.append("")
    return lines


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["digits", "text"], choices=["digits", "text"])
    p.add_argument("--bits", nargs="+", type=int, default=[4, 3, 2])
    p.add_argument("--samples", type=int, default=200, help="digits: images per batch; text: sequences")
    p.add_argument("--calibration-samples", type=int, default=128)
    a = p.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python "
          f"{platform.python_version()}, torch {torch.__version__}\n")
    for name in a.models:
        task = B.Digits(a.samples, 50) if name == "digits" else B.Text(min(a.samples, 64), 32)
        pipe = DigitsPipe(task) if name == "digits" else TextPipe(task)
        t0 = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="aq-sequential-") as work:
            lines = run(task, pipe, a.bits, work, a.calibration_samples)
        print("\n".join(lines), flush=True)
        print(f"({task.name}: {time.perf_counter() - t0:.0f} s in all)\n", flush=True)


if __name__ == "__main__":
    main()
