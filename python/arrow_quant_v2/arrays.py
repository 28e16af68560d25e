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
    scheme: Optional[str] = None           # e.g. "int4_g128_asym", "entropy_4.50"
    codes: Optional[bytes] = None          # packed codes, or rANS chunks (docs/format.md)
    scales: Optional[np.ndarray] = None    # affine: per group; entropy: per-row steps (float32)
    zero_points: Optional[np.ndarray] = None
    cosine_similarity: float = 1.0
    relative_error: float = 0.0
    rejected_bits: List[int] = field(default_factory=list)  # widths the accuracy fallback rejected
    _raw: Optional[np.ndarray] = field(default=None, repr=False)
    _encoded: Any = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        """Bytes stored: codes, scales, zero points and entropy tables, or the kept array's bytes."""
        if not self.quantized:
            return int(self._raw.nbytes)
        return int(self._encoded.stored_bytes)

    @property
    def bits_per_weight(self) -> float:
        n = int(np.prod(self.shape)) if self.shape else 1
        return 8.0 * self.nbytes / max(1, n)

    def dequantize(self, dtype: Any = np.float32) -> np.ndarray:
        if not self.quantized:
            return self._raw.astype(dtype, copy=True)
        return self._encoded.decode().reshape(self.shape).astype(dtype, copy=False)


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
        enc = r["encoded"]
        info = enc.info()
        entropy = info["scheme_kind"] == "entropy"
        sdt = np.float32 if entropy or info["scale_type"] == "f32" else np.float16
        zp = enc.zero_points
        out[name] = QuantizedArray(
            name=name, shape=tuple(a.shape), source_dtype=str(a.dtype), quantized=True, reason=r["reason"],
            bits=info["bits"], group_size=info["group_size"], symmetric=info["symmetric"],
            scale_type="f32" if entropy else info["scale_type"], scheme=info["scheme"],
            codes=enc.codes, scales=np.frombuffer(enc.scales, dtype=sdt),
            zero_points=None if zp is None else np.frombuffer(zp, dtype=sdt),
            cosine_similarity=info["cosine_similarity"], relative_error=info["relative_error"],
            rejected_bits=list(r["rejected_bits"]), _encoded=enc)
    return out
