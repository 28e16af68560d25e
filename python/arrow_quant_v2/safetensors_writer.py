"""A streaming .safetensors writer for generated models (the demo model, tests, benchmarks).

The ``safetensors`` package cannot write bfloat16 from numpy, and a multi-gigabyte generated
model must not sit in memory at once: this writer takes each tensor's dtype and shape first
(the header needs every offset), then asks for the tensors one at a time.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Callable, Dict, Iterable, Iterator, Optional, Sequence, Tuple, Union

import numpy as np

DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}


def to_bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (uint16), rounding to nearest even (NaN kept NaN)."""
    b = np.ascontiguousarray(a, dtype=np.float32).view(np.uint32)
    rounded = ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)
    nan = (b & 0x7FFFFFFF) > 0x7F800000
    if nan.any():
        rounded[nan] = ((b[nan] >> 16) | 0x40).astype(np.uint16)
    return rounded


def from_bf16_bits(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def encode(a: np.ndarray, dtype: str) -> bytes:
    """The little-endian bytes of ``a`` in safetensors dtype ``dtype``."""
    if dtype == "BF16":
        return to_bf16_bits(a).astype("<u2").tobytes()
    np_dtype = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
                "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}[dtype]
    return np.ascontiguousarray(a).astype(np_dtype).tobytes()


TensorSpec = Tuple[str, str, Sequence[int]]  # name, dtype, shape


def write_safetensors(path: "os.PathLike[str] | str", specs: Iterable[TensorSpec],
                      make: Callable[[str], Union[np.ndarray, Iterator[np.ndarray]]],
                      metadata: Optional[Dict[str, str]] = None) -> int:
    """Writes ``specs`` to ``path``; ``make(name)`` returns each tensor's values (any numpy dtype,
    converted to the spec's dtype), as one array of the spec's shape or as an iterator of arrays
    that are its values in order, a block at a time (a big tensor is then never whole in
    memory). Returns the file size. Written to a temporary name and renamed."""
    specs = list(specs)
    header: Dict[str, object] = {}
    if metadata:
        header["__metadata__"] = dict(metadata)
    offset = 0
    for name, dtype, shape in specs:
        n = int(np.prod(shape)) * DTYPE_SIZES[dtype]
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * ((8 - len(text) % 8) % 8)  # keep the data 8-byte aligned, as the reference writer does
    tmp = f"{os.fspath(path)}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name, dtype, shape in specs:
            made = make(name)
            if not isinstance(made, Iterator):
                a = np.asarray(made)
                if tuple(a.shape) != tuple(shape):
                    raise ValueError(f"{name}: made shape {a.shape}, declared {tuple(shape)}")
                f.write(encode(a, dtype))
                continue
            values = 0
            for block in made:
                block = np.asarray(block)
                values += block.size
                f.write(encode(block, dtype))
            if values != int(np.prod(shape)):
                raise ValueError(f"{name}: made {values} values, declared shape {tuple(shape)}")
    os.replace(tmp, path)
    return 8 + len(text) + offset


def save_arrays(path: "os.PathLike[str] | str", arrays: Dict[str, np.ndarray], dtype: Optional[str] = None) -> int:
    """Writes a dict of arrays; ``dtype`` (e.g. "BF16") converts every float array."""
    def dt(a: np.ndarray) -> str:
        if dtype and a.dtype.kind == "f":
            return dtype
        return {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
                np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8",
                np.dtype(np.bool_): "BOOL"}[a.dtype]
    specs = [(k, dt(v), v.shape) for k, v in arrays.items()]
    return write_safetensors(path, specs, lambda k: arrays[k])
