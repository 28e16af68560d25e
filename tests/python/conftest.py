"""Shared fixtures and independent helpers for the ArrowQuant Python tests.

Every model the tests use is generated here (no downloads). The helpers below re-implement, with
plain numpy and pyarrow, what the tests check the package against: reading safetensors, the
cosine similarity, the byte counts, the dequantization formula of the format.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from typing import Dict, Iterable, List, Optional, Sequence, Tuple

import numpy as np
import pyarrow.parquet as pq
import pytest

import arrow_quant_v2 as aq
from arrow_quant_v2 import _core
from arrow_quant_v2.demo import generate_demo_pipeline
from arrow_quant_v2.safetensors_writer import from_bf16_bits, write_safetensors

# ---------------------------------------------------------------------------------------------
# independent readers and formulas
# ---------------------------------------------------------------------------------------------

_NP_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2",
              "I8": "i1", "U8": "u1", "BOOL": "?", "U16": "<u2", "U32": "<u4", "U64": "<u8"}
_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "U16": 2, "U32": 4, "U64": 8}
FLOAT_DTYPES = ("F64", "F32", "F16", "BF16")

WEIGHTS_COLUMNS = ["name", "shape", "dtype", "encoding", "scheme", "codes", "scales", "zero_points", "entropy",
                   "metrics", "reason", "rejected_bits", "stored_bytes", "input_scale",
                   "piece", "row_start", "row_count"]


def safetensors_header(path: "os.PathLike[str] | str") -> Tuple[Dict[str, dict], int]:
    """(tensor entries without __metadata__, byte offset of the data section)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    header.pop("__metadata__", None)
    return header, 8 + n


def read_safetensors_raw(path: "os.PathLike[str] | str") -> Dict[str, Tuple[str, List[int], bytes]]:
    """{name: (dtype, shape, raw little-endian bytes)} in file order."""
    header, start = safetensors_header(path)
    with open(path, "rb") as f:
        blob = f.read()
    out = {}
    for name, e in sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0]):
        b, end = e["data_offsets"]
        out[name] = (e["dtype"], list(e["shape"]), blob[start + b:start + end])
    return out


def decode_raw(dtype: str, shape: Sequence[int], raw: bytes) -> np.ndarray:
    """Raw safetensors bytes -> numpy (BF16 -> float32, the only lossless numpy form)."""
    if dtype == "BF16":
        return from_bf16_bits(np.frombuffer(raw, dtype="<u2")).reshape(shape)
    return np.frombuffer(raw, dtype=_NP_DTYPES[dtype]).reshape(shape).copy()


def read_safetensors(path: "os.PathLike[str] | str") -> Dict[str, np.ndarray]:
    return {n: decode_raw(d, s, r) for n, (d, s, r) in read_safetensors_raw(path).items()}


def source_data_bytes(paths: Iterable["os.PathLike[str] | str"]) -> int:
    """Bytes of tensor data (what the tensors occupy) across safetensors files."""
    total = 0
    for p in paths:
        header, _ = safetensors_header(p)
        total += sum(e["data_offsets"][1] - e["data_offsets"][0] for e in header.values())
    return total


def np_cosine(a: np.ndarray, b: np.ndarray) -> float:
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    na, nb = float(np.sqrt(a @ a)), float(np.sqrt(b @ b))
    if na == 0.0 and nb == 0.0:
        return 1.0
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b) / (na * nb)


def np_relative_error(src: np.ndarray, deq: np.ndarray) -> float:
    a = np.asarray(src, dtype=np.float64).ravel()
    e = a - np.asarray(deq, dtype=np.float64).ravel()
    return float(np.sqrt((e @ e) / (a @ a)))


def weights_rows(parquet_path: "os.PathLike[str] | str") -> List[dict]:
    return pq.read_table(parquet_path).to_pylist()


def parquet_stored_bytes(parquet_path: "os.PathLike[str] | str") -> int:
    """codes + scales + zero points, as stored in the file."""
    total = 0
    for r in weights_rows(parquet_path):
        total += len(r["codes"]) + len(r["scales"] or b"") + len(r["zero_points"] or b"")
    return total


def directory_bytes(root: "os.PathLike[str] | str") -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(root) for f in files)


def tree_digest(root: "os.PathLike[str] | str") -> Dict[str, str]:
    """{relative path: sha256} of every file under root (or of root itself, if a file)."""
    root = os.fspath(root)
    if os.path.isfile(root):
        with open(root, "rb") as f:
            return {"": hashlib.sha256(f.read()).hexdigest()}
    out = {}
    for d, _, files in os.walk(root):
        for f in files:
            p = os.path.join(d, f)
            with open(p, "rb") as fh:
                out[os.path.relpath(p, root)] = hashlib.sha256(fh.read()).hexdigest()
    return out


def file_digest(path: "os.PathLike[str] | str") -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def leftovers(directory: "os.PathLike[str] | str") -> List[str]:
    """Staging or moved-aside directories the engine may leave next to an output."""
    directory = os.fspath(directory)
    if not os.path.isdir(directory):
        return []
    return sorted(n for n in os.listdir(directory) if "arrowquant-tmp" in n or "arrowquant-old" in n)


def reference_decode(packed, shape: Sequence[int]) -> np.ndarray:
    """The format's dequantization, written from docs/format.md / quant/scheme.h with numpy:
    codes are one little-endian bit stream (unpacked with _core.unpack_codes); scales (and offsets)
    are rows x groups along each row, the last group shorter;
      asymmetric: w = s * c + z;   symmetric: w = s * (c - 2^(bits-1))
    in float32, the product rounded before the sum (no fused multiply-add)."""
    rows = int(shape[0])
    numel = int(np.prod(shape))
    cols = numel // rows if rows else 0
    bits = packed.bits
    g = packed.group_size if packed.group_size else cols
    gpr = -(-cols // g) if g else 0
    codes = np.asarray(_core.unpack_codes(packed.codes, 0, numel, bits)).reshape(rows, cols)
    group_of_col = np.arange(cols) // g
    s = np.asarray(packed.scales).astype(np.float32).reshape(rows, gpr)[:, group_of_col]
    c = codes.astype(np.float32)
    if packed.symmetric:
        out = s * (c - np.float32(2 ** (bits - 1)))
    else:
        z = np.asarray(packed.zero_points).astype(np.float32).reshape(rows, gpr)[:, group_of_col]
        prod = (s * c).astype(np.float32)
        out = prod + z
    assert out.dtype == np.float32
    return out.reshape(shape)


def packed_code_len(numel: int, bits: int) -> int:
    return math.ceil(numel * bits / 8)


# ---------------------------------------------------------------------------------------------
# model builders
# ---------------------------------------------------------------------------------------------

def write_model_file(path: "os.PathLike[str] | str", arrays: Dict[str, np.ndarray],
                     dtypes: Optional[Dict[str, str]] = None) -> str:
    """Writes arrays (float arrays as F32 unless dtypes says otherwise) to one safetensors file."""
    dtypes = dict(dtypes or {})
    default = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.float64): "F64",
               np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.uint8): "U8",
               np.dtype(np.bool_): "BOOL", np.dtype(np.int8): "I8", np.dtype(np.int16): "I16"}
    specs = [(n, dtypes.get(n, default[a.dtype]), tuple(a.shape)) for n, a in arrays.items()]
    write_safetensors(path, specs, lambda n: arrays[n], metadata={"format": "pt"})
    return os.fspath(path)


def stored_values(arrays: Dict[str, np.ndarray], dtypes: Optional[Dict[str, str]] = None) -> Dict[str, np.ndarray]:
    """The values a file written by write_model_file holds (BF16 rounding applied), as float32 for floats."""
    out = {}
    for n, a in arrays.items():
        d = (dtypes or {}).get(n)
        if d == "BF16":
            from arrow_quant_v2.safetensors_writer import to_bf16_bits
            out[n] = from_bf16_bits(to_bf16_bits(a)).reshape(a.shape)
        elif d == "F16":
            out[n] = a.astype(np.float16).astype(np.float32)
        elif a.dtype.kind == "f":
            out[n] = a.astype(np.float32)
        else:
            out[n] = a
    return out


def layer_weights(rng: np.random.Generator, n: int, shape=(32, 64), prefix: str = "blocks") -> Dict[str, np.ndarray]:
    """n neutral layer names (no sensitive pattern) with Gaussian weights."""
    return {f"{prefix}.{i}.linear.weight": rng.standard_normal(shape).astype(np.float32) for i in range(n)}


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(20240601)


@pytest.fixture
def quantizer() -> aq.ArrowQuantV2:
    return aq.ArrowQuantV2(mode="diffusion")


@pytest.fixture
def small_model(tmp_path, rng):
    """A single .safetensors file with two quantizable matrices, a conv kernel, a bias (kept,
    1-D) and an integer tensor (kept). Returns (path, {name: float32/int values as stored})."""
    arrays = {
        "blocks.0.attn.qkv.weight": rng.standard_normal((96, 200)).astype(np.float32),
        "blocks.0.attn.qkv.bias": (0.1 * rng.standard_normal(96)).astype(np.float32),
        "blocks.0.mlp.fc1.weight": rng.standard_t(4.0, size=(64, 128)).astype(np.float32),
        "blocks.0.conv.weight": rng.standard_normal((16, 8, 3, 3)).astype(np.float32),
        "position_ids": np.arange(77, dtype=np.int64).reshape(1, 77),
    }
    d = tmp_path / "src"
    d.mkdir()
    path = write_model_file(d / "model.safetensors", arrays)
    return path, stored_values(arrays)


@pytest.fixture(scope="session")
def demo_pipeline(tmp_path_factory) -> str:
    """The built-in diffusers pipeline at its smallest width (read-only for the tests)."""
    path = tmp_path_factory.mktemp("demo") / "pipeline"
    generate_demo_pipeline(path, base_channels=32, seed=0)
    return os.fspath(path)


@pytest.fixture(scope="session")
def demo_quantized(demo_pipeline, tmp_path_factory):
    """(output path, result) of the default quantization of the demo pipeline (unet only)."""
    out = tmp_path_factory.mktemp("demo_q") / "pipeline-int4"
    result = aq.ArrowQuantV2().quantize_diffusion_model(demo_pipeline, out)
    return os.fspath(out), result


@pytest.fixture(scope="session")
def demo_quantized_all(demo_pipeline, tmp_path_factory):
    """(output path, result) of quantizing every component of the demo pipeline."""
    out = tmp_path_factory.mktemp("demo_q_all") / "pipeline-all"
    result = aq.ArrowQuantV2().quantize_diffusion_model(
        demo_pipeline, out, config=aq.DiffusionQuantConfig(components=["all"]))
    return os.fspath(out), result
