"""W8A8 in the loop (issue 12): the runtime's per-timestep-group activation quantization measured
inside a real sampling loop, beside the engine's own estimate.

Model: the trained class-conditional digits DiT (benchmarks/trained/, 1.27 M parameters). Its
calibration is recorded along full-precision DDIM trajectories on other seeds (as in
bench_diffusion.py); it is quantized W8A8 (8-bit weights, group 64, 10 timestep groups, every
quantized layer's input at 8 bits, per-group activation parameters). Then
``arrow_quant_v2.runtime.apply`` puts the stored model into a fresh module and the DDIM sampler
runs on it (200 images, 50 steps): each layer's input is quantized by the runtime with the
parameters of the group of the current timestep, read from the model's own timestep argument.

Per layer and timestep group, the output error in the loop is
``sqrt(sum ||y_rt - y_fp||^2 / sum ||y_fp||^2)`` over the loop's calls, ``y_rt`` the runtime
layer's output and ``y_fp`` the full-precision layer's output on the same input. The engine's
estimate is ``relative_error_with_activations`` of the quantize report (the same quantity on
held-out calibration inputs). Reported: both means over (layer, group), their ratio, and the
share of (layer, group) cells within 10 % of the estimate.

    python benchmarks/bench_runtime_w8a8.py [--spatial]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile

import numpy as np
import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import bench_diffusion as BD  # noqa: E402

M = BD.M
from arrow_quant_v2 import runtime  # noqa: E402
from arrow_quant_v2.loader import timestep_group  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--spatial", action="store_true", help="with the channel-equalization search")
    ap.add_argument("--samples", type=int, default=200)
    ap.add_argument("--steps", type=int, default=50)
    a = ap.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    task = BD.Digits(a.samples, a.steps)
    with tempfile.TemporaryDirectory(prefix="aq-w8a8-") as work:
        model_dir = os.path.join(work, "model")
        shutil.copytree(task.src, model_dir)
        task.calibrate(model_dir, 128)
        out = os.path.join(work, "w8a8")
        r, qm = BD.quantize(model_dir, out, bit_width=8, group_size=BD.GROUP_SIZE, num_time_groups=BD.GROUPS,
                            activation_bits=8, enable_spatial=a.spatial)
        groups = qm.manifest["calibration"]["data"]["time_groups"]
        estimate = {}
        for layer in r["layers"]:
            for g in layer.get("output_error") or []:
                if "relative_error_with_activations" in g:
                    estimate[(layer["tensor"], g["group"])] = g["relative_error_with_activations"]

        model = runtime.apply(M.load_digits_dit(task.src), out)
        fp = M.load_digits_dit(task.src)
        fp_modules = dict(fp.named_modules())
        num, den = {}, {}
        state = {"group": None}

        def top_hook(mod, args):
            state["group"] = timestep_group(groups, float(args[1].double().mean()))

        model.register_forward_pre_hook(top_hook)
        for name, st in runtime.packed_layers(model).items():
            if st.acts is None:
                continue
            mod = model.get_submodule(name)

            def hook(m, args, y, name=name):
                y_fp = fp_modules[name](args[0])
                key = (name + ".weight", state["group"])
                num[key] = num.get(key, 0.0) + float(((y.double() - y_fp.double()) ** 2).sum())
                den[key] = den.get(key, 0.0) + float((y_fp.double() ** 2).sum())

            mod.register_forward_hook(hook)
        with torch.no_grad():
            images = M.ddim_sample(model, task.labels, a.steps, seed=0)
        in_loop = {k: math.sqrt(num[k] / den[k]) for k in num if den[k] > 0}
        common = sorted(set(in_loop) & set(estimate))
        loop_mean = float(np.mean([in_loop[k] for k in common]))
        est_mean = float(np.mean([estimate[k] for k in common]))
        ratios = np.array([in_loop[k] / estimate[k] for k in common if estimate[k] > 0])
        score = M.digits_score(images, task.labels)
        mse = float(((images - task.ref) ** 2).mean())
        per_group = []
        for gi in range(len(groups)):
            ks = [k for k in common if k[1] == gi]
            if ks:
                per_group.append({"group": gi, "step_lo": groups[gi]["step_lo"], "step_hi": groups[gi]["step_hi"],
                                  "in_loop": float(np.mean([in_loop[k] for k in ks])),
                                  "estimate": float(np.mean([estimate[k] for k in ks]))})
        res = {"layers": len({k[0] for k in common}), "cells": len(common), "in_loop_mean": loop_mean,
               "estimate_mean": est_mean, "ratio_of_means": loop_mean / est_mean,
               "median_cell_ratio": float(np.median(ratios)),
               "cells_within_10pct": float(np.mean(np.abs(ratios - 1) <= 0.1)),
               "per_group": per_group, "same_seed_psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)),
               "class_accuracy": score["accuracy"], "fp_accuracy": task.ref_score["accuracy"],
               "equalized_layers": r["calibration"].get("layers_equalized")}
    print(json.dumps(res, indent=1))


if __name__ == "__main__":
    main()
