"""Recording calibration statistics from a PyTorch diffusion model.

A diffusion model's weights do not depend on the timestep, but the inputs of its layers do. This
module records, for every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d`` of a
denoiser, statistics of the layer *inputs* per timestep bin (for masked diffusion language models:
per mask-ratio bin), and writes them to ``calibration.parquet`` (docs/calibration.md). The engine
reads that file to run GPTQ on ``H = sum_g w_g X_g^T X_g``, to pick per-timestep-group activation
quantization parameters and channel equalization, and to measure output error on held-out inputs.

    from arrow_quant_v2.calibration import CalibrationRecorder
    with CalibrationRecorder(model, step_range=(0, 1000), num_bins=10, max_samples=128,
                             total_calls=50) as rec:
        for t in timesteps:
            with rec.step(t):
                eps = model(x, t)
        rec.save("model_dir/calibration.parquet")

PyTorch is an optional dependency of ``arrow_quant_v2``: importing the package does not import
torch; importing this module does.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import gc
import json
import math
import numbers
import os
import tempfile
import time
import warnings
import weakref
import zlib
from dataclasses import dataclass, field
from typing import Any, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from .errors import ConfigurationError, ModelFormatError, ModelNotFoundError, QuantizationError

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as _e:  # pragma: no cover - exercised only without torch
    raise ImportError(
        "arrow_quant_v2.calibration records calibration data from a PyTorch model and needs PyTorch: "
        "pip install torch (or pip install 'arrow_quant_v2[torch]')") from _e

PathLike = Union[str, "os.PathLike[str]"]

CALIBRATION_VERSION = "2"
# Versions this reader reads: 1 (full float64 Hessians, one per (layer, bin, split)) and 2.
READABLE_VERSIONS = ("1", "2")
STEP_KINDS = ("timestep", "mask_ratio")
SPLITS = ("fit", "holdout")
DEFAULT_STEP_RANGES = {"timestep": (0.0, 1000.0), "mask_ratio": (0.0, 1.0)}
# A Hessian is stored as one Parquet list of in_features (in_features + 1) / 2 float32 values (its
# upper triangle); a list's offsets are int32.
HESSIAN_FEATURES_LIMIT = 65535  # in_features (in_features + 1) / 2 < 2^31
# Inputs of at most this many elements are compared by value to find layers that read equal inputs
# (the adaLN projections of every block read the same conditioning vector, computed per block).
_SHARE_BY_VALUE_ELEMENTS = 1 << 16
# Bound on the elements of one chunk of X processed at once (64 MiB as float32); Hessian products
# use at most HESSIAN_CHUNK_ROWS rows per matmul.
_CHUNK_ELEMENTS = 1 << 24
HESSIAN_CHUNK_ROWS = 4096
# Above this magnitude a float32 sum of HESSIAN_CHUNK_ROWS squares could overflow (4096 * 2.8e17^2
# is float32's largest value): such chunks take float64 products.
_FLOAT32_PRODUCT_LIMIT = 2.8e17
# The keyword names, in order, that attach_timestep reads the step value from.
TIMESTEP_KWARGS = ("timestep", "t", "timesteps")
# The signed log-scale histogram of the input values: HIST_BINS_PER_OCTAVE bins per octave from
# 2^HIST_MIN_EXP to 2^HIST_MAX_EXP; bin k of |x| covers [2^(k/8 - 24), 2^((k+1)/8 - 24)), the first
# bin also takes everything smaller, the last everything larger.
HIST_BINS_PER_OCTAVE = 8
HIST_MIN_EXP = -24
HIST_MAX_EXP = 24
HIST_BINS = (HIST_MAX_EXP - HIST_MIN_EXP) * HIST_BINS_PER_OCTAVE  # 384
# Elements histogrammed at once (its float64 / int64 temporaries take 32 MiB each).
_HIST_CHUNK_ELEMENTS = 1 << 22

# Column order and types of calibration.parquet, version 1.
SCHEMA_FIELDS: List[Tuple[str, pa.DataType, bool]] = [
    ("component", pa.string(), False),
    ("layer", pa.string(), False),
    ("bin", pa.int32(), False),
    ("step_lo", pa.float64(), False),
    ("step_hi", pa.float64(), False),
    ("split", pa.string(), False),
    ("samples", pa.int64(), False),
    ("rows", pa.int64(), False),
    ("step_sum", pa.float64(), False),
    ("in_features", pa.int32(), False),
    ("absmax", pa.list_(pa.float32()), False),
    ("min", pa.list_(pa.float32()), False),
    ("max", pa.list_(pa.float32()), False),
    ("hessian", pa.list_(pa.float32()), True),
    ("hessian_reason", pa.string(), True),
    # version 2: the Hessian held in this row sums the bins of its aligned span of hessian_span bins
    # (hessian_rows rows); hessian_from names the layer whose Hessian this layer shares
    ("hessian_span", pa.int32(), False),
    ("hessian_rows", pa.int64(), True),
    ("hessian_from", pa.string(), True),
    # the Hessian is block-diagonal: the upper triangles of its diagonal blocks of hessian_block
    # columns (the last one smaller), block after block; null: the full matrix
    ("hessian_block", pa.int32(), True),
    # additions to version 1: optional for readers (files written before them lack them)
    ("hist_pos", pa.list_(pa.int64()), False),
    ("hist_neg", pa.list_(pa.int64()), False),
    ("hist_zero", pa.int64(), False),
    # a uniform random sample of input rows (X's rows), row-major, rows x in_features float32
    ("inputs", pa.list_(pa.float32()), True),
]
# Shard files only (CalibrationRecorder(shard=True), merged by merge_calibration): each sampled
# input row's key (the input rows kept are those of the smallest keys, under holdout_rule="sample")
SHARD_FIELDS: List[Tuple[str, pa.DataType, bool]] = [("input_keys", pa.list_(pa.uint64()), True)]
SHARD_KEY = "arrowquant.shard"
HOLDOUT_RULES = ("bin", "sample")
HIST_COLUMNS = ("hist_pos", "hist_neg", "hist_zero")
OPTIONAL_COLUMNS = HIST_COLUMNS + ("inputs", "hessian_block")
# hessian_block is a multiple of this, so that no quantization group (affine groups of up to 256
# columns, ggml's blocks of 32 and 256) straddles two blocks
HESSIAN_BLOCK_MULTIPLE = 256

__all__ = [
    "CalibrationRecorder",
    "CalibrationData",
    "record_pipeline",
    "calibrate_and_quantize",
    "load_calibration",
    "merge_calibration",
    "holdout_by_sample",
    "calibration_schema",
    "step_bin",
    "sample_indices",
    "CALIBRATION_VERSION",
    "HIST_BINS",
]


# ---------------------------------------------------------------------------------------------
# small pure helpers (the rules the file format documents)
# ---------------------------------------------------------------------------------------------

def calibration_schema(metadata: Optional[Mapping[str, str]] = None, shard: bool = False) -> pa.Schema:
    """The Arrow schema of ``calibration.parquet`` (version 1), with ``metadata`` attached. ``shard``:
    the schema of a shard (a part of a recording, to merge): float64 Hessians and the inputs' keys."""
    fields = [(n, pa.list_(pa.float64()) if shard and n == "hessian" else t, nullable)
              for n, t, nullable in SCHEMA_FIELDS]
    if shard:
        fields += SHARD_FIELDS
    schema = pa.schema([pa.field(n, t, nullable=nullable) for n, t, nullable in fields])
    if metadata:
        schema = schema.with_metadata({k.encode(): v.encode() for k, v in metadata.items()})
    return schema


def step_bin(step: float, step_range: Tuple[float, float], num_bins: int) -> int:
    """The bin of step value ``step``: ``min(num_bins - 1, max(0, floor((t - lo) / (hi - lo) * num_bins)))``.

    Values outside ``step_range`` fall into the first or last bin.
    """
    lo, hi = step_range
    return min(num_bins - 1, max(0, int(math.floor((step - lo) / (hi - lo) * num_bins))))


def bin_edges(b: int, step_range: Tuple[float, float], num_bins: int) -> Tuple[float, float]:
    """(step_lo, step_hi) of bin ``b``: the bins are uniform over ``step_range``."""
    lo, hi = step_range
    width = (hi - lo) / num_bins
    return lo + b * width, (hi if b == num_bins - 1 else lo + (b + 1) * width)


def sample_indices(total_calls: int, max_samples: int) -> List[int]:
    """The call indices recorded when ``total_calls`` is known: ``max_samples`` indices evenly spaced
    over ``[0, total_calls)`` -- ``linspace(0, total_calls - 1, max_samples)`` rounded half up -- or
    every call when ``max_samples >= total_calls``. Sorted and distinct."""
    n = min(max_samples, total_calls)
    if n == 1:
        return [0]
    step = (total_calls - 1) / (n - 1)
    return sorted({int(math.floor(i * step + 0.5)) for i in range(n)})


def holdout_by_sample(sample: int, holdout_every: int) -> bool:
    """The held-out split of ``holdout_rule="sample"``: of every ``holdout_every`` consecutive sample
    numbers (``0 .. h-1``, ``h .. 2h-1``, ...) exactly one is held out, at a place hashed from the
    group's number. A function of the sample number alone, so recorders that each see a share of
    the calls agree with one that sees them all; consecutive recorded calls (those of one bin in
    one run) are split exactly 1 in ``holdout_every``, and a bin visited once per run (samples a
    stride apart) gets independent draws, which no stride can starve the way a fixed pattern can."""
    if holdout_every <= 0:
        return False
    group = np.array([sample // holdout_every], np.uint64)
    return sample % holdout_every == int(_mix64(group)[0] % np.uint64(holdout_every))


def _mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 values: a fixed, well-mixed 64-bit hash."""
    x = x.astype(np.uint64, copy=True)
    with np.errstate(over="ignore"):
        x ^= x >> np.uint64(30)
        x *= np.uint64(0xBF58476D1CE4E5B9)
        x ^= x >> np.uint64(27)
        x *= np.uint64(0x94D049BB133111EB)
        x ^= x >> np.uint64(31)
    return x


def _is_int(v: Any) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool)


def _step_value(value: Any, what: str) -> float:
    """A step value as a Python float: a number, or a 0-d / 1-d tensor or array (the mean)."""
    if isinstance(value, bool):
        raise ConfigurationError(f"{what} must be a number or a 0-d / 1-d tensor; got {value!r}")
    if isinstance(value, torch.Tensor):
        if value.dim() > 1 or value.numel() == 0:
            raise ConfigurationError(f"{what} must be a number or a 0-d / 1-d tensor; got a tensor of shape "
                                     f"{tuple(value.shape)}")
        if value.is_complex():
            raise ConfigurationError(f"{what} must be real; got a {value.dtype} tensor")
        v = float(value.detach().to(torch.float64).mean().item())
    elif isinstance(value, np.ndarray) or isinstance(value, np.generic):
        arr = np.asarray(value)
        if arr.ndim > 1 or arr.size == 0 or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise ConfigurationError(f"{what} must be a number or a 0-d / 1-d array; got {value!r}")
        v = float(arr.astype(np.float64).mean())
    elif isinstance(value, numbers.Real):
        v = float(value)
    else:
        raise ConfigurationError(f"{what} must be a number or a 0-d / 1-d tensor; got {type(value).__name__} "
                                 f"{value!r}")
    if not math.isfinite(v):
        raise ConfigurationError(f"{what} must be finite; got {v!r}")
    return v


# ---------------------------------------------------------------------------------------------
# per-layer description and statistics
# ---------------------------------------------------------------------------------------------

@dataclass
class _Layer:
    name: str                 # weight tensor name: f"{module_name}.weight"
    module: nn.Module
    kind: str                 # "linear", "conv1d", "conv2d", "conv3d"
    in_features: int          # columns of X = weight.reshape(out, -1).shape[1]
    hessian_reason: Optional[str]  # None: a Hessian is recorded
    order: int
    hessian_block: int = 0    # > 0: the Hessian is block-diagonal, in blocks of this many columns

    def blocks(self) -> List[Tuple[int, int]]:
        """[begin, end) of the Hessian's diagonal blocks (one block: the full matrix)."""
        f, b = self.in_features, self.hessian_block or self.in_features
        return [(i, min(f, i + b)) for i in range(0, f, b)] if f else [(0, 0)]

    def hessian_values(self) -> int:
        """Entries of the Hessian's diagonal blocks (in_features^2 for a full one)."""
        return sum((e - b) ** 2 for b, e in self.blocks())


@dataclass
class _Stats:
    in_features: int
    with_hessian: bool
    samples: int = 0
    rows: int = 0
    step_sum: float = 0.0
    last_call: int = -1
    absmax: Optional[torch.Tensor] = None
    min: Optional[torch.Tensor] = None
    max: Optional[torch.Tensor] = None
    # int64 counts, 2 * HIST_BINS + 1: hist_pos, then hist_neg, then hist_zero
    hist: Optional[torch.Tensor] = None
    # reservoir sample of X's rows (float32, up to input_samples rows) and the rows offered to it
    inputs: Optional[torch.Tensor] = None
    offered: int = 0
    generator: Optional[np.random.Generator] = None
    # holdout_rule="sample": the kept rows' keys (the rows of the smallest keys are kept)
    keys: Optional[np.ndarray] = None


@dataclass
class _Hessian:
    """X^T X of one layer over the bins of one Hessian span and one split: float32 products of at
    most HESSIAN_CHUNK_ROWS rows, summed in float64. Its diagonal blocks (the layer's blocks(); one
    block: the full matrix)."""
    blocks: List[torch.Tensor]
    rows: int = 0

    def numel(self) -> int:
        return sum(b.numel() for b in self.blocks)


@dataclass
class _Call:
    index: int                # call number (0-based, every counted call)
    record: bool
    step: float = 0.0
    bin: int = 0
    split: str = "fit"
    sample: int = -1          # recorded-sample number (0-based) when record is True
    owners: List[Any] = field(default_factory=list)
    # the inputs of the layers that keep their own statistics, in this call, to find the layers
    # that read the same one: id(tensor) -> (weakref, layer), and layer -> (weakref, a copy when
    # small)
    seen: Dict[int, Tuple[Any, str]] = field(default_factory=dict)
    inputs_of: Dict[str, Tuple[Any, Optional[torch.Tensor]]] = field(default_factory=dict)
    runs: Dict[str, int] = field(default_factory=dict)  # layer -> times it ran in this call
    offered: Dict[Tuple[str, int, str], int] = field(default_factory=dict)  # rows offered per stats key


def _layer_info(module: nn.Module) -> Optional[Tuple[str, int, int]]:
    """(kind, in_features, groups) of a supported layer, None for anything else."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor) or isinstance(w, nn.parameter.UninitializedParameter):
        return None
    if isinstance(module, nn.Linear):
        return "linear", int(module.in_features), 1
    for cls, kind in ((nn.Conv1d, "conv1d"), (nn.Conv2d, "conv2d"), (nn.Conv3d, "conv3d")):
        if isinstance(module, cls):
            k = 1
            for s in module.kernel_size:
                k *= int(s)
            return kind, int(module.in_channels) // int(module.groups) * k, int(module.groups)
    return None


def _conv_padded(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The input as the convolution sees it after its padding (any padding mode, 'same' included)."""
    pad = list(module._reversed_padding_repeated_twice)
    if not any(pad):
        return x
    if module.padding_mode == "zeros":
        return F.pad(x, pad, mode="constant", value=0.0)
    return F.pad(x, pad, mode=module.padding_mode)


def _conv_patches(module: nn.Module, x: torch.Tensor, kind: str) -> torch.Tensor:
    """X of a convolution: (rows, in_channels / groups * prod(kernel)), columns ordered as the weight
    flattened to ``[out, in/groups * k...]``. A grouped convolution stacks its groups as rows
    (group g's rows hold input channels g*Cg .. (g+1)*Cg - 1)."""
    g = int(module.groups)
    c = int(module.in_channels)
    cg = c // g
    x = _conv_padded(module, x)
    if kind in ("conv1d", "conv2d"):
        if kind == "conv1d":
            x = x.unsqueeze(2)
            kernel, dilation, stride = (1, module.kernel_size[0]), (1, module.dilation[0]), (1, module.stride[0])
        else:
            kernel, dilation, stride = module.kernel_size, module.dilation, module.stride
        cols = F.unfold(x, kernel_size=kernel, dilation=dilation, padding=0, stride=stride)  # (n, c*K, L)
        n, ck, length = cols.shape
        return cols.reshape(n, g, ck // g, length).permute(1, 0, 3, 2).reshape(-1, ck // g)
    # conv3d: sliding windows of the dilated extent, then every dilation-th element of each.
    y = x
    for d in range(3):
        k, s, dil = module.kernel_size[d], module.stride[d], module.dilation[d]
        y = y.unfold(2 + d, (k - 1) * dil + 1, s)
    dd, dh, dw = module.dilation
    y = y[..., ::dd, ::dh, ::dw]  # (n, c, oD, oH, oW, kd, kh, kw)
    n = y.shape[0]
    kk = y.shape[5] * y.shape[6] * y.shape[7]
    y = y.permute(0, 2, 3, 4, 1, 5, 6, 7).reshape(-1, g, cg * kk)
    return y.permute(1, 0, 2).reshape(-1, cg * kk)


def _x_chunks(layer: _Layer, x: torch.Tensor) -> Iterator[torch.Tensor]:
    """The layer input as chunks of X (rows x in_features), each of a bounded size."""
    f = layer.in_features
    if layer.kind == "linear":
        if x.dim() == 0 or x.shape[-1] != f:
            return  # the layer itself will reject this input
        flat = x.reshape(-1, f)
        rows = max(1, min(HESSIAN_CHUNK_ROWS, _CHUNK_ELEMENTS // max(f, 1)))
        for i in range(0, flat.shape[0], rows):
            yield flat[i:i + rows]
        return
    spatial = {"conv1d": 1, "conv2d": 2, "conv3d": 3}[layer.kind]
    if x.dim() == spatial + 1:  # unbatched input
        x = x.unsqueeze(0)
    if x.dim() != spatial + 2 or x.shape[1] != layer.module.in_channels:
        return
    n = x.shape[0]
    per_sample = max(1, x[:1].numel() * int(np.prod(layer.module.kernel_size)))
    step = max(1, _CHUNK_ELEMENTS // per_sample)
    for i in range(0, n, step):
        yield _conv_patches(layer.module, x[i:i + step], layer.kind)


# ---------------------------------------------------------------------------------------------
# the histogram of input values
# ---------------------------------------------------------------------------------------------

_HIST_OFFSET = -HIST_MIN_EXP * HIST_BINS_PER_OCTAVE  # 192: bin k holds floor(log2|x| * 8) = k - 192
_HIST_EDGES: Dict[str, torch.Tensor] = {}


def _exact_hist_edges(dtype: type = np.float64) -> np.ndarray:
    """E[0..HIST_BINS]: E[0] = 0, E[k] = the smallest ``dtype`` value >= 2^((k - 192) / 8) for
    k = 1 .. HIST_BINS - 1, E[HIST_BINS] = inf; the bin of a magnitude a > 0 is the k with
    E[k] <= a < E[k + 1] (exactly the bin whose mathematical interval holds a)."""
    from fractions import Fraction

    inf = dtype(np.inf)
    edges = [dtype(0)]
    for k in range(1, HIST_BINS):
        j = k - _HIST_OFFSET       # the edge is 2^(j / 8): c >= it  <=>  c^8 >= 2^j
        target = Fraction(2) ** j
        c = dtype(2.0 ** (j / HIST_BINS_PER_OCTAVE))
        while Fraction(float(c)) ** HIST_BINS_PER_OCTAVE < target:
            c = np.nextafter(c, inf)
        while Fraction(float(np.nextafter(c, -inf))) ** HIST_BINS_PER_OCTAVE >= target:
            c = np.nextafter(c, -inf)
        edges.append(c)
    edges.append(inf)
    return np.array(edges, dtype=dtype)


def _hist_edges(device: torch.device) -> torch.Tensor:
    key = str(device)
    if key not in _HIST_EDGES:
        _HIST_EDGES[key] = torch.from_numpy(_exact_hist_edges(np.float64)).to(device)
    return _HIST_EDGES[key]


def _hist_counts(x: torch.Tensor) -> torch.Tensor:
    """int64 counts (2 * HIST_BINS + 1) of the values of ``x`` (float32 or float64, any shape):
    positive values by the bin of x, negative by the bin of -x, then exact zeros; NaN nowhere,
    +-inf in the last bin. The bin is floor(log2|x| * 8) + 192 clamped to [0, 383], exactly.

    float64 log2 is exact for float32 values: the nearest float32 to an edge 2^(j/8) (j not a
    multiple of 8) is 5e-9 (relative) away from it, far beyond float64 log2's error, and the edges
    2^n are exact. float64 values can lie within an ulp of an edge, so for them the bin is corrected
    against the exact float64 edges."""
    x = x.reshape(-1)
    xd = x.to(torch.float64)
    a = xd.abs()
    # floor(log2|x| * 8), NaN staying NaN; 0 (log2 = -inf) -> the first bin, inf -> the last.
    b = torch.log2(a).mul_(HIST_BINS_PER_OCTAVE).floor_().clamp_(-_HIST_OFFSET, HIST_BINS - 1 - _HIST_OFFSET)
    if x.dtype == torch.float64:  # at most one bin off, and only within an ulp of an edge
        edges = _hist_edges(x.device)
        k = (b + _HIST_OFFSET).nan_to_num_(nan=0.0).to(torch.int64)
        b.sub_((a < edges.take(k)).to(torch.float64)).add_((a >= edges.take(k + 1)).to(torch.float64))
        b.clamp_(max=HIST_BINS - 1 - _HIST_OFFSET)  # inf is >= the edge E[HIST_BINS] = inf
    b.add_((x < 0).to(torch.float64), alpha=HIST_BINS)              # negative values: hist_neg
    b.masked_fill_(x == 0, 2 * HIST_BINS - _HIST_OFFSET)             # +0.0 and -0.0: hist_zero
    b.nan_to_num_(nan=2 * HIST_BINS + 1 - _HIST_OFFSET)              # NaN: dropped
    k = b.to(torch.int64).add_(_HIST_OFFSET)
    return torch.bincount(k, minlength=2 * HIST_BINS + 2)[:2 * HIST_BINS + 1]


def _add_hist(st: "_Stats", values: torch.Tensor, dev: torch.device) -> None:
    """Adds the values of ``values`` (any shape and float dtype, any device) to ``st.hist`` on ``dev``,
    a bounded number of elements at a time. float16 / bfloat16 / float32 are binned as float32,
    float64 as float64."""
    flat = values.reshape(-1)
    dtype = torch.float64 if flat.dtype == torch.float64 else torch.float32
    if st.hist is None:
        st.hist = torch.zeros(2 * HIST_BINS + 1, dtype=torch.int64, device=dev)
    for i in range(0, flat.numel(), _HIST_CHUNK_ELEMENTS):
        st.hist += _hist_counts(flat[i:i + _HIST_CHUNK_ELEMENTS].to(device=dev, dtype=dtype))


# ---------------------------------------------------------------------------------------------
# the recorder
# ---------------------------------------------------------------------------------------------

class CalibrationRecorder:
    """Records the inputs of a denoiser's Linear / Conv layers per step bin.

    Parameters
    ----------
    model:
        The denoiser (``nn.Module``). Every ``nn.Linear``, ``nn.Conv1d``, ``nn.Conv2d`` and
        ``nn.Conv3d`` in ``model.named_modules()`` is recorded under the name of its weight tensor,
        ``f"{module_name}.weight"`` -- the name in the model's state_dict / safetensors file.
    step_range:
        ``(lo, hi)`` of the step values: timesteps (default ``(0, 1000)``) or mask ratios (default
        ``(0, 1)`` for ``step_kind="mask_ratio"``).
    num_bins:
        Number of bins, uniform over ``step_range``.
    max_samples:
        How many forward calls to record (``DiffusionQuantConfig.calibration_samples``).
    total_calls:
        If known, how many calls the sampling loop makes: the recorded calls are then spread evenly
        over them (:func:`sample_indices`). Without it the first ``max_samples`` calls are recorded.
    holdout_every:
        One in ``holdout_every`` recorded calls of each bin goes to the ``holdout`` split (bin b's
        k-th recorded call when ``(k + b) % holdout_every == holdout_every - 1``), the others to
        ``fit``; 0 puts every call in ``fit``.
    max_hessian_features:
        Layers whose X has more columns than this get no full Hessian: a block-diagonal one (see
        ``hessian_block``), or none (``hessian`` null, ``hessian_reason`` says why); their
        absmax / min / max are still recorded.
    hessian_block:
        Columns per diagonal block of the block-diagonal Hessian kept for layers wider than
        ``max_hessian_features`` (the last block takes the rest): ``in_features * hessian_block``
        values instead of ``in_features^2``. A multiple of 256, at most ``max_hessian_features``;
        0 (or more than ``max_hessian_features``) records no Hessian for those layers. GPTQ then
        moves each column's rounding error within its block only.
    input_samples:
        Rows of X kept per (layer, bin, split), drawn uniformly at random from every row the layer
        saw there (reservoir sampling, seeded from the layer name, bin and split, so a rerun keeps
        the same rows). The engine uses them to fit activation parameters after channel
        equalization and to measure W8A8 / W4A8 output error, and, where no held-out Hessian is
        kept, the held-out output error per timestep group. Only for layers with a Hessian; 0
        records none.
    fit_input_samples:
        Rows sampled in the ``fit`` split (default ``input_samples``): the engine uses them for
        W8A8 / W4A8 activation parameters after channel equalization only, so weight-only
        deployments of large models can save their disk with 0.
    hessian_bins:
        How many Hessians per layer and split, over uniform spans of ``num_bins // hessian_bins``
        adjacent step bins (it must divide ``num_bins``). ``None``: one per step bin. ``1``: one
        Hessian over the whole trajectory, for models whose Hessians would not fit otherwise
        (the other statistics stay per step bin).
    holdout_hessians:
        Whether the ``holdout`` split keeps Hessians too. ``False`` halves their memory and disk; the
        engine then measures held-out output error on the held-out input samples.
    share_inputs:
        Layers that read the same input in every recorded call (q/k/v of an attention, gate/up of
        an MLP, the adaLN projections of every block that read one conditioning vector) keep one set
        of statistics; the others' rows copy it and name it in ``hessian_from``. Found per call by
        tensor identity, or by value for inputs of at most 65536 elements (nn.Linear only).
    component:
        The pipeline component the model is (``"unet"``, ``"transformer"``), ``""`` for a single model.
    step_kind:
        ``"timestep"`` or ``"mask_ratio"``.
    device:
        Where statistics are accumulated. ``None``: on the device of each layer's input (CPU for
        Apple ``mps``, which has no float64).
    holdout_rule:
        ``"bin"`` (default): the held-out split as described under ``holdout_every``, which counts the
        calls of each bin in the order they arrive; input samples by reservoir sampling.
        ``"sample"``: every decision is a function of the call's place in the whole recording, so
        that recorders each given a share of the calls (``call_offset``) make the same ones as one
        recorder given them all: a recorded call is held out by :func:`holdout_by_sample` of its
        sample number, and the input rows kept are those of the smallest 64-bit keys hashed from
        (layer, bin, split, sample number, row within the call) -- a uniform sample too.
    call_offset:
        The number, in the whole recording, of this recorder's first call (needs ``total_calls``, the
        whole recording's, and ``holdout_rule="sample"``): for recording a share of the runs.
    shard:
        Save a shard (``save`` writes float64 Hessians and the sampled rows' keys, and the engine
        refuses the file): the shards of one recording are combined by :func:`merge_calibration`
        into the file one recorder would have written (needs ``holdout_rule="sample"`` and
        ``total_calls``).

    A forward call is counted, and possibly recorded, inside ``with rec.step(t):`` or, after
    :meth:`attach_timestep`, for each forward of the attached module. Layers that run outside both
    are not recorded (one warning says so).
    """

    def __init__(self, model: "nn.Module", step_range: Optional[Tuple[float, float]] = None, num_bins: int = 10,
                 max_samples: int = 128, total_calls: Optional[int] = None, holdout_every: int = 4,
                 max_hessian_features: int = 8192, component: str = "", step_kind: str = "timestep",
                 device: Optional[Union[str, "torch.device"]] = None, input_samples: int = 64,
                 hessian_bins: Optional[int] = None, holdout_hessians: bool = True,
                 share_inputs: bool = True, fit_input_samples: Optional[int] = None,
                 hessian_block: int = 4096, holdout_rule: str = "bin", call_offset: int = 0,
                 shard: bool = False) -> None:
        if not isinstance(model, nn.Module):
            raise ConfigurationError(f"model must be a torch.nn.Module; got {type(model).__name__}")
        if step_kind not in STEP_KINDS:
            raise ConfigurationError(f"step_kind must be one of {', '.join(map(repr, STEP_KINDS))}; got {step_kind!r}")
        if step_range is None:
            step_range = DEFAULT_STEP_RANGES[step_kind]
        if (isinstance(step_range, (str, bytes)) or not isinstance(step_range, Sequence) or len(step_range) != 2
                or not all(isinstance(v, numbers.Real) and not isinstance(v, bool) for v in step_range)
                or not all(math.isfinite(float(v)) for v in step_range)
                or not float(step_range[0]) < float(step_range[1])):
            raise ConfigurationError(f"step_range must be (lo, hi) with finite numbers lo < hi; got {step_range!r}")
        if not _is_int(num_bins) or not 1 <= num_bins <= 100000:
            raise ConfigurationError(f"num_bins must be an integer between 1 and 100000; got {num_bins!r}")
        if not _is_int(max_samples) or max_samples < 1:
            raise ConfigurationError(f"max_samples must be an integer >= 1; got {max_samples!r}")
        if total_calls is not None and (not _is_int(total_calls) or total_calls < 1):
            raise ConfigurationError(f"total_calls must be None or an integer >= 1; got {total_calls!r}")
        if not _is_int(holdout_every) or holdout_every < 0 or holdout_every == 1:
            raise ConfigurationError(f"holdout_every must be 0 (no held-out split) or an integer >= 2; "
                                     f"got {holdout_every!r}")
        if not _is_int(max_hessian_features) or not 0 <= max_hessian_features <= HESSIAN_FEATURES_LIMIT:
            raise ConfigurationError(f"max_hessian_features must be an integer between 0 and {HESSIAN_FEATURES_LIMIT}; "
                                     f"got {max_hessian_features!r}")
        if (not _is_int(hessian_block) or not 0 <= hessian_block <= HESSIAN_FEATURES_LIMIT
                or hessian_block % HESSIAN_BLOCK_MULTIPLE):
            raise ConfigurationError(f"hessian_block must be 0 or a multiple of {HESSIAN_BLOCK_MULTIPLE} up to "
                                     f"{HESSIAN_FEATURES_LIMIT}; got {hessian_block!r}")
        if not _is_int(input_samples) or not 0 <= input_samples <= 65536:
            raise ConfigurationError(f"input_samples must be an integer between 0 and 65536; got {input_samples!r}")
        if fit_input_samples is None:
            fit_input_samples = input_samples
        if not _is_int(fit_input_samples) or not 0 <= fit_input_samples <= 65536:
            raise ConfigurationError(f"fit_input_samples must be None or an integer between 0 and 65536; got "
                                     f"{fit_input_samples!r}")
        if not isinstance(component, str):
            raise ConfigurationError(f"component must be a string ('' for a single model); got {component!r}")
        if hessian_bins is None:
            hessian_bins = num_bins
        if not _is_int(hessian_bins) or not 1 <= hessian_bins <= num_bins or num_bins % hessian_bins:
            raise ConfigurationError(f"hessian_bins must be None or an integer from 1 to num_bins={num_bins} that "
                                     f"divides it; got {hessian_bins!r}")
        for what, v in (("holdout_hessians", holdout_hessians), ("share_inputs", share_inputs), ("shard", shard)):
            if not isinstance(v, bool):
                raise ConfigurationError(f"{what} must be True or False; got {v!r}")
        if holdout_rule not in HOLDOUT_RULES:
            raise ConfigurationError(f"holdout_rule must be one of {', '.join(map(repr, HOLDOUT_RULES))}; "
                                     f"got {holdout_rule!r}")
        if not _is_int(call_offset) or call_offset < 0:
            raise ConfigurationError(f"call_offset must be an integer >= 0; got {call_offset!r}")
        if (call_offset or shard) and (holdout_rule != "sample" or total_calls is None):
            raise ConfigurationError("call_offset and shard record a share of a recording: they need "
                                     "holdout_rule='sample' and total_calls (the whole recording's calls)")
        if device is not None:
            try:
                device = torch.device(device)
            except (RuntimeError, TypeError) as e:
                raise ConfigurationError(f"device must be None or a torch device; got {device!r}") from e
            if device.type == "mps":
                raise ConfigurationError("device 'mps' has no float64 for Hessians; use 'cpu' or None")

        self.model = model
        self.step_range: Tuple[float, float] = (float(step_range[0]), float(step_range[1]))
        self.num_bins = int(num_bins)
        self.max_samples = int(max_samples)
        self.total_calls = None if total_calls is None else int(total_calls)
        self.holdout_every = int(holdout_every)
        self.max_hessian_features = int(max_hessian_features)
        self.hessian_block = int(hessian_block)
        self.input_samples = int(input_samples)
        self.fit_input_samples = int(fit_input_samples)
        self.component = component
        self.step_kind = step_kind
        self.device = device
        self.hessian_bins = int(hessian_bins)
        self.hessian_span = self.num_bins // self.hessian_bins  # step bins per Hessian
        self.holdout_hessians = holdout_hessians
        self.share_inputs = share_inputs
        self.holdout_rule = holdout_rule
        self.call_offset = int(call_offset)
        self.shard = shard

        # total_calls known: the recorded calls' numbers in the whole recording -> sample number
        self._selected = (None if self.total_calls is None
                          else {c: s for s, c in enumerate(sample_indices(self.total_calls, self.max_samples))})
        self._calls = 0          # calls counted
        self._recorded = 0       # calls recorded
        self._recorded_in_bin: Dict[int, int] = {}  # calls recorded per bin
        self._active: Optional[_Call] = None
        self._stats: Dict[Tuple[str, int, str], _Stats] = {}
        # (layer, Hessian span index, split) -> X^T X
        self._hessians: Dict[Tuple[str, int, str], _Hessian] = {}
        # layer -> the layer whose input it reads (itself when it reads its own), decided at the
        # layer's first recorded call and checked at every later one
        self._owner: Dict[str, str] = {}
        # layers whose statistics are accumulated (None: all); the others are only followed to
        # find shared inputs (a recording split over several passes, see record_pipeline)
        self._accumulate_only: Optional[frozenset] = None
        # layer -> its place in the order the layers first ran in recorded calls
        self._run_order: Dict[str, int] = {}
        self._max_runs: Dict[str, int] = {}  # layer -> most times it ran in one recorded call
        # set when the statistics were written pass by pass by record_pipeline(max_memory=...)
        self._streamed_to: Optional[str] = None
        self._free_written = False  # streamed passes: drop each Hessian once its row is written
        # absmax / min / max / histograms only, no Hessians or input samples (the first pass of
        # calibrate_and_quantize(sequential=True), which only fixes the timestep groups)
        self._stats_only = False
        # seconds spent in the layer hooks (the statistics: the recorder's own work), every pass
        self.hook_seconds = 0.0
        # record_pipeline: per pass, {"layers", "calls", "seconds", "hook_seconds"}
        self.passes: List[Dict[str, Any]] = []
        self._handles: List[Any] = []
        self._closed = False
        self._warned: set = set()

        self._layers: List[_Layer] = []
        self._by_name: Dict[str, _Layer] = {}
        for module_name, module in model.named_modules():
            info = _layer_info(module)
            if info is None:
                continue
            kind, f, groups = info
            name = f"{module_name}.weight" if module_name else "weight"
            reason = None
            block = 0
            if groups > 1:
                reason = (f"grouped convolution (groups={groups}): per-group Hessians are not recorded "
                          f"(absmax/min/max stack the groups as rows)")
            elif f > self.max_hessian_features:
                if 0 < self.hessian_block <= self.max_hessian_features:
                    block = self.hessian_block
                else:
                    reason = f"in_features {f} > max_hessian_features {self.max_hessian_features}"
            layer = _Layer(name, module, kind, f, reason, len(self._layers), block)
            self._layers.append(layer)
            self._by_name[name] = layer
            self._handles.append(module.register_forward_pre_hook(self._make_layer_hook(layer)))
        if not self._layers:
            raise ConfigurationError(f"model {type(model).__name__} has no nn.Linear / nn.Conv1d / nn.Conv2d / "
                                     f"nn.Conv3d layer to record")

    # -- properties -----------------------------------------------------------------------------

    @property
    def layers(self) -> List[str]:
        """The recorded layers' weight tensor names, in model order."""
        return [layer.name for layer in self._layers]

    @property
    def calls(self) -> int:
        """Forward calls counted so far (recorded or not)."""
        return self._calls

    @property
    def recorded_calls(self) -> int:
        """Forward calls recorded so far."""
        return self._recorded

    @property
    def hessian_reasons(self) -> Dict[str, str]:
        """{layer: why it gets no Hessian} for the layers without one."""
        return {layer.name: layer.hessian_reason for layer in self._layers if layer.hessian_reason}

    @property
    def hessian_blocks(self) -> Dict[str, int]:
        """{layer: columns per diagonal block} for the layers that keep a block-diagonal Hessian."""
        return {layer.name: layer.hessian_block for layer in self._layers if layer.hessian_block}

    def hessian_bytes(self) -> int:
        """Bytes the Hessians take now (float64: in_features^2, or the diagonal blocks' entries, per
        (layer, Hessian span, split))."""
        return sum(h.numel() * 8 for h in self._hessians.values())

    def layer_hessian_bytes(self, name: str) -> int:
        """Upper bound of the bytes layer ``name``'s Hessians take: every span and split kept (0 for a
        layer without a Hessian, or one that shares another's)."""
        layer = self._by_name[name]
        if layer.hessian_reason is not None or self._owner.get(name, name) != name:
            return 0
        splits = 2 if self.holdout_every and self.holdout_hessians else 1
        return layer.hessian_values() * 8 * self.hessian_bins * splits

    def max_hessian_bytes(self) -> int:
        """Upper bound of :meth:`hessian_bytes`: every layer with a Hessian in every span and split."""
        return sum(self.layer_hessian_bytes(layer.name) for layer in self._layers)

    @property
    def shared_inputs(self) -> Dict[str, str]:
        """{layer: the layer whose statistics it shares} for the layers found reading another's input."""
        return {k: v for k, v in self._owner.items() if k != v}

    def hessian(self, layer: str, bin: int, split: str = "fit") -> Optional[Union[torch.Tensor, List[torch.Tensor]]]:
        """The float64 X^T X accumulated so far for ``layer`` over the Hessian span holding ``bin``
        (the span's every bin; that of the layer it shares its input with), or None. For a layer
        with a block-diagonal Hessian (:attr:`hessian_blocks`), the list of its diagonal blocks."""
        owner = self._owner.get(layer, layer)
        h = self._hessians.get((owner, bin // self.hessian_span, split))
        if h is None:
            return None
        return h.blocks if self._by_name[owner].hessian_block else h.blocks[0]

    # -- calls --------------------------------------------------------------------------------

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            warnings.warn(message, UserWarning, stacklevel=3)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigurationError("this CalibrationRecorder is closed (its hooks are removed); "
                                     "create a new one to record more")

    def _begin_call(self, step: float) -> _Call:
        index = self.call_offset + self._calls  # in the whole recording
        self._calls += 1
        if self._selected is not None:
            record = index in self._selected
            if index >= self.total_calls:
                self._warn_once("total_calls", f"CalibrationRecorder: call {index + 1} is beyond total_calls="
                                f"{self.total_calls}; calls past total_calls are not recorded")
        else:
            record = self._recorded < self.max_samples
            if not record:
                self._warn_once("max_samples", f"CalibrationRecorder: the first max_samples={self.max_samples} "
                                f"calls were recorded and later calls (from call {index + 1} on) are not; pass "
                                f"total_calls to spread the samples over the whole sampling loop")
        if not record:
            return _Call(index, False)
        lo, hi = self.step_range
        tol = 1e-9 * (hi - lo)
        if step < lo - tol or step > hi + tol:
            self._warn_once("range", f"CalibrationRecorder: {self.step_kind} value {step!r} is outside step_range "
                            f"[{lo}, {hi}]; it is counted in the {'first' if step < lo else 'last'} bin")
        # the call's sample number in the whole recording (the same as counting here when this
        # recorder sees every call from the first)
        sample = self._selected[index] if self.holdout_rule == "sample" else self._recorded
        self._recorded += 1
        b = step_bin(step, self.step_range, self.num_bins)
        # stratified by bin: bin b's k-th recorded call is held out when (k + b) % holdout_every is
        # holdout_every - 1, so both splits see every bin that gets holdout_every calls, bins with
        # fewer still share the held-out calls, and runs that visit the bins in the same order do
        # not hold out the same timesteps in every run (as counting over all calls did)
        in_bin = self._recorded_in_bin.get(b, 0)
        self._recorded_in_bin[b] = in_bin + 1
        if self.holdout_rule == "sample":
            holdout = holdout_by_sample(sample, self.holdout_every)
        else:
            holdout = self.holdout_every > 0 and (in_bin + b) % self.holdout_every == self.holdout_every - 1
        return _Call(index, True, step, b, "holdout" if holdout else "fit", sample)

    @contextlib.contextmanager
    def step(self, t: Any) -> Iterator["CalibrationRecorder"]:
        """``with rec.step(t): out = model(...)`` -- one call at step value ``t`` (a number, or a 0-d or
        1-d tensor whose mean is taken). Every layer forward inside the block belongs to this call;
        forwards of an attached module inside it do not start another call."""
        self._check_open()
        if self._active is not None:
            raise ConfigurationError("rec.step(...) blocks cannot be nested (a call is already in progress "
                                     f"at {self.step_kind} {self._active.step!r})")
        value = _step_value(t, f"rec.step(t): {self.step_kind}")
        self._active = self._begin_call(value)
        try:
            yield self
        finally:
            self._active = None

    def attach_timestep(self, module: Optional["nn.Module"] = None, arg: Optional[Union[str, int, Any]] = None,
                        scale: float = 1.0) -> "CalibrationRecorder":
        """Makes every forward of ``module`` (default: the recorded model) one call, reading its step
        value from the call's arguments: ``arg`` if given (a keyword name, a positional index, or a
        function ``arg(args, kwargs)`` returning the value -- e.g. a diffusion LM's mask ratio,
        ``lambda a, kw: (kw["input_ids"] == MASK_ID).float().mean()``), else the keyword
        ``timestep``, ``t`` or ``timesteps``, else the 2nd positional argument. The value is
        multiplied by ``scale`` (e.g. 1000 for a model that is passed ``t / 1000``).

        This is how diffusers pipelines are recorded: ``rec.attach_timestep(pipe.unet); pipe(...)``.
        A classifier-free-guidance batch (doubled) is one call whose rows are all recorded.
        Returns ``self``.
        """
        self._check_open()
        module = self.model if module is None else module
        if not isinstance(module, nn.Module):
            raise ConfigurationError(f"attach_timestep: module must be a torch.nn.Module; got {type(module).__name__}")
        if arg is not None and not isinstance(arg, str) and not _is_int(arg) and not callable(arg):
            raise ConfigurationError(f"attach_timestep: arg must be None, a keyword name, a positional index or a "
                                     f"function (args, kwargs) -> value; got {arg!r}")
        if isinstance(scale, bool) or not isinstance(scale, numbers.Real) or not math.isfinite(scale) or scale == 0:
            raise ConfigurationError(f"attach_timestep: scale must be a finite non-zero number; got {scale!r}")
        owner = object()
        where = type(module).__name__

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if self._active is not None:
                return  # inside rec.step(...) or an outer attached call: part of that call
            if callable(arg) and not isinstance(arg, str):
                with torch.no_grad():
                    value = arg(args, kwargs)
            else:
                value = _find_step_arg(args, kwargs, arg, where)
            call = self._begin_call(_step_value(value, f"{where} {self.step_kind} argument") * float(scale))
            call.owners.append(owner)
            self._active = call

        def post_hook(mod: nn.Module, args: tuple, output: Any) -> None:
            if self._active is not None and self._active.owners and self._active.owners[-1] is owner:
                self._active = None

        # prepend: when the attached module is itself a recorded layer, the call must start before
        # that layer's own hook runs.
        self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True))
        try:
            self._handles.append(module.register_forward_hook(post_hook, always_call=True))
        except TypeError:  # torch without always_call
            self._handles.append(module.register_forward_hook(post_hook))
        return self

    # -- accumulation -------------------------------------------------------------------------

    def _make_layer_hook(self, layer: _Layer):
        def hook(mod: nn.Module, args: tuple) -> None:
            call = self._active
            if call is None:
                self._warn_once("outside", f"CalibrationRecorder: layer {layer.name!r} ran outside rec.step(...) "
                                f"and attach_timestep; such calls are not recorded")
                return
            if not call.record or not args or not isinstance(args[0], torch.Tensor):
                return
            x = args[0]
            if not (x.is_floating_point()):
                return
            self._run_order.setdefault(layer.name, len(self._run_order))
            runs = call.runs.get(layer.name, 0) + 1
            call.runs[layer.name] = runs
            if runs > self._max_runs.get(layer.name, 0):
                self._max_runs[layer.name] = runs
            start = time.perf_counter()
            try:
                with torch.no_grad(), torch.inference_mode(False):
                    if self._input_owner(layer, x, call) != layer.name:
                        return  # reads another layer's input: its rows copy that layer's
                    if self._accumulate_only is None or layer.name in self._accumulate_only:
                        self._accumulate(layer, x.detach(), call)
            finally:
                self.hook_seconds += time.perf_counter() - start
        return hook

    def _input_owner(self, layer: _Layer, x: torch.Tensor, call: _Call) -> str:
        """The layer whose statistics stand for ``layer``'s: at the layer's first recorded call, the
        first layer of that call that read the same input (the same tensor, or equal values for an
        input of at most 65536 elements), else the layer itself. Every later call checks that the
        layer still reads its owner's input; one that does not is an error (the statistics would
        be wrong)."""
        if not self.share_inputs or layer.kind != "linear":
            return layer.name
        small = x.numel() <= _SHARE_BY_VALUE_ELEMENTS

        def same(entry: Tuple[Any, Optional[torch.Tensor]]) -> bool:
            ref, value = entry
            if ref() is x:
                return True
            return (value is not None and small and value.shape == x.shape and value.dtype == x.dtype
                    and value.device == x.device and torch.equal(value, x))

        expected = self._owner.get(layer.name)
        if expected is not None and expected != layer.name:
            entry = call.inputs_of.get(expected)
            if entry is not None and same(entry):
                return expected
            raise ConfigurationError(
                f"CalibrationRecorder: layer {layer.name!r} read the same input as {expected!r} in earlier calls but "
                f"not in call {call.index}, and the two share one set of statistics; record with share_inputs=False")
        if expected is None:
            found = None
            entry = call.seen.get(id(x))
            if entry is not None and entry[0]() is x:
                found = entry[1]
            elif small:
                for name, e in call.inputs_of.items():
                    if e[1] is not None and same(e):
                        found = name
                        break
            if found is not None and self._by_name[found].in_features == layer.in_features \
                    and self._by_name[found].hessian_reason == layer.hessian_reason \
                    and self._by_name[found].hessian_block == layer.hessian_block:
                self._owner[layer.name] = found
                return found
            self._owner[layer.name] = layer.name
        # an owner: its input, for the layers that may read it later in this call
        call.seen[id(x)] = (weakref.ref(x), layer.name)
        call.inputs_of[layer.name] = (weakref.ref(x), x.detach().clone() if small else None)
        return layer.name

    def _accumulate(self, layer: _Layer, x: torch.Tensor, call: _Call) -> None:
        key = (layer.name, call.bin, call.split)
        st = self._stats.get(key)
        keep_hessian = (layer.hessian_reason is None and (call.split == "fit" or self.holdout_hessians)
                        and not self._stats_only)
        hkey = (layer.name, call.bin // self.hessian_span, call.split)
        dev = None
        for chunk in _x_chunks(layer, x):
            if chunk.shape[0] == 0:
                continue
            if st is None:
                st = self._stats[key] = _Stats(layer.in_features, layer.hessian_reason is None)
            dev = st.absmax.device if st.absmax is not None else (self.device or _stats_device(chunk))
            chunk = chunk.to(dev)
            xf = chunk.float()
            if layer.kind == "linear":  # X's elements are the input's; a conv's X repeats them
                _add_hist(st, chunk if chunk.dtype == torch.float64 else xf, dev)
            amax, cmin, cmax = xf.abs().amax(0), xf.amin(0), xf.amax(0)
            if st.absmax is None:
                st.absmax, st.min, st.max = amax, cmin, cmax
            else:
                torch.maximum(st.absmax, amax, out=st.absmax)
                torch.minimum(st.min, cmin, out=st.min)
                torch.maximum(st.max, cmax, out=st.max)
            if keep_hessian:
                h = self._hessians.get(hkey)
                spans = layer.blocks()
                if h is None:
                    h = self._hessians[hkey] = _Hessian([torch.zeros(e - b, e - b, dtype=torch.float64, device=dev)
                                                         for b, e in spans])
                # float32 products of a bounded number of rows, summed in float64; float64 inputs,
                # and values whose float32 sums of squares could overflow, keep float64 products
                exact = chunk.dtype == torch.float64 or float(amax.max()) > _FLOAT32_PRODUCT_LIMIT
                with _full_float32_matmul():
                    for i in range(0, chunk.shape[0], HESSIAN_CHUNK_ROWS):
                        xc = (chunk[i:i + HESSIAN_CHUNK_ROWS].to(torch.float64) if exact
                              else xf[i:i + HESSIAN_CHUNK_ROWS])
                        if len(spans) == 1:
                            h.blocks[0].add_(xc.t() @ xc)
                        else:
                            for m, (b, e) in zip(h.blocks, spans):
                                xb = xc[:, b:e]
                                m.add_(xb.t() @ xb)
                h.rows += int(chunk.shape[0])
            capacity = self.fit_input_samples if call.split == "fit" else self.input_samples
            if st.with_hessian and capacity and not self._stats_only:
                if self.holdout_rule == "sample":
                    first = call.offered.get(key, 0)
                    call.offered[key] = first + int(xf.shape[0])
                    _offer_rows_keyed(st, xf, capacity, key, call.sample, first)
                else:
                    _offer_rows(st, xf, capacity, key)
            st.rows += int(chunk.shape[0])
            if st.last_call != call.index:
                st.last_call = call.index
                st.samples += 1
                st.step_sum += call.step
        if dev is not None and layer.kind != "linear":
            _add_hist(st, x, dev)  # the raw input tensor: every element once, no padding

    # -- output -------------------------------------------------------------------------------

    def metadata(self) -> Dict[str, str]:
        """The file's key-value metadata."""
        from . import __version__

        return {
            "arrowquant.calibration_version": CALIBRATION_VERSION,
            "arrowquant.step_kind": self.step_kind,
            "arrowquant.step_range": json.dumps([self.step_range[0], self.step_range[1]]),
            "arrowquant.num_bins": str(self.num_bins),
            "arrowquant.samples": str(self._recorded),
            "arrowquant.producer": f"arrow_quant_v2 {__version__}",
            "arrowquant.hist_bins_per_octave": str(HIST_BINS_PER_OCTAVE),
            "arrowquant.hist_min_exp": str(HIST_MIN_EXP),
            "arrowquant.hist_max_exp": str(HIST_MAX_EXP),
            **({"arrowquant.holdout_rule": self.holdout_rule} if self.holdout_rule != "bin" else {}),
            **({SHARD_KEY: json.dumps({"call_offset": self.call_offset, "calls": self._calls,
                                       "total_calls": self.total_calls, "max_samples": self.max_samples,
                                       "holdout_every": self.holdout_every, "input_samples": self.input_samples,
                                       "fit_input_samples": self.fit_input_samples,
                                       "hessian_span": self.hessian_span, "component": self.component,
                                       "layers": [layer.name for layer in self._layers],
                                       "owners": {k: v for k, v in self._owner.items() if k != v}})}
               if self.shard else {}),
        }

    def _rows(self, names: Optional[Sequence[str]] = None) -> Iterator[Dict[str, Any]]:
        """The file's rows of the layers ``names`` (default: every layer, in model order): per layer
        its (bin, split) rows, bins ascending, ``fit`` before ``holdout``. A layer that shares
        another's input gets copies of that layer's rows, without the Hessian (``hessian_from``)."""
        if names is None:
            names = [layer.name for layer in self._layers]
        by_layer: Dict[str, List[Tuple[int, str]]] = {}
        for name, b, split in self._stats:
            by_layer.setdefault(name, []).append((b, split))
        for name in names:
            owner = self._owner.get(name, name)
            keys = sorted(by_layer.get(owner, ()), key=lambda k: (k[0], SPLITS.index(k[1])))
            # the row holding a span's Hessian: the span's first bin with data
            holder: Dict[Tuple[int, str], int] = {}
            for b, split in keys:
                holder.setdefault((b // self.hessian_span, split), b)
            for b, split in keys:
                st = self._stats[(owner, b, split)]
                if st.samples == 0 or st.absmax is None:
                    continue
                yield self._row(name, owner, b, split, st, holder[(b // self.hessian_span, split)] == b)

    def _row(self, name: str, owner: str, b: int, split: str, st: _Stats, holds: bool) -> Dict[str, Any]:
        layer = self._by_name[name]
        lo, hi = bin_edges(b, self.step_range, self.num_bins)
        hist = (np.zeros(2 * HIST_BINS + 1, np.int64) if st.hist is None
                else st.hist.detach().cpu().numpy().astype(np.int64, copy=False))
        absmax = st.absmax.detach().cpu().numpy().astype(np.float32, copy=False)
        h = self._hessians.get((owner, b // self.hessian_span, split))
        reason = layer.hessian_reason
        if reason is None and h is None:
            reason = ("holdout_hessians=False: no held-out Hessian (held-out output error is measured on the "
                      "held-out input samples)")
        if not np.isfinite(absmax).all():
            bad = int(np.flatnonzero(~np.isfinite(absmax))[0])
            raise QuantizationError(
                f"calibration data of layer {owner!r} ({self.step_kind} bin {b}, split {split!r}) is not finite: "
                f"absmax value {absmax[bad]!r} at column {bad}; the layer saw NaN or infinite inputs")
        hessian = None
        if h is not None and holds and name == owner:
            packed = []
            for (first, _), m in zip(layer.blocks(), h.blocks):
                full = m.detach().cpu().numpy()
                big = np.abs(full) > np.finfo(np.float32).max if not self.shard else np.zeros_like(full, bool)
                if not np.isfinite(full).all() or big.any():
                    bad = np.argwhere(~np.isfinite(full) | big)[0]
                    raise QuantizationError(
                        f"calibration data of layer {owner!r} ({self.step_kind} bin {b}, split {split!r}): hessian "
                        f"value {full[bad[0], bad[1]]!r} at ({first + bad[0]}, {first + bad[1]}) is not finite or "
                        f"beyond float32's range (the file stores float32); the layer's inputs reach "
                        f"{float(absmax.max())!r}")
                packed.append(_pack_upper(full, np.float64 if self.shard else np.float32))
            hessian = packed[0] if len(packed) == 1 else np.concatenate(packed)
            if self._free_written:
                h.blocks = []  # written: its rows count is all later rows need
        inputs, keys = st.inputs, st.keys
        if inputs is not None and keys is not None:  # holdout_rule="sample": rows in the order of their keys
            order = np.argsort(keys, kind="stable")
            inputs, keys = inputs[torch.as_tensor(order, device=inputs.device)], keys[order]
        row = {
            "component": self.component, "layer": name, "bin": b, "step_lo": lo, "step_hi": hi,
            "split": split, "samples": st.samples, "rows": st.rows, "step_sum": st.step_sum,
            "in_features": st.in_features,
            "absmax": absmax,
            "min": st.min.detach().cpu().numpy().astype(np.float32, copy=False),
            "max": st.max.detach().cpu().numpy().astype(np.float32, copy=False),
            "hessian": hessian,
            "hessian_reason": reason,
            "hessian_span": self.hessian_span,
            "hessian_rows": h.rows if (h is not None and holds) else None,
            "hessian_from": owner if (name != owner and h is not None) else None,
            "hessian_block": layer.hessian_block or None,
            "hist_pos": hist[:HIST_BINS],
            "hist_neg": hist[HIST_BINS:2 * HIST_BINS],
            "hist_zero": int(hist[2 * HIST_BINS]),
            "inputs": None if inputs is None else inputs.detach().cpu().numpy().reshape(-1),
        }
        if self.shard:
            row["input_keys"] = keys
        return row

    def save(self, path: PathLike) -> str:
        """Writes ``calibration.parquet`` (docs/calibration.md): one row per (layer, bin, split) with at
        least one sample, one row group per row. The file appears atomically (written to a temporary
        file in the same directory, then renamed); returns its path. Works after :meth:`close`."""
        if self._streamed_to is not None:
            raise ConfigurationError(f"this recorder's statistics were written to {self._streamed_to!r} pass by pass "
                                     f"(record_pipeline with max_memory) and are no longer held")
        if self._recorded == 0:
            warnings.warn(f"CalibrationRecorder.save({os.fspath(path)!r}): no call was recorded (run the model "
                          f"inside rec.step(t) or after rec.attach_timestep()); the file has no rows", UserWarning,
                          stacklevel=2)
        with _CalibrationWriter(path, self.metadata(), shard=self.shard) as writer:
            for row in self._rows():
                writer.write(row)
        return writer.path

    def close(self) -> None:
        """Removes every hook; the statistics stay (``save`` still works)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._active = None
        self._closed = True

    def __enter__(self) -> "CalibrationRecorder":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"CalibrationRecorder({type(self.model).__name__}, layers={len(self._layers)}, "
                f"step_kind={self.step_kind!r}, step_range={self.step_range}, num_bins={self.num_bins}, "
                f"calls={self._calls}, recorded={self._recorded}/{self.max_samples})")


@contextlib.contextmanager
def _full_float32_matmul() -> Iterator[None]:
    """float32 matmuls at full precision inside (not TF32 or bfloat16 passes, which scripts often
    allow globally with torch.set_float32_matmul_precision or allow_tf32)."""
    precision = torch.get_float32_matmul_precision()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    if precision == "highest" and not tf32:
        yield
        return
    torch.set_float32_matmul_precision("highest")
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
        torch.set_float32_matmul_precision(precision)


def _offer_rows(st: "_Stats", x: torch.Tensor, capacity: int, key: Tuple[str, int, str]) -> None:
    """Reservoir sampling (Vitter's algorithm R) of X's rows: after n rows were offered, each is in
    the sample with probability capacity / n. The generator is seeded from the key, so the sample
    depends only on the rows offered and their order."""
    if st.generator is None:
        seed = zlib.crc32(f"{key[0]}\0{key[1]}\0{key[2]}".encode())
        st.generator = np.random.default_rng(seed)
        st.inputs = torch.empty(0, x.shape[1], dtype=torch.float32, device=x.device)
    m = int(x.shape[0])
    fill = max(0, min(capacity - st.inputs.shape[0], m))
    if fill:
        st.inputs = torch.cat([st.inputs, x[:fill].float()])
    if fill < m:
        seen = st.offered + np.arange(fill, m, dtype=np.int64)  # each row's 0-based index among all offered
        slot = (st.generator.random(m - fill) * (seen + 1)).astype(np.int64)
        rows = np.flatnonzero(slot < capacity)
        if rows.size:
            # a later row replacing the same slot wins, as in the sequential algorithm
            last = {int(slot[r]): int(r) + fill for r in rows}
            idx = torch.as_tensor(list(last.keys()), dtype=torch.long, device=x.device)
            src = torch.as_tensor(list(last.values()), dtype=torch.long, device=x.device)
            st.inputs[idx] = x[src].float()
    st.offered += m


def _offer_rows_keyed(st: "_Stats", x: torch.Tensor, capacity: int, key: Tuple[str, int, str], sample: int,
                      first: int) -> None:
    """holdout_rule="sample": each row gets a 64-bit key hashed from the statistics' key (layer, bin,
    split), the call's sample number and the row's place among the rows this call offered (first,
    first + 1, ...); the rows of the ``capacity`` smallest keys are kept. A uniform sample of the
    rows, whatever order the calls come in, and the union of two recorders' samples keeps the
    rows one recorder would have."""
    seed = np.uint64(zlib.crc32(f"{key[0]}\0{key[1]}\0{key[2]}".encode()))
    m = int(x.shape[0])
    pos = (np.uint64(sample) << np.uint64(32)) + np.arange(first, first + m, dtype=np.uint64)
    keys = _mix64(_mix64(pos) ^ seed)
    if st.keys is None:
        st.keys = np.empty(0, np.uint64)
        st.inputs = torch.empty(0, x.shape[1], dtype=torch.float32, device=x.device)
    if st.keys.size >= capacity:  # only rows below the largest key kept can enter
        new = np.flatnonzero(keys < st.keys.max())
    else:
        new = np.arange(m)
    if new.size:
        all_keys = np.concatenate([st.keys, keys[new]])
        rows = torch.cat([st.inputs, x[torch.as_tensor(new, device=x.device)].float()])
        if all_keys.size > capacity:
            keep = np.argpartition(all_keys, capacity - 1)[:capacity]
            all_keys, rows = all_keys[keep], rows[torch.as_tensor(keep, device=x.device)]
        st.keys, st.inputs = all_keys, rows
    st.offered += m


def _stats_device(t: torch.Tensor) -> torch.device:
    return torch.device("cpu") if t.device.type == "mps" else t.device


def _find_step_arg(args: tuple, kwargs: dict, arg: Optional[Union[str, int]], where: str) -> Any:
    if isinstance(arg, str):
        if kwargs.get(arg) is None:
            raise ConfigurationError(f"attach_timestep: {where} was called without keyword argument {arg!r} "
                                     f"(keywords given: {sorted(kwargs)})")
        return kwargs[arg]
    if arg is not None:
        if not -len(args) <= arg < len(args):
            raise ConfigurationError(f"attach_timestep: {where} was called with {len(args)} positional arguments; "
                                     f"positional index {arg} is not one of them")
        return args[arg]
    for key in TIMESTEP_KWARGS:
        if kwargs.get(key) is not None:
            return kwargs[key]
    if len(args) >= 2:
        return args[1]
    raise ConfigurationError(f"attach_timestep: cannot find the timestep of a call of {where}: no keyword "
                             f"{', '.join(TIMESTEP_KWARGS)} and fewer than 2 positional arguments (keywords "
                             f"given: {sorted(kwargs)}); pass arg= to attach_timestep")


def _list_array(values: Optional[np.ndarray], value_type: pa.DataType) -> pa.Array:
    if values is None:
        return pa.array([None], type=pa.list_(value_type))
    flat = pa.array(np.ascontiguousarray(values), type=value_type)
    return pa.ListArray.from_arrays(pa.array([0, len(flat)], type=pa.int32()), flat)


def _row_table(row: Dict[str, Any], schema: pa.Schema) -> pa.Table:
    cols = []
    for f in schema:
        name, typ = f.name, f.type
        if pa.types.is_list(typ):
            cols.append(_list_array(row[name], typ.value_type))
        else:
            cols.append(pa.array([row[name]], type=typ))
    return pa.Table.from_arrays(cols, schema=schema)


def _pack_upper(h: np.ndarray, dtype: Any = np.float32) -> np.ndarray:
    """The upper triangle of a symmetric n x n matrix, row by row (H[0, 0..n-1], H[1, 1..n-1], ...),
    as float32 (or ``dtype``)."""
    n = h.shape[0]
    out = np.empty(n * (n + 1) // 2, dtype=dtype)
    at = 0
    for i in range(n):
        out[at:at + n - i] = h[i, i:]
        at += n - i
    return out


def _unpack_upper(packed: np.ndarray, n: int) -> np.ndarray:
    """The symmetric float64 n x n matrix of a packed upper triangle."""
    h = np.empty((n, n), dtype=np.float64)
    at = 0
    for i in range(n):
        h[i, i:] = packed[at:at + n - i]
        h[i:, i] = packed[at:at + n - i]
        at += n - i
    return h


class _CalibrationWriter:
    """Writes calibration.parquet row by row into a temporary file beside ``path`` and renames it onto
    ``path`` when closed without an error (a reader never sees a partial file)."""

    def __init__(self, path: PathLike, metadata: Mapping[str, str], shard: bool = False) -> None:
        self.path = os.fspath(path)
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise ModelNotFoundError(f"cannot save calibration data to {self.path!r}: directory {directory!r} "
                                     f"does not exist")
        self.schema = calibration_schema(metadata, shard)
        fd, self.tmp = tempfile.mkstemp(prefix=".calibration-", suffix=".parquet.tmp", dir=directory)
        os.close(fd)
        try:
            self.writer = pq.ParquetWriter(self.tmp, self.schema,
                                           compression={n: ("NONE" if n == "hessian" else "ZSTD")
                                                        for n in self.schema.names},
                                           use_dictionary=["component", "layer", "split", "hessian_reason",
                                                           "hessian_from"],
                                           write_statistics=["component", "layer", "bin", "split"])
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(self.tmp)
            raise
        self.rows = 0

    def write(self, row: Dict[str, Any]) -> None:
        self.writer.write_table(_row_table(row, self.schema))
        self.rows += 1

    def __enter__(self) -> "_CalibrationWriter":
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        try:
            self.writer.close()
            if exc_type is None:
                umask = os.umask(0)
                os.umask(umask)
                os.chmod(self.tmp, 0o666 & ~umask)
                os.replace(self.tmp, self.path)
        finally:
            with contextlib.suppress(OSError):
                if os.path.exists(self.tmp):
                    os.unlink(self.tmp)


# ---------------------------------------------------------------------------------------------
# diffusers pipelines
# ---------------------------------------------------------------------------------------------

def _find_denoiser(pipe: Any) -> Tuple["nn.Module", str]:
    for attr in ("transformer", "unet", "model"):
        m = getattr(pipe, attr, None)
        if isinstance(m, nn.Module):
            return m, attr
    raise ConfigurationError(f"record_pipeline: {type(pipe).__name__} has no 'transformer', 'unet' or 'model' module")


def _clone_tree(obj: Any) -> Any:
    """A copy of a call's arguments with every tensor detached and cloned (containers rebuilt)."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone()
    if isinstance(obj, tuple):
        return tuple(_clone_tree(v) for v in obj)
    if isinstance(obj, list):
        return [_clone_tree(v) for v in obj]
    if isinstance(obj, dict):
        return {k: _clone_tree(v) for k, v in obj.items()}
    return obj


def _release_memory(collect: bool = False) -> None:
    """Returns freed heap memory to the system (glibc keeps the freed small and mid-size blocks of
    the passes' statistics and forwards in its heap otherwise: measured 2.5 GB on DiT-XL)."""
    if collect:
        gc.collect()
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _malloc_trim() -> Any:
    try:
        return getattr(ctypes.CDLL(None), "malloc_trim", None)  # glibc only
    except OSError:  # pragma: no cover - platforms without a C library handle
        return None


_MALLOC_TRIM = _malloc_trim()


class _StopReplay(Exception):
    """Raised by a hook to end a replayed forward once the layers of its pass have run."""


def _partition(names: Sequence[str], sizes: Mapping[str, int], budget: int) -> List[List[str]]:
    """Consecutive groups of ``names`` whose sizes sum to at most ``budget`` (a layer larger than the
    budget alone)."""
    groups: List[List[str]] = []
    used = 0
    for n in names:
        if not groups or (used + sizes[n] > budget and groups[-1]):
            groups.append([])
            used = 0
        groups[-1].append(n)
        used += sizes[n]
    return groups


def record_pipeline(pipe: Any, prompts_or_kwargs: Any, num_inference_steps: int, max_samples: int = 128,
                    num_bins: int = 10, holdout_every: int = 4, max_hessian_features: int = 8192,
                    input_samples: int = 64, hessian_block: int = 4096,
                    calls_per_step: int = 1, step_range: Optional[Tuple[float, float]] = None,
                    timestep_scale: Optional[float] = None, output_path: Optional[PathLike] = None,
                    device: Optional[Union[str, "torch.device"]] = None, hessian_bins: Optional[int] = None,
                    holdout_hessians: bool = True, share_inputs: bool = True, fit_input_samples: Optional[int] = None,
                    max_memory: Optional[int] = None, progress_callback: Optional[Any] = None,
                    progress: bool = True, step_kind: str = "timestep", step_arg: Optional[Any] = None,
                    holdout_rule: str = "bin", shard: Optional[Tuple[int, int]] = None,
                    **pipe_kwargs: Any) -> CalibrationRecorder:
    """Runs a diffusers pipeline and records its denoiser (``pipe.transformer``, ``pipe.unet`` or ``pipe.model``).

    ``prompts_or_kwargs`` is a prompt, a list of prompts (each run as ``pipe(prompt=p, ...)``), a
    dict of pipeline arguments or a list of such dicts; ``pipe_kwargs`` are added to every run.
    ``step_range`` defaults to ``(0, pipe.scheduler.config.num_train_timesteps)``; ``total_calls`` is
    ``num_inference_steps * calls_per_step * number of runs`` (``calls_per_step``: denoiser calls per
    step -- 1 for most pipelines, whose classifier-free guidance doubles the batch instead).
    ``timestep_scale`` multiplies the timestep the denoiser receives (default: 1000 for Flux
    transformers, which are passed ``t / 1000``; else 1). ``hessian_bins``, ``holdout_hessians``,
    ``share_inputs``, ``fit_input_samples``, ``hessian_block``: as for :class:`CalibrationRecorder`.
    ``step_kind="mask_ratio"`` records a diffusion LM (Dream, LLaDA) whose sampling loop is
    ``pipe(...)``: ``step_arg`` (as ``attach_timestep``'s ``arg``: a keyword, a position, or a
    function of the denoiser's ``(args, kwargs)``) gives each call's mask ratio, and ``step_range``
    defaults to ``(0, 1)``.

    ``max_memory`` (bytes) bounds the Hessians held at once, for models whose statistics do not fit
    in memory together. The pipeline runs once, recording the first layers whose Hessians fit and
    keeping a copy of the denoiser's arguments of every recorded call; the other layers are
    recorded in later passes, each replaying those calls through the denoiser -- the pipeline is
    not run again -- up to the last layer of the pass (the rest of the forward is skipped), for as
    many layers as fit. Each pass's rows are written to ``output_path`` (required) as it ends, so
    neither memory nor the passes depend on the model's depth; the returned recorder holds no
    statistics. ``progress_callback(message, fraction)`` is called after every call of every pass;
    ``progress`` shows a progress bar of the replay passes (pass, layers, calls, ETA) beside the
    pipeline's own bar of the first.

    ``shard=(first_run, total_runs)``: ``prompts_or_kwargs`` are runs ``first_run ..`` of a recording
    of ``total_runs`` runs split between workers; this one records its share as a shard
    (``holdout_rule="sample"``, calls numbered in the whole recording), and
    :func:`merge_calibration` combines the shards into the file one recorder would have written
    (``arrow_quant_v2.cluster.record_on_ray`` does it all on a Ray cluster). ``holdout_rule``: as
    for :class:`CalibrationRecorder` (``"sample"`` gives an unsharded recording the shards' rules).

    The recorder is returned closed (hooks removed), ready for ``save``; with ``output_path`` it is
    also saved there.
    """
    if max_memory is not None and (not _is_int(max_memory) or max_memory < 1):
        raise ConfigurationError(f"max_memory must be None or a number of bytes >= 1; got {max_memory!r}")
    if max_memory is not None and output_path is None:
        raise ConfigurationError("record_pipeline: max_memory writes the statistics pass by pass and needs "
                                 "output_path")
    denoiser, runs, options, timestep_scale = _recording_setup(
        pipe, prompts_or_kwargs, num_inference_steps, calls_per_step, step_kind, step_range, timestep_scale,
        dict(max_samples=max_samples, num_bins=num_bins, holdout_every=holdout_every,
             max_hessian_features=max_hessian_features, input_samples=input_samples, device=device,
             hessian_bins=hessian_bins, holdout_hessians=holdout_hessians, share_inputs=share_inputs,
             fit_input_samples=fit_input_samples, hessian_block=hessian_block, holdout_rule=holdout_rule))
    expected_calls = options["total_calls"]
    if shard is not None:
        if (not isinstance(shard, (tuple, list)) or len(shard) != 2 or not all(_is_int(v) for v in shard)
                or not 0 <= shard[0] < shard[1] or shard[0] + len(runs) > shard[1]):
            raise ConfigurationError(f"record_pipeline: shard must be (first_run, total_runs) with the given "
                                     f"{len(runs)} runs inside 0..total_runs; got {shard!r}")
        per_run = num_inference_steps * calls_per_step
        options.update(total_calls=per_run * shard[1], call_offset=per_run * shard[0], holdout_rule="sample",
                       shard=True)
    rec = CalibrationRecorder(denoiser, **options)
    report = _reporter(progress_callback)
    first = None
    if max_memory is not None:
        sizes = {layer.name: rec.layer_hessian_bytes(layer.name) for layer in rec._layers}
        first = _partition([layer.name for layer in rec._layers], sizes, max_memory)[0]
    captured = _pipeline_pass(pipe, rec, denoiser, runs, num_inference_steps, pipe_kwargs, step_arg, timestep_scale,
                              capture=max_memory is not None, accumulate_only=first, report=report,
                              share=1.0 if max_memory is None else 0.5, expected_calls=expected_calls)
    if max_memory is None:
        if output_path is not None:
            rec.save(output_path)
        return rec
    _record_remaining_passes(rec, denoiser, captured, options, max_memory, output_path, report, progress)
    return rec


def _reporter(progress_callback: Optional[Any]) -> Any:
    def report(message: str, fraction: float) -> None:
        if progress_callback is not None:
            progress_callback(message, min(1.0, max(0.0, fraction)))
    return report


def _recording_setup(pipe: Any, prompts_or_kwargs: Any, num_inference_steps: int, calls_per_step: int,
                     step_kind: str, step_range: Optional[Tuple[float, float]], timestep_scale: Optional[float],
                     recorder_options: Dict[str, Any]) -> Tuple["nn.Module", List[Any], Dict[str, Any], float]:
    """record_pipeline's arguments checked: the denoiser, the runs, the recorder's options and the
    timestep scale."""
    denoiser, component = _find_denoiser(pipe)
    if not _is_int(num_inference_steps) or num_inference_steps < 1:
        raise ConfigurationError(f"num_inference_steps must be an integer >= 1; got {num_inference_steps!r}")
    if not _is_int(calls_per_step) or calls_per_step < 1:
        raise ConfigurationError(f"calls_per_step must be an integer >= 1; got {calls_per_step!r}")
    if step_kind not in STEP_KINDS:
        raise ConfigurationError(f"step_kind must be one of {', '.join(map(repr, STEP_KINDS))}; got {step_kind!r}")
    if step_range is None and step_kind == "mask_ratio":
        step_range = DEFAULT_STEP_RANGES[step_kind]
    if step_range is None:
        config = getattr(getattr(pipe, "scheduler", None), "config", None)
        if isinstance(config, Mapping):
            n = config.get("num_train_timesteps")
        else:
            n = getattr(config, "num_train_timesteps", None)
        if not _is_int(n) or n < 1:
            raise ConfigurationError(f"record_pipeline: pipe.scheduler.config.num_train_timesteps is {n!r}; "
                                     f"pass step_range=(lo, hi)")
        step_range = (0.0, float(n))
    if timestep_scale is None:
        timestep_scale = 1000.0 if type(denoiser).__name__.startswith("Flux") else 1.0

    if isinstance(prompts_or_kwargs, (str, Mapping)):
        runs = [prompts_or_kwargs]
    else:
        runs = list(prompts_or_kwargs)
    if not runs:
        raise ConfigurationError("record_pipeline: prompts_or_kwargs is empty")
    for r in runs:
        if not isinstance(r, (str, Mapping)):
            raise ConfigurationError(f"record_pipeline: each run must be a prompt or a dict of pipeline arguments; "
                                     f"got {r!r}")
    options = dict(recorder_options, step_range=step_range, component=component, step_kind=step_kind,
                   total_calls=num_inference_steps * calls_per_step * len(runs))
    return denoiser, runs, options, float(timestep_scale)


def _pipeline_pass(pipe: Any, rec: CalibrationRecorder, denoiser: "nn.Module", runs: List[Any],
                   num_inference_steps: int, pipe_kwargs: Mapping[str, Any], step_arg: Optional[Any],
                   timestep_scale: float, capture: bool, accumulate_only: Optional[Sequence[str]], report: Any,
                   share: float, expected_calls: Optional[int] = None) -> List[Tuple[_Call, Any, Any]]:
    """Runs the pipeline once over ``runs`` with ``rec`` attached to the denoiser (accumulating
    ``accumulate_only``, default every layer) and closes it; with ``capture``, returns a copy of the
    denoiser's arguments of every recorded call, for replays. ``share``: the fraction of the
    recording's progress this pass stands for."""
    captured: List[Tuple[_Call, Any, Any]] = []
    total_calls = rec.total_calls if expected_calls is None else expected_calls  # this recorder's calls
    try:
        rec.attach_timestep(denoiser, arg=step_arg, scale=timestep_scale)
        if accumulate_only is not None:
            rec._accumulate_only = frozenset(accumulate_only)
        if capture:
            def capture_call(mod: nn.Module, args: tuple, kwargs: dict) -> None:
                call = rec._active
                if call is not None and call.record:
                    stripped = _Call(call.index, True, call.step, call.bin, call.split, call.sample)
                    captured.append((stripped, _clone_tree(args), _clone_tree(kwargs)))

            # after attach_timestep's hook (prepended), which starts the call
            rec._handles.append(denoiser.register_forward_pre_hook(capture_call, with_kwargs=True))

        def count(mod: nn.Module, args: tuple, output: Any) -> None:
            if capture:
                _release_memory()
            report(f"recording: denoiser call {rec.calls}/{total_calls}", rec.calls / total_calls * share)

        rec._handles.append(denoiser.register_forward_hook(count))
        started = time.perf_counter()
        with torch.no_grad():
            for r in runs:
                kwargs = dict(pipe_kwargs)
                kwargs.update({"prompt": r} if isinstance(r, str) else dict(r))
                kwargs["num_inference_steps"] = num_inference_steps
                pipe(**kwargs)
    finally:
        rec.close()
    rec.passes.append({"layers": len(rec._accumulate_only) if rec._accumulate_only is not None else len(rec._layers),
                       "calls": rec.calls, "seconds": time.perf_counter() - started, "hook_seconds": rec.hook_seconds})
    if rec.calls != total_calls:
        warnings.warn(f"record_pipeline: the denoiser was called {rec.calls} times, not the expected "
                      f"{total_calls} (num_inference_steps * calls_per_step * runs); pass calls_per_step so "
                      f"the samples spread over the whole loop", UserWarning, stacklevel=3)
    return captured


def _record_remaining_passes(rec: CalibrationRecorder, denoiser: "nn.Module", captured: List[Tuple[_Call, Any, Any]],
                             options: Dict[str, Any], max_memory: int, output_path: PathLike, report: Any,
                             show_progress: bool) -> None:
    """The passes of record_pipeline(max_memory=...) after the pipeline's own: the first pass's rows
    are written, then each later pass replays the captured calls for its layers and writes theirs."""
    aliases: Dict[str, List[str]] = {}
    for name, owner in rec._owner.items():
        if name != owner:
            aliases.setdefault(owner, []).append(name)
    model_order = {layer.name: layer.order for layer in rec._layers}

    def with_aliases(names: Sequence[str]) -> List[str]:
        out = set(names)
        for n in names:
            out.update(aliases.get(n, ()))
        return sorted(out, key=model_order.__getitem__)

    done = set(rec._accumulate_only or ())
    # the layers left: those that keep their own statistics and ran, in the order they ran
    left = [n for n in sorted(rec._run_order, key=rec._run_order.__getitem__)
            if n not in done and rec._owner.get(n, n) == n]
    sizes = {n: rec.layer_hessian_bytes(n) for n in left}
    passes = _partition(left, sizes, max_memory) if left else []
    run_order = sorted(rec._run_order, key=rec._run_order.__getitem__)
    bar = None
    if show_progress and passes:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(passes) * len(captured), desc="calibration passes", unit="call")
    rec._free_written = True
    with contextlib.ExitStack() as stack, _CalibrationWriter(output_path, rec.metadata(), shard=rec.shard) as writer:
        if bar is not None:
            stack.callback(bar.close)
        for row in rec._rows(with_aliases([n for n in done if n in rec._run_order])):
            writer.write(row)
        rec._stats.clear()
        rec._hessians.clear()
        _release_memory(collect=True)
        for p, names in enumerate(passes):
            started, hooks_before = time.perf_counter(), rec.hook_seconds
            replay = CalibrationRecorder(denoiser, **options)
            replay._free_written = True
            try:
                replay._owner = dict(rec._owner)
                replay._accumulate_only = frozenset(names)
                last = max(rec._run_order[n] for n in names)
                # Stop each forward at the next layer once every layer of the pass ran in this
                # call; never when some layer runs more than once per call (shared modules).
                once = all(v <= 1 for v in rec._max_runs.values())
                stop_at = run_order[last + 1] if once and last + 1 < len(run_order) else None

                def on_call(i: int) -> None:
                    if bar is not None:
                        bar.set_description(f"calibration pass {p + 2}/{len(passes) + 1} ({len(names)} layers)")
                        bar.update(1)
                    report(f"recording: pass {p + 2}/{len(passes) + 1} ({len(names)} layers), call "
                           f"{i + 1}/{len(captured)}",
                           0.5 + 0.5 * (p + (i + 1) / max(1, len(captured))) / len(passes))

                _replay(replay, denoiser, captured, stop_at, names, on_call)
            finally:
                replay.close()
                rec.hook_seconds += replay.hook_seconds
            for row in replay._rows(with_aliases(names)):
                writer.write(row)
            del replay
            _release_memory(collect=True)
            rec.passes.append({"layers": len(names), "calls": len(captured),
                               "seconds": time.perf_counter() - started,
                               "hook_seconds": rec.hook_seconds - hooks_before})
    rec._streamed_to = writer.path


def _replay(replay: CalibrationRecorder, denoiser: "nn.Module", captured: List[Tuple[_Call, Any, Any]],
            stop_at: Optional[str], needed: Sequence[str], on_call: Any) -> None:
    """Replays the captured denoiser calls into ``replay``. With ``stop_at`` (a layer), each forward
    ends as that layer is about to run, once every layer of ``needed`` ran in the call."""
    if stop_at is not None:
        need = frozenset(needed)

        def stop(mod: nn.Module, args: tuple) -> None:
            call = replay._active
            if call is not None and need.issubset(call.runs):
                raise _StopReplay()

        replay._handles.append(replay._by_name[stop_at].module.register_forward_pre_hook(stop))
    with torch.no_grad():
        for i, (call, args, kwargs) in enumerate(captured):
            replay._active = _Call(call.index, True, call.step, call.bin, call.split, call.sample)
            try:
                denoiser(*args, **kwargs)
            except _StopReplay:
                pass
            finally:
                replay._active = None
            _release_memory()
            on_call(i)


def calibrate_and_quantize(pipe: Any, prompts_or_kwargs: Any, output_path: PathLike, config: Any = None, *,
                           num_inference_steps: int, max_samples: Optional[int] = None,
                           max_memory: int = 1 << 30, calibration_path: Optional[PathLike] = None,
                           source_dir: Optional[PathLike] = None, progress: bool = True,
                           progress_callback: Optional[Any] = None, sequential: bool = False,
                           keep_dequantized: bool = False, cluster: Optional[str] = None,
                           **record_kwargs: Any) -> Dict[str, Any]:
    """Records ``pipe``'s denoiser along its own sampling runs and quantizes it with that calibration,
    in one call and in bounded memory. Returns :meth:`ArrowQuantV2.quantize_diffusion_model`'s
    result, with ``result["calibration_recording"]`` (seconds, the recorder's own seconds, passes,
    the file).

    ``pipe`` is a diffusers pipeline (or any object whose ``transformer`` / ``unet`` / ``model`` is the
    denoiser and whose call runs the sampling loop: wrap a bare torch denoiser that way), run with
    each of ``prompts_or_kwargs`` as in :func:`record_pipeline`, which records it with the
    large-model settings: one Hessian per layer over the trajectory (``hessian_bins=1``), held-out
    checks on sampled inputs (``holdout_hessians=False``), passes holding at most ``max_memory``
    bytes of Hessians; ``record_kwargs`` override them (``num_bins``, ``holdout_every``,
    ``input_samples``, ...). The calibration is written to ``calibration_path`` (default
    ``<output_path>.calibration.parquet``, kept for later runs). The denoiser quantized is the one
    in memory, saved with ``save_pretrained`` into a temporary directory beside the output (removed
    afterwards), unless ``source_dir`` names its checkpoint directory to quantize instead (only
    when the weights in memory are those of that checkpoint). ``config`` is a
    :class:`DiffusionQuantConfig` (default: its defaults); ``progress`` shows progress bars for the
    recording, ``progress_callback(message, fraction)`` is told of both stages.

    ``sequential=True`` records and quantizes block by block, as GPTQ's sequential use does: each
    block's layers are recorded with every earlier block already holding its quantized weights,
    so they are calibrated on the inputs the quantized model gives them. The blocks are the items
    of the denoiser's outermost module lists (``transformer_blocks``, ``layers``,
    ``down_blocks``...), in the order they run; the layers outside them form blocks of their own
    between them (the embedders before the first, the output layers after the last). The pipeline
    runs once, recording activation ranges only (they fix the timestep groups, ``time_groups``
    in the config, for every block and the output alike) and a copy of the denoiser's arguments of
    every recorded call; then, per block, those calls are replayed up to the next block (to the end
    when a layer of the block runs more than once per call), its layers are quantized from their
    statistics with the engine -- exactly as in the final run, whose stored weights the next
    blocks see -- and their weights replaced by the dequantized ones. Tensors that are not layers
    the recording saw (embedding tables) are quantized first, data-free. The calibration file
    gathers every block's rows; the output is quantized from it in one run at the end. Cost: one
    replay per block, each up to that block (about half the model's forwards per block on
    average), and each layer quantized twice (its block's run and the final one). Not with a
    model-wide budget (``target_bits_per_weight`` of ggml schemes), which would need every layer
    first. The denoiser's weights are restored from the checkpoint afterwards, unless
    ``keep_dequantized`` leaves it holding the output's dequantized weights (to run the quantized
    pipeline in torch). Needs the ``safetensors`` package.

    ``cluster`` (``"ray"`` or a Ray address): the quantizations -- each block's in the sequential
    mode, and the final one -- run their tensors as tasks on the cluster
    (``quantize_diffusion_model(cluster=...)``); the recording stays here (to record on several
    workers, see ``arrow_quant_v2.cluster.record_on_ray``).
    """
    import shutil

    from .api import ArrowQuantV2
    from .config import DiffusionQuantConfig

    denoiser, _ = _find_denoiser(pipe)
    output_path = os.fspath(output_path)
    parent = os.path.dirname(os.path.abspath(output_path))
    if not os.path.isdir(parent):
        raise ModelNotFoundError(f"calibrate_and_quantize: the output's directory {parent!r} does not exist")
    if calibration_path is None:
        calibration_path = output_path.rstrip(os.sep) + ".calibration.parquet"
    config = DiffusionQuantConfig() if config is None else copy.copy(config)  # the caller's stays as it is
    runs = [prompts_or_kwargs] if isinstance(prompts_or_kwargs, (str, Mapping)) else list(prompts_or_kwargs)
    options: Dict[str, Any] = dict(hessian_bins=1, holdout_hessians=False, max_memory=max_memory)
    options["max_samples"] = max_samples if max_samples is not None else num_inference_steps * max(1, len(runs))
    options.update(record_kwargs)

    def stage(name: str, lo: float, hi: float) -> Optional[Any]:
        if progress_callback is None:
            return None
        return lambda message, f: progress_callback(f"{name}: {message}", lo + (hi - lo) * f)

    for what, v in (("sequential", sequential), ("keep_dequantized", keep_dequantized)):
        if not isinstance(v, bool):
            raise ConfigurationError(f"calibrate_and_quantize: {what} must be True or False; got {v!r}")
    if keep_dequantized and not sequential:
        raise ConfigurationError("calibrate_and_quantize: keep_dequantized applies to sequential=True")
    if sequential:
        from .cluster import RaySession, ray_available, resolve_cluster

        address = resolve_cluster(cluster)
        # one Ray session for every block's run (each would otherwise start and stop its own)
        with (RaySession(address) if address is not None and ray_available() else contextlib.nullcontext()):
            return _sequential_quantize(pipe, denoiser, runs, num_inference_steps, output_path, parent, config,
                                        os.fspath(calibration_path), source_dir, options, progress,
                                        progress_callback, keep_dequantized, cluster)
    started = time.perf_counter()
    rec = record_pipeline(pipe, runs, num_inference_steps, output_path=calibration_path, progress=progress,
                          progress_callback=stage("calibration", 0.0, 0.5), **options)
    recording = {"seconds": time.perf_counter() - started, "hook_seconds": rec.hook_seconds, "passes": rec.passes,
                 "path": os.fspath(calibration_path), "layers": len(rec.layers),
                 "shared_inputs": len(rec.shared_inputs)}
    rec._stats.clear()  # written; not held while quantizing (max_memory=None keeps them otherwise)
    rec._hessians.clear()
    del rec
    _release_memory(collect=True)
    tmp = None
    try:
        if source_dir is None:
            tmp = tempfile.mkdtemp(prefix=".aq-denoiser-", dir=parent)
            source_dir = _save_denoiser(denoiser, tmp)
        config.calibration_path = os.fspath(calibration_path)
        quant_cb = stage("quantization", 0.5, 1.0)
        result = ArrowQuantV2().quantize_diffusion_model(source_dir, output_path, config, progress_callback=quant_cb,
                                                         cluster=cluster)
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    result["calibration_recording"] = recording
    return result


def _save_denoiser(denoiser: "nn.Module", path: str) -> str:
    """``denoiser.save_pretrained(path)`` (the checkpoint calibrate_and_quantize quantizes); returns path."""
    if not hasattr(denoiser, "save_pretrained"):
        raise ConfigurationError(f"calibrate_and_quantize: {type(denoiser).__name__} has no save_pretrained; "
                                 f"pass source_dir= (its checkpoint directory)")
    denoiser.save_pretrained(path)
    return path


def _sequential_units(model: "nn.Module", names: Sequence[str]) -> Dict[str, Optional[str]]:
    """Each layer's block: the item of an outermost ``nn.ModuleList`` of two or more modules that
    holds it (``"transformer_blocks.3"``), or None outside every such list."""
    lists = [n for n, m in model.named_modules() if isinstance(m, nn.ModuleList) and len(m) >= 2]

    def inside(path: str, outer: str) -> bool:
        return outer == "" or path.startswith(outer + ".")

    outermost = [n for n in lists if not any(o != n and inside(n, o) for o in lists)]
    units: Dict[str, Optional[str]] = {}
    for name in names:
        path = name[:-len(".weight")] if name.endswith(".weight") else ""
        units[name] = None
        for o in outermost:
            if path and inside(path, o):
                rest = path[len(o) + 1:] if o else path
                units[name] = (o + "." if o else "") + rest.split(".")[0]
                break
    return units


def _sequential_segments(order: Sequence[str], units: Mapping[str, Optional[str]]) -> List[List[str]]:
    """The layers, in the order they first ran, cut wherever the block changes."""
    segments: List[List[str]] = []
    current: Any = object()
    for n in order:
        if not segments or units[n] != current:
            segments.append([])
            current = units[n]
        segments[-1].append(n)
    return segments


def _safetensors_index(source: str, shapes: Optional[Dict[str, Tuple[int, ...]]] = None) -> Dict[str, str]:
    """tensor name -> the .safetensors file of ``source`` (a file, or a directory's files) holding it;
    each tensor's shape into ``shapes`` when given (one read of each file's header)."""
    from safetensors import safe_open

    files = [source] if os.path.isfile(source) else sorted(
        os.path.join(source, f) for f in os.listdir(source) if f.endswith(".safetensors"))
    if not files:
        raise ModelNotFoundError(f"calibrate_and_quantize(sequential=True): {source!r} holds no .safetensors file")
    index: Dict[str, str] = {}
    for f in files:
        with safe_open(f, "pt") as h:
            for k in h.keys():
                index[k] = f
                if shapes is not None:
                    shapes[k] = tuple(h.get_slice(k).get_shape())
    return index


def _read_tensors(index: Mapping[str, str], names: Sequence[str]) -> Dict[str, "torch.Tensor"]:
    from safetensors import safe_open

    out: Dict[str, torch.Tensor] = {}
    by_file: Dict[str, List[str]] = {}
    for n in names:
        by_file.setdefault(index[n], []).append(n)
    for f, ns in by_file.items():
        with safe_open(f, "pt") as h:
            for n in ns:
                out[n] = h.get_tensor(n)
    return out


def _sequential_quantize(pipe: Any, denoiser: "nn.Module", runs: List[Any], num_inference_steps: int,
                         output_path: str, parent: str, config: Any, calibration_path: str,
                         source_dir: Optional[PathLike], options: Dict[str, Any], progress: bool,
                         progress_callback: Optional[Any], keep_dequantized: bool,
                         cluster: Optional[str] = None) -> Dict[str, Any]:
    """calibrate_and_quantize(sequential=True): see its documentation."""
    import inspect
    import shutil

    from . import _core
    from .api import ArrowQuantV2
    from .config import GGML_TYPES
    from .loader import load

    try:
        from safetensors import safe_open
        from safetensors.torch import save_file
    except ImportError as e:  # pragma: no cover - safetensors comes with diffusers and transformers
        raise ImportError("calibrate_and_quantize(sequential=True) needs the safetensors package "
                          "(pip install safetensors)") from e
    if config.scheme in GGML_TYPES and config.target_bits_per_weight is not None:
        raise ConfigurationError("calibrate_and_quantize(sequential=True) does not take a model-wide budget "
                                 f"(target_bits_per_weight={config.target_bits_per_weight} with scheme "
                                 f"{config.scheme!r}): the budget needs every layer's statistics before the first "
                                 "is quantized; give the bits per layer (bit_width, bit_overrides) instead")
    # record_pipeline's keywords: the recorder's options, the call's settings, the pipeline's own
    known = {k: v.default for k, v in inspect.signature(record_pipeline).parameters.items()
             if v.default is not inspect.Parameter.empty}
    settings = dict(known)
    pipe_kwargs: Dict[str, Any] = {}
    for k, v in options.items():
        (settings if k in known else pipe_kwargs)[k] = v
    max_memory = settings["max_memory"]
    if max_memory is not None and (not _is_int(max_memory) or max_memory < 1):
        raise ConfigurationError(f"max_memory must be None or a number of bytes >= 1; got {max_memory!r}")
    recorder_keys = ("max_samples", "num_bins", "holdout_every", "max_hessian_features", "input_samples", "device",
                     "hessian_bins", "holdout_hessians", "share_inputs", "fit_input_samples", "hessian_block")
    _, runs, rec_options, timestep_scale = _recording_setup(
        pipe, runs, num_inference_steps, settings["calls_per_step"], settings["step_kind"], settings["step_range"],
        settings["timestep_scale"], {k: settings[k] for k in recorder_keys})
    report = _reporter(None if progress_callback is None else
                       (lambda m, f: progress_callback(f"calibration: {m}", f)))
    started = time.perf_counter()
    work = tempfile.mkdtemp(prefix=".aq-sequential-", dir=parent)
    modified: List[str] = []  # tensors whose weights in memory were replaced
    index: Dict[str, str] = {}
    succeeded = False
    bar = None
    try:
        if source_dir is None:
            source_dir = os.path.join(work, "denoiser")
            os.makedirs(source_dir)
            _save_denoiser(denoiser, source_dir)
        source_dir = os.fspath(source_dir)
        file_shapes: Dict[str, Tuple[int, ...]] = {}
        index = _safetensors_index(source_dir, file_shapes)

        # 1. The pipeline once: activation ranges of every layer (they fix the timestep groups) and
        #    the denoiser's arguments of every recorded call.
        rec = CalibrationRecorder(denoiser, **rec_options)
        rec._stats_only = True
        captured = _pipeline_pass(pipe, rec, denoiser, runs, num_inference_steps, pipe_kwargs, settings["step_arg"],
                                  timestep_scale, capture=True, accumulate_only=None, report=report, share=0.1)
        first_pass = dict(rec.passes[0])
        metadata = rec.metadata()
        stats_path = rec.save(os.path.join(work, "ranges.parquet"))
        groups = ([list(g) for g in config.time_groups] if config.time_groups is not None
                  else [list(g) for g in _core.time_groups(stats_path, config.num_time_groups)])
        order = sorted(rec._run_order, key=rec._run_order.__getitem__)
        owner_of = dict(rec._owner)
        max_runs = dict(rec._max_runs)
        layer_bytes = {n: rec.layer_hessian_bytes(n) for n in order}
        layer_params = {layer.name: layer.module.weight for layer in rec._layers}
        del rec
        _release_memory(collect=True)

        units = _sequential_units(denoiser, order)
        segments = _sequential_segments(order, units)
        seg_of = {n: i for i, seg in enumerate(segments) for n in seg}
        seg_owner = {n: owner_of.get(n, n) if seg_of.get(owner_of.get(n, n)) == seg_of[n] else n for n in order}
        model_order = {name: i for i, name in enumerate(layer_params)}
        # the tensors the recording did not see (embedding tables, layers that never ran): first, data-free
        seen = set(order)
        params = dict(denoiser.named_parameters())
        pre = [n for n, p in params.items() if n in index and n not in seen and p.dim() >= 2 and p.is_floating_point()]
        for n in list(order) + pre:
            if n in index:
                p = layer_params.get(n, params.get(n))
                shape = file_shapes[n]
                if shape != tuple(p.shape):
                    raise ConfigurationError(
                        f"calibrate_and_quantize(sequential=True): tensor {n!r} is {shape} in {index[n]} but "
                        f"{tuple(p.shape)} in the denoiser; source_dir must hold the denoiser's own weights")
        model_modality = config.modality or json.loads(_core.describe_model(source_dir, []))["modality"]
        part_config = config.replace(time_groups=groups, modality=model_modality, overwrite=True, components=None,
                                     calibration_path=None)
        part_seconds = 0.0

        def quantize_part(names: Sequence[str], calibration: Optional[str], tag: str) -> None:
            """Quantizes ``names`` (from the source's bytes) as the final run will, and puts their
            dequantized weights into the denoiser."""
            nonlocal part_seconds
            names = [n for n in names if n in index]
            if not names:
                return
            t0 = time.perf_counter()
            src, out = os.path.join(work, f"{tag}-src"), os.path.join(work, f"{tag}-out")
            os.makedirs(src)
            save_file(_read_tensors(index, names), os.path.join(src, "model.safetensors"))
            cfg = part_config if calibration is None else part_config.replace(calibration_path=calibration)
            ArrowQuantV2().quantize_diffusion_model(src, out, cfg, cluster=cluster)
            quantized = load(out)
            with torch.no_grad():
                for n in names:
                    p = layer_params.get(n, params.get(n))
                    p.copy_(torch.from_numpy(quantized[n].numpy()).reshape(p.shape).to(p.dtype))
                    modified.append(n)
            del quantized
            shutil.rmtree(src, ignore_errors=True)
            shutil.rmtree(out, ignore_errors=True)
            part_seconds += time.perf_counter() - t0

        quantize_part(pre, None, "pre")
        if progress and segments:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(segments) * len(captured), desc="sequential calibration", unit="call")
        blocks: List[Dict[str, Any]] = []
        hook_seconds = first_pass["hook_seconds"]
        with _CalibrationWriter(calibration_path, metadata) as final_writer:
            for i, seg in enumerate(segments):
                t0, replay_seconds = time.perf_counter(), 0.0
                owners = [n for n in seg if seg_owner[n] == n]
                passes = _partition(owners, layer_bytes, max_memory) if max_memory is not None else [owners]
                # replays end at the next block, unless a layer of this block runs again later in the call
                stop_at = (segments[i + 1][0] if i + 1 < len(segments) and all(max_runs.get(n, 1) <= 1 for n in seg)
                           else None)
                part_path = os.path.join(work, f"block-{i}.parquet")
                with _CalibrationWriter(part_path, metadata) as part_writer:
                    for names in passes:
                        replay = CalibrationRecorder(denoiser, **rec_options)
                        replay._free_written = True
                        try:
                            replay._owner = {n: seg_owner[n] for n in seg}
                            replay._accumulate_only = frozenset(names)

                            def on_call(c: int) -> None:
                                if bar is not None:
                                    bar.set_description(f"sequential: block {i + 1}/{len(segments)} "
                                                        f"({units[seg[0]] or 'outside the blocks'})")
                                    bar.update(1 if len(passes) == 1 else 0)
                                report(f"sequential: block {i + 1}/{len(segments)}, call {c + 1}/{len(captured)}",
                                       0.1 + 0.6 * (i + (c + 1) / max(1, len(captured))) / len(segments))

                            r0 = time.perf_counter()
                            _replay(replay, denoiser, captured, stop_at, names, on_call)
                            replay_seconds += time.perf_counter() - r0
                        finally:
                            replay.close()
                        hook_seconds += replay.hook_seconds
                        rows = sorted((n for n in seg if seg_owner[n] in names), key=model_order.__getitem__)
                        for row in replay._rows(rows):
                            part_writer.write(row)
                            final_writer.write(row)
                        del replay
                        _release_memory(collect=True)
                if bar is not None and len(passes) != 1:
                    bar.update(len(captured))
                q0 = part_seconds
                quantize_part(seg, part_writer.path, f"block-{i}")
                os.remove(part_writer.path)
                blocks.append({"block": units[seg[0]], "layers": len(seg), "passes": len(passes),
                               "replay_seconds": replay_seconds, "quantize_seconds": part_seconds - q0,
                               "seconds": time.perf_counter() - t0})
        if bar is not None:
            bar.close()
            bar = None
        recording = {"seconds": time.perf_counter() - started, "hook_seconds": hook_seconds,
                     "passes": [first_pass] + [{"layers": b["layers"], "calls": len(captured),
                                                "seconds": b["replay_seconds"]} for b in blocks],
                     "path": calibration_path, "layers": len(order),
                     "shared_inputs": sum(1 for n in order if seg_owner[n] != n),
                     "sequential": {"blocks": blocks, "time_groups": groups, "data_free_first": len(pre),
                                    "first_pass_seconds": first_pass["seconds"],
                                    "replay_seconds": sum(b["replay_seconds"] for b in blocks),
                                    "block_quantize_seconds": part_seconds}}
        del captured
        _release_memory(collect=True)
        final = config.replace(time_groups=groups, calibration_path=calibration_path)
        cb = None if progress_callback is None else (lambda m, f: progress_callback(f"quantization: {m}",
                                                                                      0.7 + 0.3 * f))
        result = ArrowQuantV2().quantize_diffusion_model(source_dir, output_path, final, progress_callback=cb,
                                                         cluster=cluster)
        result["calibration_recording"] = recording
        succeeded = True
        return result
    finally:
        if bar is not None:
            bar.close()
        if modified and not (succeeded and keep_dequantized):
            originals = _read_tensors(index, modified)
            with torch.no_grad():
                for n, t in originals.items():
                    p = layer_params.get(n, params.get(n))
                    p.copy_(t.reshape(p.shape).to(p.dtype))
        shutil.rmtree(work, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def _open_calibration_parquet(path: str, what: str) -> Tuple[Any, Dict[str, str]]:
    """The Parquet file at ``path`` and its schema's key-value metadata, or the error naming it
    (``what``: how the message calls it)."""
    if not os.path.exists(path):
        raise ModelNotFoundError(f"{what} {path!r} does not exist")
    try:
        pf = pq.ParquetFile(path)
    except (pa.ArrowInvalid, OSError) as e:
        raise ModelFormatError(f"{path!r} is not a Parquet file: {e}") from e
    return pf, {k.decode(): v.decode() for k, v in (pf.schema_arrow.metadata or {}).items()}


def merge_calibration(shards: Sequence[PathLike], output_path: PathLike) -> str:
    """Combines the shard files of one recording -- each written by a recorder with ``shard=True``
    that saw a share of the calls (``call_offset``), e.g. one per worker of a cluster -- into the
    ``calibration.parquet`` one recorder seeing every call would have written: counts, step sums,
    histograms and Hessians summed (Hessians in float64, then stored as float32 as always), column
    ranges maxed / minned, the input samples those of the smallest keys over all shards. Equal to
    the single recorder's file but for floating-point summation order in ``step_sum`` and the
    Hessians (each a float64 sum in another order, rounded to float32 at the end). The shards must
    come from the same recording setup (model, bins, samples, ...) and cover disjoint calls. Returns
    the output path (written atomically)."""
    paths = [os.fspath(p) for p in shards]
    if not paths:
        raise ConfigurationError("merge_calibration: no shard files given")
    files, infos, metas = [], [], []
    for p in paths:
        pf, meta = _open_calibration_parquet(p, "calibration shard")
        if SHARD_KEY not in meta:
            raise ModelFormatError(f"{p!r} is not a calibration shard (record with CalibrationRecorder(shard=True) "
                                   f"or record_pipeline(shard=...))")
        try:
            info = json.loads(meta[SHARD_KEY])
        except json.JSONDecodeError as e:
            raise ModelFormatError(f"{p!r}: {SHARD_KEY} is not JSON: {e}") from e
        files.append(pf)
        infos.append(info)
        metas.append(meta)
    same_meta = [k for k in metas[0] if k not in (SHARD_KEY, "arrowquant.samples", "arrowquant.producer")]
    same_info = ("total_calls", "max_samples", "holdout_every", "input_samples", "fit_input_samples",
                 "hessian_span", "component", "layers")
    for p, meta, info in zip(paths[1:], metas[1:], infos[1:]):
        for k in same_meta:
            if meta.get(k) != metas[0][k]:
                raise ConfigurationError(f"merge_calibration: {p!r} has {k}={meta.get(k)!r} but {paths[0]!r} has "
                                         f"{metas[0][k]!r}: shards of one recording share its setup")
        for k in same_info:
            if info.get(k) != infos[0].get(k):
                raise ConfigurationError(f"merge_calibration: {p!r} has {k}={info.get(k)!r} but {paths[0]!r} has "
                                         f"{infos[0].get(k)!r}: shards of one recording share its setup")
    ranges = sorted((info["call_offset"], info["call_offset"] + info["calls"], p) for p, info in zip(paths, infos))
    for (a0, a1, pa_), (b0, b1, pb) in zip(ranges, ranges[1:]):
        if b0 < a1:
            raise ConfigurationError(f"merge_calibration: {pa_!r} (calls {a0}..{a1 - 1}) and {pb!r} (calls "
                                     f"{b0}..{b1 - 1}) overlap: each call must be recorded by one shard")
    owners: Dict[str, str] = {}
    for p, info in zip(paths, infos):
        for layer, owner in info.get("owners", {}).items():
            if owners.setdefault(layer, owner) != owner:
                raise ConfigurationError(f"merge_calibration: {p!r} records {layer!r} with {owner!r}'s statistics, "
                                         f"another shard with {owners[layer]!r}'s")
    span = int(infos[0]["hessian_span"])
    capacity = {"fit": int(infos[0]["fit_input_samples"]), "holdout": int(infos[0]["input_samples"])}
    light = [n for n, _, _ in SCHEMA_FIELDS if n not in ("hessian", "inputs")] + [n for n, _, _ in SHARD_FIELDS]
    # (layer, bin, split) -> [(file, row group, light row)]
    groups: Dict[Tuple[str, int, str], List[Tuple[int, int, Dict[str, Any]]]] = {}
    for f, pf in enumerate(files):
        table = pf.read(columns=light)
        for g, row in enumerate(table.to_pylist()):
            if pf.metadata.num_row_groups != table.num_rows:
                raise ModelFormatError(f"{paths[f]!r}: not one row per row group (not written by save)")
            groups.setdefault((row["layer"], row["bin"], row["split"]), []).append((f, g, row))

    def heavy(f: int, g: int, column: str) -> Optional[np.ndarray]:
        v = files[f].read_row_group(g, columns=[column]).column(0)[0].values
        return None if v is None else v.to_numpy(zero_copy_only=False)

    metadata = {k: v for k, v in metas[0].items() if k != SHARD_KEY}
    metadata["arrowquant.samples"] = str(sum(int(m.get("arrowquant.samples", "0")) for m in metas))
    from . import __version__
    metadata["arrowquant.producer"] = f"arrow_quant_v2 {__version__}"
    with _CalibrationWriter(output_path, metadata) as writer:
        for name in infos[0]["layers"]:
            keys = sorted((k for k in groups if k[0] == name), key=lambda k: (k[1], SPLITS.index(k[2])))
            holder: Dict[Tuple[int, str], int] = {}
            for _, b, split in keys:
                holder.setdefault((b // span, split), b)
            for key in keys:
                _, b, split = key
                parts = groups[key]
                first = parts[0][2]
                row = dict(first)
                for k in ("samples", "rows", "hist_zero"):
                    row[k] = sum(int(r[k] or 0) for _, _, r in parts)
                row["step_sum"] = math.fsum(r["step_sum"] for _, _, r in parts)
                for k, op in (("absmax", np.maximum), ("min", np.minimum), ("max", np.maximum)):
                    acc = np.asarray(first[k], np.float32)
                    for _, _, r in parts[1:]:
                        acc = op(acc, np.asarray(r[k], np.float32))
                    row[k] = acc
                for k in ("hist_pos", "hist_neg"):
                    row[k] = np.sum([np.asarray(r[k], np.int64) for _, _, r in parts], axis=0)
                # the span's Hessian: every shard's rows of this layer, span and split that hold one
                hessian, hessian_rows = None, None
                if holder[(b // span, split)] == b:
                    for (_, hb, hs) in keys:
                        if hb // span != b // span or hs != split:
                            continue
                        for f, g, r in groups[(name, hb, hs)]:
                            if r["hessian_rows"] is not None:
                                hessian_rows = (hessian_rows or 0) + int(r["hessian_rows"])
                            h = heavy(f, g, "hessian")
                            if h is not None:
                                hessian = h.astype(np.float64) if hessian is None else hessian + h
                if hessian is not None:
                    if not np.isfinite(hessian).all() or (np.abs(hessian) > np.finfo(np.float32).max).any():
                        raise QuantizationError(f"merge_calibration: the merged Hessian of layer {name!r} ({b}, "
                                                f"{split!r}) is not finite or beyond float32's range")
                    hessian = hessian.astype(np.float32)
                row["hessian"], row["hessian_rows"] = hessian, hessian_rows
                row["hessian_from"] = next((r["hessian_from"] for _, _, r in parts if r["hessian_from"]), None)
                # the input samples: the smallest keys over every shard, in the order of their keys
                rows_in, keys_in = [], []
                for f, g, r in parts:
                    x = heavy(f, g, "inputs")
                    k = r["input_keys"]
                    if x is not None and k:
                        rows_in.append(x.reshape(len(k), -1))
                        keys_in.append(np.asarray(k, np.uint64))
                if rows_in:
                    allk, allx = np.concatenate(keys_in), np.concatenate(rows_in)
                    order = np.argsort(allk, kind="stable")[:capacity[split]]
                    row["inputs"] = allx[order].reshape(-1)
                else:
                    row["inputs"] = None
                row.pop("input_keys", None)
                writer.write(row)
    return writer.path


class CalibrationData(dict):
    """``{(layer, bin, split): entry}`` read from calibration.parquet, plus ``metadata`` (the file's
    key-value metadata, decoded) and ``step_range`` / ``num_bins`` / ``step_kind``.

    Each entry is a dict of the row's columns; ``absmax``, ``min``, ``max`` are float32 arrays,
    ``hessian`` a float64 ``(in_features, in_features)`` array or None, ``hist_pos`` / ``hist_neg``
    int64 arrays of ``HIST_BINS`` (384) counts and ``hist_zero`` an int -- all three ``None`` when
    the file predates the histogram columns -- and ``mean_step`` is ``step_sum / samples``.
    """

    metadata: Dict[str, str]

    @property
    def step_kind(self) -> str:
        return self.metadata["arrowquant.step_kind"]

    @property
    def step_range(self) -> Tuple[float, float]:
        lo, hi = json.loads(self.metadata["arrowquant.step_range"])
        return float(lo), float(hi)

    @property
    def num_bins(self) -> int:
        return int(self.metadata["arrowquant.num_bins"])

    @property
    def layers(self) -> List[str]:
        seen: Dict[str, None] = {}
        for layer, _, _ in self:
            seen.setdefault(layer)
        return list(seen)


def load_calibration(path: PathLike, hessians: bool = True) -> CalibrationData:
    """Reads a calibration.parquet written by :meth:`CalibrationRecorder.save` (version 2, or 1). The
    histogram columns are optional: entries of a file without them have ``hist_pos``, ``hist_neg``,
    ``hist_zero`` ``None``.

    ``hessian`` is the float64 ``(in_features, in_features)`` matrix of the row that holds it (in
    version 2 the first row of its span of ``hessian_span`` bins; a layer with ``hessian_from``
    gets the very matrix of that layer's row); for a block-diagonal Hessian (``hessian_block`` not
    None) the list of its float64 diagonal blocks, of ``hessian_block`` columns each (the last one
    smaller). ``hessians=False`` skips reading them (every ``hessian`` is None), for big files."""
    path = os.fspath(path)
    pf, meta = _open_calibration_parquet(path, "calibration file")
    version = meta.get("arrowquant.calibration_version")
    if SHARD_KEY in meta:
        raise ModelFormatError(f"{path!r} is a shard of a recording (a share of its calls); merge the shards with "
                               f"merge_calibration")
    if version not in READABLE_VERSIONS:
        raise ModelFormatError(f"{path!r}: arrowquant.calibration_version is {version!r}; this reader reads "
                               f"versions {', '.join(READABLE_VERSIONS)}")
    names = pf.schema_arrow.names
    v2_only = ("hessian_span", "hessian_rows", "hessian_from")
    missing = [n for n, _, _ in SCHEMA_FIELDS
               if n not in names and n not in OPTIONAL_COLUMNS and (version == "2" or n not in v2_only)]
    if missing:
        raise ModelFormatError(f"{path!r}: missing columns {missing}")
    has_hist = any(n in names for n in HIST_COLUMNS)
    if has_hist:
        absent = [n for n in HIST_COLUMNS if n not in names]
        if absent:
            raise ModelFormatError(f"{path!r}: has histogram columns but not {absent}")
        layout = tuple(meta.get(f"arrowquant.hist_{k}") for k in ("bins_per_octave", "min_exp", "max_exp"))
        expected = (str(HIST_BINS_PER_OCTAVE), str(HIST_MIN_EXP), str(HIST_MAX_EXP))
        if layout != expected:
            raise ModelFormatError(f"{path!r}: histogram layout (arrowquant.hist_bins_per_octave, hist_min_exp, "
                                   f"hist_max_exp) is {layout}; this reader reads {expected}")
    out = CalibrationData()
    out.metadata = meta
    has_inputs = "inputs" in names
    scalars = [n for n, t, _ in SCHEMA_FIELDS if not pa.types.is_list(t) and (has_hist or n not in HIST_COLUMNS)
               and (version == "2" or n not in v2_only) and (n != "hessian_block" or n in names)]
    list_columns = (("absmax", "min", "max") + (("hessian",) if hessians else ())
                    + (("hist_pos", "hist_neg") if has_hist else ()) + (("inputs",) if has_inputs else ()))
    columns_read = [n for n in names if n != "hessian" or hessians]
    shared: List[Tuple[Tuple[str, int, str], str]] = []
    for g in range(pf.num_row_groups):
        table = pf.read_row_group(g, columns=columns_read)
        columns = {n: table.column(n).to_pylist() for n in scalars}
        lists = {n: table.column(n).combine_chunks() for n in list_columns}
        for i in range(table.num_rows):
            row: Dict[str, Any] = {n: columns[n][i] for n in scalars}
            key = (row["layer"], int(row["bin"]), row["split"])
            where = f"{path!r}: layer {key[0]!r} bin {key[1]} split {key[2]!r}"
            if key in out:
                raise ModelFormatError(f"{where}: more than one row")
            f = int(row["in_features"])
            for col in ("absmax", "min", "max"):
                values = lists[col][i].values
                row[col] = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32) if values is not None \
                    else np.zeros(0, np.float32)
                if row[col].shape != (f,):
                    raise ModelFormatError(f"{where}: {col} has {row[col].size} values, in_features is {f}")
            if version == "1":
                row.update(hessian_span=1, hessian_rows=row["rows"] if row["hessian_reason"] is None else None,
                           hessian_from=None)
            block = row.get("hessian_block")
            if block is not None and not 0 < block < f:
                block = None  # one block: the full matrix
            row["hessian_block"] = block
            h = lists["hessian"][i] if hessians else None
            row["hessian"] = None
            if h is not None and h.is_valid:
                hv = h.values.to_numpy(zero_copy_only=False)
                if version == "1":
                    if hv.size != f * f:
                        raise ModelFormatError(f"{where}: hessian has {hv.size} values, expected in_features^2 = "
                                               f"{f * f}")
                    row["hessian"] = np.asarray(hv, dtype=np.float64).reshape(f, f)
                elif block is None:
                    if hv.size != f * (f + 1) // 2:
                        raise ModelFormatError(f"{where}: hessian has {hv.size} values, expected the upper triangle "
                                               f"of in_features = {f}: {f * (f + 1) // 2}")
                    row["hessian"] = _unpack_upper(np.asarray(hv), f)
                else:
                    sizes = [min(block, f - b) for b in range(0, f, block)]
                    expected = sum(k * (k + 1) // 2 for k in sizes)
                    if hv.size != expected:
                        raise ModelFormatError(f"{where}: hessian has {hv.size} values, expected the upper triangles "
                                               f"of {len(sizes)} diagonal blocks of {block} of in_features = {f}: "
                                               f"{expected}")
                    hv = np.asarray(hv)
                    row["hessian"], at = [], 0
                    for k in sizes:
                        row["hessian"].append(_unpack_upper(hv[at:at + k * (k + 1) // 2], k))
                        at += k * (k + 1) // 2
            if row.get("hessian_from"):
                shared.append((key, row["hessian_from"]))
            for col in ("hist_pos", "hist_neg"):
                hist = lists[col][i] if has_hist else None
                if hist is None or not hist.is_valid:
                    row[col] = None
                    continue
                values = hist.values
                row[col] = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.int64) if values is not None \
                    else np.zeros(0, np.int64)
                if row[col].shape != (HIST_BINS,):
                    raise ModelFormatError(f"{where}: {col} has {row[col].size} bins, expected {HIST_BINS}")
            if not has_hist:
                row["hist_zero"] = None
            row["inputs"] = None
            if has_inputs and lists["inputs"][i].is_valid:
                values = lists["inputs"][i].values
                xv = np.asarray(values.to_numpy(zero_copy_only=False), dtype=np.float32) if values is not None \
                    else np.zeros(0, np.float32)
                if f == 0 or xv.size % f:
                    raise ModelFormatError(f"{where}: inputs has {xv.size} values, not a multiple of in_features {f}")
                row["inputs"] = xv.reshape(-1, f)
            row["mean_step"] = row["step_sum"] / row["samples"] if row["samples"] else float("nan")
            out[key] = row
    for key, source in shared:
        src = out.get((source, key[1], key[2]))
        if src is None or src["in_features"] != out[key]["in_features"]:
            raise ModelFormatError(f"{path!r}: layer {key[0]!r} bin {key[1]} split {key[2]!r}: hessian_from names "
                                   f"{source!r}, which has no row with {out[key]['in_features']} input features there")
        out[key]["hessian"] = src["hessian"]
    return out
