"""Diffusion-aware quantization judged on trained diffusion models (issue 4).

Two small models trained here on offline data (benchmarks/trained/: a class-conditional DiT on
scikit-learn's 8x8 digits with a DDPM schedule, and a masked diffusion LM on CPython's
documentation). For each, calibration is recorded along sampling trajectories (seeds apart from
the evaluation seeds) with arrow_quant_v2.calibration, and the model is quantized four ways at
W8 / W4 / W3 / W2 weight-only, all at the same bits per weight (bits + 0.5):

  rtn        round-to-nearest min/max, group 64 (data-free floor)
  data-free  our best data-free scheme: entropy-coded at bits + 0.5 bits per weight
  gptq-1     GPTQ, group 64, one calibration group (the whole trajectory pooled)
  full       GPTQ, group 64, Hessian summed over 10 timestep groups with uniform weights, and
             channel equalization (alpha searched per layer, none allowed)

Figures: the denoiser's output relative error ||out_q - out|| / ||out|| per timestep group (mask-
ratio group for the LM) along the full-precision model's own sampling trajectory (teacher-forced),
and generation quality: digits -- same-seed sample PSNR against full precision, classifier
accuracy of class-conditional samples and Frechet distance of classifier features; text -- per-
step KL(p_fp || p_q) and argmax agreement, and same-seed free-running token agreement.
W8A8 / W4A8: the timestep-aware weights with every quantized layer's input fake-quantized at 8
bits, by per-timestep-group parameters (activations.parquet) against one static set per layer,
without and with channel equalization (searched on the W?A8 output error).

    python benchmarks/bench_diffusion.py [--models digits text] [--bits 8 4 3 2]
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "trained"))
import models as M  # noqa: E402

import arrow_quant_v2 as aq  # noqa: E402
from arrow_quant_v2.calibration import CalibrationRecorder  # noqa: E402

GROUPS = 10
GROUP_SIZE = 64


# ---------------------------------------------------------------------------------------------
# models: loading, calibration, evaluation
# ---------------------------------------------------------------------------------------------

class Digits:
    name = "digits DiT"
    src = M.DIGITS_DIR
    step_range = (0, 1000)
    step_kind = "timestep"

    def __init__(self, samples: int, steps: int) -> None:
        self.fp = M.load_digits_dit(self.src)
        self.samples, self.steps = samples, steps
        self.labels = torch.arange(samples) % 10
        self.ref, self.traj = M.ddim_sample(self.fp, self.labels, steps, seed=0, return_trajectory=True)
        self.ref_score = M.digits_score(self.ref, self.labels)

    def load(self, state: Dict[str, np.ndarray]) -> torch.nn.Module:
        return M.load_digits_dit(self.src, state_dict=state)

    def calibrate(self, out_dir: str, max_samples: int) -> None:
        """Replays the full-precision sampler on other seeds and labels, one recorded call per step."""
        seeds = (101, 102)
        with CalibrationRecorder(self.fp, step_range=self.step_range, num_bins=GROUPS, max_samples=max_samples,
                                 total_calls=len(seeds) * self.steps, holdout_every=4, **RECORDER_OPTIONS) as rec, \
                torch.no_grad():
            for s in seeds:
                labels = (torch.arange(self.samples) + s) % 10
                _, traj = M.ddim_sample(self.fp, labels, self.steps, seed=s, return_trajectory=True)
                for st in traj:
                    with rec.step(st["t"]):
                        self.fp(st["x_t"], torch.full((labels.shape[0],), st["t"]), labels)
            rec.save(os.path.join(out_dir, "calibration.parquet"))

    def step_value(self, st: Dict[str, Any]) -> float:
        return float(st["t"])

    def forward_step(self, model: torch.nn.Module, st: Dict[str, Any]) -> torch.Tensor:
        return model(st["x_t"], torch.full((self.samples,), st["t"]), self.labels)

    def reference_output(self, st: Dict[str, Any]) -> torch.Tensor:
        return st["eps"]

    def quality(self, model: torch.nn.Module) -> Dict[str, float]:
        out = M.ddim_sample(model, self.labels, self.steps, seed=0)
        mse = float(((out - self.ref) ** 2).mean())
        score = M.digits_score(out, self.labels)
        return {"psnr_db": 10 * math.log10(4.0 / max(mse, 1e-12)), "accuracy": score["accuracy"], "fd": score["fd"]}

    def quality_columns(self) -> List[Tuple[str, str]]:
        return [("psnr_db", "same-seed PSNR dB"), ("accuracy", "class accuracy"), ("fd", "FD")]

    def reference_quality(self) -> Dict[str, float]:
        return {"psnr_db": float("inf"), "accuracy": self.ref_score["accuracy"], "fd": self.ref_score["fd"]}


class Text:
    name = "text MDLM"
    src = M.TEXT_DIR
    step_range = (0.0, 1.0)
    step_kind = "mask_ratio"

    def __init__(self, samples: int, steps: int) -> None:
        self.fp = M.load_text_mdlm(self.src)
        self.samples, self.steps = samples, steps
        self.ref, traj = M.mdlm_sample(self.fp, num_samples=samples, steps=steps, seed=0, return_trajectory=True)
        self.traj = [{"x": st["x"], "logits": st["logits"]} for st in traj]
        self.mask_id = self.fp.mask_token_id

    def load(self, state: Dict[str, np.ndarray]) -> torch.nn.Module:
        return M.load_text_mdlm(self.src, state_dict=state)

    def calibrate(self, out_dir: str, max_samples: int) -> None:
        seeds = (101, 102)
        with CalibrationRecorder(self.fp, step_range=self.step_range, step_kind="mask_ratio", num_bins=GROUPS,
                                 max_samples=max_samples, total_calls=len(seeds) * self.steps,
                                 holdout_every=4, **RECORDER_OPTIONS) as rec, torch.no_grad():
            for s in seeds:
                _, traj = M.mdlm_sample(self.fp, num_samples=self.samples, steps=self.steps, seed=s,
                                        return_trajectory=True)
                for st in traj:
                    with rec.step(float((st["x"] == self.mask_id).float().mean())):
                        self.fp(st["x"])
            rec.save(os.path.join(out_dir, "calibration.parquet"))

    def step_value(self, st: Dict[str, Any]) -> float:
        return float((st["x"] == self.mask_id).float().mean())

    def forward_step(self, model: torch.nn.Module, st: Dict[str, Any]) -> torch.Tensor:
        return model(st["x"])[..., :-1].float()

    def reference_output(self, st: Dict[str, Any]) -> torch.Tensor:
        return st["logits"]

    def quality(self, model: torch.nn.Module) -> Dict[str, float]:
        kls, agr = [], []
        with torch.no_grad():
            for st in self.traj:
                m = st["x"] == self.mask_id
                lp_ref = st["logits"].log_softmax(-1)
                lp = model(st["x"])[..., :-1].float().log_softmax(-1)
                kls.append(float((lp_ref.exp() * (lp_ref - lp)).sum(-1)[m].mean()))
                agr.append(float((lp.argmax(-1) == lp_ref.argmax(-1))[m].float().mean()))
            out = M.mdlm_sample(model, num_samples=self.samples, steps=self.steps, seed=0)
        gen = self.traj[0]["x"] == self.mask_id
        return {"kl": float(np.mean(kls)), "argmax_agreement": float(np.mean(agr)),
                "token_agreement": float((out == self.ref)[gen].float().mean())}

    def quality_columns(self) -> List[Tuple[str, str]]:
        return [("kl", "KL nats/token"), ("argmax_agreement", "step argmax agreement"),
                ("token_agreement", "same-seed token agreement")]

    def reference_quality(self) -> Dict[str, float]:
        return {"kl": 0.0, "argmax_agreement": 1.0, "token_agreement": 1.0}


def output_error_per_group(task, model: torch.nn.Module,
                           before: Optional[Callable[[float], None]] = None) -> List[float]:
    """sqrt(sum ||out_q - out||^2 / sum ||out||^2) over the reference trajectory's steps in each group."""
    lo, hi = task.step_range
    num = np.zeros(GROUPS)
    den = np.zeros(GROUPS)
    with torch.no_grad():
        for st in task.traj:
            v = task.step_value(st)
            g = min(GROUPS - 1, max(0, int((v - lo) / (hi - lo) * GROUPS)))
            if before is not None:
                before(v)
            out = task.forward_step(model, st)
            ref = task.reference_output(st)
            num[g] += float(((out - ref) ** 2).sum())
            den[g] += float((ref ** 2).sum())
    return [math.sqrt(n / d) if d > 0 else float("nan") for n, d in zip(num, den)]


# ---------------------------------------------------------------------------------------------
# quantization variants
# ---------------------------------------------------------------------------------------------

COMMON = dict(enable_fallback=False, min_accuracy=0.0, overwrite=True, enable_spatial=False)


def variants(bits: int) -> List[Tuple[str, Dict[str, Any]]]:
    return [
        ("rtn", dict(bit_width=bits, group_size=GROUP_SIZE, scale_method="minmax", enable_time_aware=False)),
        ("data-free", dict(bit_width=bits, scheme="entropy", target_bits_per_weight=bits + 0.5, enable_time_aware=False)),
        ("gptq-1", dict(bit_width=bits, group_size=GROUP_SIZE, num_time_groups=1)),
        ("full", dict(bit_width=bits, group_size=GROUP_SIZE, num_time_groups=GROUPS, enable_spatial=True)),
    ]


def quantize(model_dir: str, out: str, **cfg: Any) -> Tuple[Dict[str, Any], Any]:
    r = aq.ArrowQuantV2().quantize_diffusion_model(model_dir, out, aq.DiffusionQuantConfig(**{**COMMON, **cfg}))
    return r, aq.load(out)


def fake_quant_hooks(model: torch.nn.Module, qmodel: Any, report: Dict[str, Any], mode: str) -> Callable[[float], None]:
    """Fake-quantizes the input of every layer with activation parameters: per timestep group
    (mode "group") or one static set (mode "static"). Returns a setter for the current step."""
    state = {"step": 0.0}
    static = {l["tensor"]: l["activation"]["static"] for l in report["layers"] if "activation" in l}
    modules = dict(model.named_modules())
    for wname, st in static.items():
        mod = modules[wname[: -len(".weight")]]

        scale = qmodel[wname].input_scale  # channel equalization, or None
        if scale is not None:
            shape = [-1] + [1] * (mod.weight.dim() - 2) if mod.weight.dim() > 2 else [-1]
            scale = torch.from_numpy(scale).reshape(shape)

        def hook(m, args, wname=wname, st=st, scale=scale):
            # the runtime computes W' fq(x * a) with W' = W diag(1 / a); the loaded module holds W
            p = qmodel.activation_params(wname, state["step"]) if mode == "group" else st
            x = args[0] if scale is None else args[0] * scale
            nmax = 2 ** p["bits"] - 1
            c = torch.clamp(torch.round(x / p["scale"]) + p["zero_point"], 0, nmax)
            xq = (c - p["zero_point"]) * p["scale"]
            return (xq if scale is None else xq / scale,) + tuple(args[1:])

        mod.register_forward_pre_hook(hook)

    def set_step(v: float) -> None:
        state["step"] = v

    return set_step


# ---------------------------------------------------------------------------------------------


def fmt(v: float, nd: int = 4) -> str:
    return "inf" if v == float("inf") else f"{v:.{nd}f}"


def run_task(task, bits_list: List[int], work: str, max_samples: int) -> Tuple[List[str], Dict[str, Any]]:
    lines: List[str] = []
    t0 = time.perf_counter()
    model_dir = os.path.join(work, "model")
    shutil.copytree(task.src, model_dir)
    task.calibrate(model_dir, max_samples)
    lines.append(f"Calibration: {max_samples}-sample cap, 2 sampling runs on other seeds, {GROUPS} {task.step_kind} "
                 f"bins, every 4th call held out ({time.perf_counter() - t0:.1f} s).\n")

    cols = task.quality_columns()
    head = "| bits | method | bits/weight (quantized layers) | " + " | ".join(f"g{g}" for g in range(GROUPS)) + \
        " | worst | mean | " + " | ".join(c[1] for c in cols) + " |"
    lines += [f"### {task.name}: denoiser output relative error per {task.step_kind} group, and generation quality\n",
              f"Groups are tenths of the {task.step_kind} range {task.step_range} (g0 = least noise).\n",
              head, "|" + "---|" * (head.count("|") - 1)]
    ref = task.reference_quality()
    lines.append("| - | full precision | 32 | " + " | ".join("0" for _ in range(GROUPS)) + " | 0 | 0 | "
                 + " | ".join(fmt(ref[c[0]]) for c in cols) + " |")
    summary: Dict[str, Any] = {}
    for bits in bits_list:
        for label, cfg in variants(bits):
            r, qm = quantize(model_dir, os.path.join(work, f"q{bits}-{label}"), **cfg)
            model = task.load(qm.state_dict())
            errs = output_error_per_group(task, model)
            q = task.quality(model)
            summary[(bits, label)] = {"errors": errs, "quality": q, "bpw": r["quantized_bits_per_weight"]}
            lines.append(f"| W{bits} | {label} | {r['quantized_bits_per_weight']:.3f} | " + " | ".join(fmt(e) for e in errs)
                         + f" | {fmt(max(errs))} | {fmt(float(np.mean(errs)))} | "
                         + " | ".join(fmt(q[c[0]]) for c in cols) + " |")
            print(f"  {task.name} W{bits} {label}: worst {max(errs):.4f} mean {np.mean(errs):.4f} {q}",
                  file=sys.stderr, flush=True)
    lines.append("")

    # targets: full path against the best data-free scheme
    lines.append(f"#### {task.name}: full path against our best data-free scheme (target at W4 and W3: >= 30% less output error)\n")
    lines.append("| bits | data-free mean error | full mean error | cut | data-free worst group | full worst group | cut |")
    lines.append("|---|---|---|---|---|---|---|")
    for bits in bits_list:
        a, b = summary[(bits, "data-free")]["errors"], summary[(bits, "full")]["errors"]
        ma, mb = float(np.mean(a)), float(np.mean(b))
        lines.append(f"| W{bits} | {ma:.4f} | {mb:.4f} | {100 * (1 - mb / ma):.0f}% | {max(a):.4f} | {max(b):.4f} | "
                     f"{100 * (1 - max(b) / max(a)):.0f}% |")
    lines.append("")

    # W8A8 / W4A8
    lines.append(f"#### {task.name}: W8A8 / W4A8 (timestep-aware GPTQ weights, every quantized layer's input at 8 bits)\n")
    lines.append("| weights | equalization | activation parameters | " + " | ".join(f"g{g}" for g in range(GROUPS))
                 + " | worst | mean |")
    lines.append("|---|---|---|" + "---|" * (GROUPS + 2))
    for wbits in (8, 4):
        for spatial in (False, True):
            r, qm = quantize(model_dir, os.path.join(work, f"a8-w{wbits}-{spatial}"), bit_width=wbits,
                             group_size=GROUP_SIZE, num_time_groups=GROUPS, activation_bits=8, enable_spatial=spatial)
            worst = {}
            eq = f"{r['calibration']['layers_equalized']} layers" if spatial else "off"
            for mode in ("static", "group"):
                model = task.load(qm.state_dict())
                setter = fake_quant_hooks(model, qm, r, mode)
                errs = output_error_per_group(task, model, before=setter)
                worst[mode] = max(errs)
                lines.append(f"| W{wbits}A8 | {eq} | {'per timestep group' if mode == 'group' else 'one static set'} | "
                             + " | ".join(fmt(e) for e in errs) + f" | {fmt(max(errs))} | {fmt(float(np.mean(errs)))} |")
            summary[("a8", wbits, spatial)] = worst
    lines.append("")
    lines.append("Worst-group output error, one static set / per timestep group (target >= 2 at W8A8): "
                 + ", ".join(f"W{w}A8 {summary[('a8', w, sp)]['static'] / summary[('a8', w, sp)]['group']:.2f}x"
                             f" ({'with' if sp else 'without'} equalization)" for w in (8, 4) for sp in (False, True))
                 + "; per-group with equalization against static without: "
                 + ", ".join(f"W{w}A8 {summary[('a8', w, False)]['static'] / summary[('a8', w, True)]['group']:.2f}x"
                             for w in (8, 4)) + "\n")
    return lines, summary


# Options of every CalibrationRecorder here (main sets them from the command line).
RECORDER_OPTIONS: Dict[str, Any] = {}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=["digits", "text"], choices=["digits", "text"])
    p.add_argument("--bits", nargs="*", type=int, default=[8, 4, 3, 2],
                   help="weight-only bit widths (none: only the W8A8 / W4A8 tables)")
    p.add_argument("--samples", type=int, default=200, help="digits: images per batch; text: sequences")
    p.add_argument("--calibration-samples", type=int, default=128)
    p.add_argument("--hessian-bins", type=int, default=None,
                   help="CalibrationRecorder(hessian_bins=...): 1 = one Hessian over the trajectory (large models)")
    p.add_argument("--no-holdout-hessians", action="store_true",
                   help="CalibrationRecorder(holdout_hessians=False): held-out checks on input samples")
    a = p.parse_args()
    RECORDER_OPTIONS.update(hessian_bins=a.hessian_bins, holdout_hessians=not a.no_holdout_hessians)
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    print(f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"torch {torch.__version__}\n")
    for name in a.models:
        task = Digits(a.samples, 50) if name == "digits" else Text(min(a.samples, 64), 32)
        with tempfile.TemporaryDirectory(prefix="aq-diffusion-") as work:
            lines, _ = run_task(task, a.bits, work, a.calibration_samples)
        print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()
