"""In-memory quantization of arrays (LoRA and ControlNet weights): no files involved."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Mapping, Optional, Tuple

import numpy as np

from . import _core
from .config import DiffusionQuantConfig
from .errors import ConfigurationError

_NUMPY_TO_DTYPE = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64"}


@dataclass
class QuantizedArray:
    """One quantized (or kept) array. ``dequantize()`` returns exactly what a saved model would
    load for the same weights."""

    name: str
    shape: Tuple[int, ...]
    source_dtype: str
    quantized: bool
    reason: str
    bits: Optional[int] = None
    group_size: Optional[int] = None
    symmetric: Optional[bool] = None
    scale_type: Optional[str] = None
    codes: Optional[bytes] = None          # packed codes (docs/format.md)
    scales: Optional[np.ndarray] = None    # float16/float32, rows x groups
    zero_points: Optional[np.ndarray] = None
    cosine_similarity: float = 1.0
    relative_error: float = 0.0
    rejected_bits: List[int] = field(default_factory=list)  # widths the accuracy fallback rejected
    _raw: Optional[np.ndarray] = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes + scales + zero points, or the kept array's bytes."""
        if not self.quantized:
            return int(self._raw.nbytes)
        zp = 0 if self.zero_points is None else self.zero_points.nbytes
        return len(self.codes) + self.scales.nbytes + zp

    @property
    def bits_per_weight(self) -> float:
        n = int(np.prod(self.shape)) if self.shape else 1
        return 8.0 * self.nbytes / max(1, n)

    def dequantize(self, dtype: Any = np.float32) -> np.ndarray:
        if not self.quantized:
            return self._raw.astype(dtype, copy=True)
        rows = self.shape[0]
        cols = int(np.prod(self.shape[1:]))
        zp = None if self.zero_points is None else self.zero_points.tobytes()
        out = _core.decode_array(self.codes, self.scales.tobytes(), zp, rows, cols, self.bits,
                                 self.group_size, self.symmetric, self.scale_type)
        return out.reshape(self.shape).astype(dtype, copy=False)


def _as_numpy(name: str, value: Any) -> np.ndarray:
    if isinstance(value, np.ndarray):
        return value
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch
        value = value.detach().cpu()
        if str(getattr(value, "dtype", "")) == "torch.bfloat16":
            value = value.float()
        return value.numpy()
    try:
        return np.asarray(value)
    except Exception as e:  # noqa: BLE001
        raise ConfigurationError(f"weights[{name!r}] is not an array ({type(value).__name__}): {e}") from None


def quantize_arrays(weights: Mapping[str, Any], config: DiffusionQuantConfig) -> Dict[str, QuantizedArray]:
    if not isinstance(weights, Mapping):
        raise ConfigurationError(f"weights must be a dict of name -> array; got {type(weights).__name__}")
    engine_json = config._engine_json()
    out: Dict[str, QuantizedArray] = {}
    for name, value in weights.items():
        a = _as_numpy(str(name), value)
        # other float types (bfloat16 from ml_dtypes) are read as float32; integers are kept
        dtype = _NUMPY_TO_DTYPE.get(a.dtype, "F32" if a.dtype.kind == "f" else "I64")
        plan = _core.plan_tensor(engine_json, str(name), dtype, list(a.shape))
        if not plan["quantize"]:
            out[name] = QuantizedArray(name, tuple(a.shape), str(a.dtype), False, plan["reason"], _raw=a.copy())
            continue
        rows = a.shape[0]
        mat = np.ascontiguousarray(a.reshape(rows, int(np.prod(a.shape[1:]))), dtype=np.float32)
        r = _core.quantize_array(engine_json, str(name), dtype, list(a.shape), mat)
        if not r["quantized"]:
            out[name] = QuantizedArray(name, tuple(a.shape), str(a.dtype), False, r["reason"], _raw=a.copy(),
                                       rejected_bits=list(r["rejected_bits"]))
            continue
        sdt = np.float16 if r["scale_type"] == "f16" else np.float32
        out[name] = QuantizedArray(
            name=name, shape=tuple(a.shape), source_dtype=str(a.dtype), quantized=True, reason=r["reason"],
            bits=r["bits"], group_size=r["group_size"], symmetric=r["symmetric"], scale_type=r["scale_type"],
            codes=r["codes"], scales=np.frombuffer(r["scales"], dtype=sdt),
            zero_points=None if r["zero_points"] is None else np.frombuffer(r["zero_points"], dtype=sdt),
            cosine_similarity=r["cosine_similarity"], relative_error=r["relative_error"],
            rejected_bits=list(r["rejected_bits"]))
    return out
