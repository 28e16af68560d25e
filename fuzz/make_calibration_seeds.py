"""Writes the seed corpus of fuzz_calibration_parquet: small calibration.parquet files written by
arrow_quant_v2.calibration's own writer (the one record_pipeline uses), so their schema, metadata
and encodings are those of real files.

    python fuzz/make_calibration_seeds.py <corpus dir>/calibration_parquet

Three files: full Hessians with histograms and input samples (2 layers, 2 bins, fit and holdout);
a layer sharing another's Hessian (hessian_from) over a span of 2 bins; block-diagonal Hessians.
"""
import json
import os
import sys

import numpy as np

from arrow_quant_v2 import calibration as cal


def metadata(num_bins):
    return {
        "arrowquant.calibration_version": cal.CALIBRATION_VERSION,
        "arrowquant.step_kind": "timestep",
        "arrowquant.step_range": json.dumps([0.0, 1000.0]),
        "arrowquant.num_bins": str(num_bins),
        "arrowquant.samples": "4",
        "arrowquant.producer": "fuzz seeds",
        "arrowquant.hist_bins_per_octave": str(cal.HIST_BINS_PER_OCTAVE),
        "arrowquant.hist_min_exp": str(cal.HIST_MIN_EXP),
        "arrowquant.hist_max_exp": str(cal.HIST_MAX_EXP),
    }


def row(rng, layer, b, split, n, num_bins, *, hessian=True, span=1, block=None, hessian_from=None, inputs=True):
    x = rng.standard_normal((6, n)).astype(np.float32)
    packed = None
    if hessian and hessian_from is None:
        h = x.astype(np.float64).T @ x
        if block:
            blocks = [h[i:i + block, i:i + block] for i in range(0, n, block)]
            packed = np.concatenate([cal._pack_upper(hb) for hb in blocks])
        else:
            packed = cal._pack_upper(h)
    hist = np.zeros(2 * cal.HIST_BINS + 1, dtype=np.int64)
    hist[rng.integers(0, 2 * cal.HIST_BINS, 20)] += 1
    w = 1000.0 / num_bins
    return {
        "component": "", "layer": layer, "bin": b, "step_lo": b * w, "step_hi": (b + 1) * w, "split": split,
        "samples": 2, "rows": 6, "step_sum": (b + 0.5) * w * 2, "in_features": n,
        "absmax": np.abs(x).max(0), "min": x.min(0), "max": x.max(0),
        "hessian": packed, "hessian_reason": None if hessian else "too wide",
        "hessian_span": span, "hessian_rows": 6 if hessian else None, "hessian_from": hessian_from,
        "hessian_block": block,
        "hist_pos": hist[:cal.HIST_BINS], "hist_neg": hist[cal.HIST_BINS:2 * cal.HIST_BINS], "hist_zero": int(hist[-1]),
        "inputs": x.reshape(-1) if inputs else None,
    }


def main():
    out = sys.argv[1]
    os.makedirs(out, exist_ok=True)
    rng = np.random.default_rng(0)
    with cal._CalibrationWriter(os.path.join(out, "seed_full"), metadata(2)) as w:
        for layer, n in (("down.weight", 8), ("up.weight", 4)):
            for b in range(2):
                for split in ("fit", "holdout"):
                    w.write(row(rng, layer, b, split, n, 2))
    with cal._CalibrationWriter(os.path.join(out, "seed_shared"), metadata(2)) as w:
        for split in ("fit", "holdout"):
            w.write(row(rng, "to_q.weight", 0, split, 8, 2, span=2, inputs=False))
            w.write(row(rng, "to_k.weight", 0, split, 8, 2, span=2, hessian_from="to_q.weight", inputs=False))
    with cal._CalibrationWriter(os.path.join(out, "seed_blocks"), metadata(1)) as w:
        for split in ("fit", "holdout"):
            w.write(row(rng, "proj.weight", 0, split, 12, 1, block=4))
            w.write(row(rng, "wide.weight", 0, split, 6, 1, hessian=False))


if __name__ == "__main__":
    main()
