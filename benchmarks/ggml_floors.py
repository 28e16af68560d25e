"""How low can any encoder of a ggml block type go? A bound for plain squared error on Gaussian
weights, by type.

Every ggml type decodes a sub-block (16 or 32 weights) as a grid scale * level - min (K types
with mins) or scale * level (the others), the scale and min drawn from small integer sets times
float16 block scales. Letting each sub-block's scale and min be any real number only adds
choices, so the error of the best real-valued (scale, min) per sub-block, with every code at its
nearest level, is a floor under every encoder of the type -- ours and llama.cpp's alike. This
script finds that per-sub-block optimum by a dense grid of trial scales, each polished by Lloyd
steps (codes given the scale, scale and min by least squares given the codes), on seeded N(0, 1)
sub-blocks, and prints it as rel-RMSE and as a ratio to the rel-RMSE of llama.cpp's encoder on
N(0, 0.02) 4096x4096 (BENCHMARKS.md, `bench_ggml.py`: the scale does not matter).

    python benchmarks/ggml_floors.py            # about a minute
"""

from __future__ import annotations

import numpy as np

IQ4 = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], float)
# llama.cpp's encoder, gaussian 4096x4096 (bench_ggml.py, this machine)
LLAMA = {"q8_0": 0.00535, "q6_k": 0.01776, "q5_k": 0.03611, "q4_k": 0.07135, "q3_k": 0.15089, "q2_k": 0.29658,
         "iq4_xs": 0.07673, "iq4_nl": 0.07614}
# type: (sub-block length, levels, has a min)
TYPES = {"q8_0": (32, np.arange(-128, 128.0), False), "q6_k": (16, np.arange(-32, 32.0), False),
         "q5_k": (32, np.arange(32.0), True), "q4_k": (32, np.arange(16.0), True),
         "q3_k": (16, np.arange(-4, 4.0), False), "q2_k": (16, np.arange(4.0), True),
         "iq4_xs": (32, IQ4, False), "iq4_nl": (32, IQ4, False)}


def floor_asym(x: np.ndarray, nlev: int, grid: int = 120, lloyd: int = 5) -> float:
    xmin = np.minimum(x.min(1, keepdims=True), 0)
    xmax = x.max(1, keepdims=True)
    best = np.full(len(x), np.inf)
    for r in np.linspace(-1.5, 1.5, grid):
        s = (xmax - xmin) / (nlev - 1 + r)
        mn = -xmin
        for _ in range(lloyd):
            k = np.clip(np.round((x + mn) / s), 0, nlev - 1)
            n = x.shape[1]
            sk, skk, sx, skx = k.sum(1, keepdims=True), (k * k).sum(1, keepdims=True), x.sum(1, keepdims=True), \
                (k * x).sum(1, keepdims=True)
            det = n * skk - sk * sk
            ok = det > 0
            a = np.where(ok, (n * skx - sk * sx) / np.where(ok, det, 1), s)
            b = np.minimum(np.where(ok, (skk * sx - sk * skx) / np.where(ok, det, 1), -mn), 0)  # the min stays <= 0
            s, mn = np.where(a > 0, a, s), -b
        k = np.clip(np.round((x + mn) / s), 0, nlev - 1)
        best = np.minimum(best, ((x - (s * k - mn)) ** 2).sum(1))
    return float(np.sqrt(best.sum() / (x ** 2).sum()))


def floor_sym(x: np.ndarray, levels: np.ndarray, grid: int = 120, lloyd: int = 4) -> float:
    vmax = x[np.arange(len(x)), np.abs(x).argmax(1)][:, None]
    mids = (levels[1:] + levels[:-1]) / 2
    best = np.full(len(x), np.inf)
    for end in (levels[0], levels[-1]):
        for r in np.linspace(-0.3, 0.3, grid):
            s = vmax / (end * (1 + r))
            for _ in range(lloyd):
                L = levels[np.searchsorted(mids, x / s)]
                ll = (L * L).sum(1, keepdims=True)
                s = np.where(ll > 0, (L * x).sum(1, keepdims=True) / np.maximum(ll, 1e-30), s)
            L = levels[np.searchsorted(mids, x / s)]
            best = np.minimum(best, ((x - s * L) ** 2).sum(1))
    return float(np.sqrt(best.sum() / (x ** 2).sum()))


def main() -> None:
    rng = np.random.default_rng(1)
    print("| type | floor rel-RMSE (real-valued scales per sub-block) | llama.cpp rel-RMSE | floor / llama.cpp |")
    print("|---|---|---|---|")
    for name, (sub, levels, has_min) in TYPES.items():
        x = rng.normal(0, 1, (64000 // sub, sub))
        f = floor_asym(x, len(levels)) if has_min else floor_sym(x, levels)
        print(f"| {name} | {f:.5f} | {LLAMA[name]:.5f} | {f / LLAMA[name]:.3f} |")


if __name__ == "__main__":
    main()
