"""Loading a quantized model directory: lazy access to every tensor.

>>> import arrow_quant_v2 as aq
>>> model = aq.load("sd-int4/")
>>> model.tensor_names()[:2]
['unet/conv_in.bias', 'unet/conv_in.weight']
>>> w = model["unet/conv_in.weight"].numpy()          # float32, dequantized
>>> sd = model.to_torch_state_dict("unet")             # {name: torch.Tensor} in the source dtype

Values are decoded by the same C++ function the quantizer measured its error with, so what
loads is exactly what the reported metrics describe.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Dict, Iterator, List, Optional, Tuple

import numpy as np

from . import _core
from .errors import ModelFormatError, ModelNotFoundError

_TORCH_DTYPES = {"F32": "float32", "F16": "float16", "BF16": "bfloat16", "F64": "float64",
                 "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}
_NUMPY_RAW = {"F32": np.float32, "F16": np.float16, "F64": np.float64, "I64": np.int64, "I32": np.int32,
              "I16": np.int16, "I8": np.int8, "U8": np.uint8, "U16": np.uint16, "U32": np.uint32,
              "U64": np.uint64, "BOOL": np.bool_}
_RAW_FLOAT = {"F32": "<f4", "F16": "<f2", "F64": "<f8", "BF16": "<u2"}  # kept floats, as stored


def timestep_group(groups: List[Dict[str, Any]], step: float) -> int:
    """The index of the group whose ``[step_lo, step_hi)`` holds ``step`` (groups sorted by
    step_lo); a step outside the recorded range takes the nearest group."""
    t = float(step)
    for i, g in enumerate(groups):
        if g["step_lo"] <= t < g["step_hi"]:
            return i
    return 0 if t < groups[0]["step_lo"] else len(groups) - 1


@dataclass
class PackedTensor:
    """A tensor's stored form: packed codes and scales (docs/format.md), or the raw source bytes."""

    name: str
    shape: List[int]
    dtype: str
    quantized: bool
    codes: bytes
    scales: Optional[np.ndarray]
    zero_points: Optional[np.ndarray]
    bits: Optional[int]
    group_size: Optional[int]
    symmetric: Optional[bool]
    # Channel equalization: multiply the layer's input by input_scale (per input channel) before
    # the stored weight and before activation quantization; None when the layer has none.
    input_scale: Optional[np.ndarray] = None
    # ggml block types: "Q4_K", "Q8_0", ... (codes are exactly the type's blocks for the row-major
    # weight, scales live inside them); None for other schemes.
    ggml_type: Optional[str] = None


class QuantizedTensor:
    """One tensor of a loaded model; nothing is read until asked."""

    def __init__(self, reader: "_core.WeightsReader", index: int, info: Dict[str, Any], qualified: str) -> None:
        self._reader = reader
        self._index = index
        self.info = info
        self.name = qualified

    shape = property(lambda self: tuple(self.info["shape"]))
    dtype = property(lambda self: self.info["dtype"], doc="the source dtype (safetensors spelling)")
    quantized = property(lambda self: self.info["quantized"])
    bits = property(lambda self: self.info.get("bits"))
    group_size = property(lambda self: self.info.get("group_size"))
    scheme = property(lambda self: self.info.get("scheme", "raw"))
    cosine_similarity = property(lambda self: self.info.get("cosine_similarity", 1.0))
    stored_bytes = property(lambda self: self.info["stored_bytes"])

    @property
    def input_scale(self) -> Optional[np.ndarray]:
        """Channel equalization: the per-input-channel factor a runtime multiplies the layer's input
        by before the stored weight (and before activation quantization); None when the layer
        has none. :meth:`numpy` already folds it into the weight it returns."""
        return self.packed().input_scale if self.info.get("equalized") else None

    def numpy(self, dtype: Any = np.float32) -> np.ndarray:
        """The tensor as a numpy array: dequantized (float32 by default, or float16), or the kept
        values. Integer tensors come back in their own dtype."""
        if not self.quantized and self.dtype not in ("F32", "F16", "BF16", "F64", "F8_E4M3", "F8_E5M2"):
            p = self.packed()
            return np.frombuffer(p.codes, dtype=_NUMPY_RAW[self.dtype]).reshape(self.shape).copy()
        out = self._reader.dequantize(self._index)
        return out if np.dtype(dtype) == np.float32 else out.astype(dtype)

    dequantize = numpy

    @property
    def pieces(self) -> List[Tuple[int, int]]:
        """(row_start, row_count) of each stored piece, in row order: one for a tensor stored
        whole, several for a big tensor stored in pieces (docs/format.md)."""
        return [(int(a), int(n)) for a, n in self.info["pieces"]]

    def _overlaps(self, r0: int, r1: Optional[int]) -> Iterator[Tuple[int, int, int, int, int]]:
        rows = self.shape[0] if self.shape else 1
        r1 = rows if r1 is None else r1
        if not 0 <= r0 <= r1 <= rows:
            raise IndexError(f"{self.name}: rows [{r0}, {r1}) out of range (the tensor has {rows})")
        for k, (start, count) in enumerate(self.pieces):
            a, b = max(r0, start), min(r1, start + count)
            if a < b:
                yield k, start, count, a, b

    def packed_pieces(self) -> Iterator[PackedTensor]:
        """:meth:`packed`, one stored piece at a time (one for a tensor stored whole): their
        codes, scales and zero points, concatenated, are the whole tensor's."""
        for k in range(len(self.pieces)):
            yield self.packed(k)

    def stored_rows(self, r0: int = 0, r1: Optional[int] = None) -> Iterator[np.ndarray]:
        """The stored codes of rows [r0, r1) (default: all), as uint8 arrays of rows x bytes, one
        per stored piece the range meets: a ggml block type's blocks, a kept tensor's source
        bytes, or affine codes whose rows are whole bytes. Holds one piece at a time. Rows that
        are not whole bytes (entropy codes, odd affine rows): ValueError."""
        cols = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        whole_bytes = not self.quantized or self.info.get("ggml_type") or (
            self.info.get("scheme_kind") == "affine" and cols * (self.bits or 0) % 8 == 0)
        if not whole_bytes:
            raise ValueError(f"{self.name}: rows of scheme {self.scheme} are not whole bytes; read float_rows")
        for k, start, count, a, b in self._overlaps(r0, r1):
            codes = np.frombuffer(self._reader.packed(self._index, k)["codes"], dtype=np.uint8)
            yield codes.reshape(count, -1)[a - start:b - start]

    def float_rows(self, r0: int = 0, r1: Optional[int] = None,
                   block_values: int = 1 << 23) -> Iterator[np.ndarray]:
        """Rows [r0, r1) (default: all) as float32 arrays of rows x (the other dimensions), each
        at most ``block_values`` values (and at least one row, or for entropy-coded tensors one
        chunk of rows, the unit they decode in): what :meth:`numpy` gives (the
        input scale folded in), a block at a time, holding one stored piece. The memory of a
        pass over a big tensor is one piece and one block, whatever the tensor's size."""
        cols = int(np.prod(self.shape[1:])) if len(self.shape) > 1 else 1
        step = max(1, block_values // max(cols, 1))
        raw = None if self.quantized else _RAW_FLOAT.get(self.dtype)
        if not self.quantized and raw is None:  # fp8 and the like: converted by the core, whole
            whole = self.numpy().reshape(-1, cols)
            for _, _, _, a, b in self._overlaps(r0, r1):
                for x in range(a, b, step):
                    yield whole[x:min(b, x + step)]
            return
        scale = None
        if self.quantized and self.info.get("equalized"):
            s = np.asarray(self.packed().input_scale, dtype=np.float32)
            scale = np.repeat(s, cols // s.size)
        for k, start, count, a, b in self._overlaps(r0, r1):
            if raw is not None:
                codes = np.frombuffer(self._reader.packed(self._index, k)["codes"], dtype=raw).reshape(count, cols)
                for x in range(a, b, step):
                    block = codes[x - start:min(b, x + step) - start]
                    if raw == "<u2":  # bfloat16: the high half of a float32
                        yield (block.astype(np.uint32) << 16).view(np.float32)
                    else:
                        yield block.astype(np.float32)
                continue
            layer = self._reader.layer(self._index, k)
            g = max(1, layer.decode_granularity)  # entropy codes decode in whole chunks of rows
            lo, hi, n = (a - start) // g * g, b - start, max(g, step // g * g)
            for x in range(lo, hi, n):
                end = min(count, x + n)
                out = np.empty((end - x, cols), dtype=np.float32)
                layer.decode_rows_into(out, x, end - x)
                if scale is not None:
                    out *= scale
                yield out[max(0, a - start - x):min(end, hi) - x]

    def to_torch(self) -> Any:
        """The tensor as a torch.Tensor in its source dtype: kept tensors bit for bit (bf16 stays
        bf16), quantized ones dequantized (float32 sources' precision, then the source dtype)."""
        import torch

        if not self.quantized and self.dtype == "BF16":
            v = torch.frombuffer(bytearray(self.packed().codes), dtype=torch.int16).view(torch.bfloat16)
        elif not self.quantized and self.dtype in _NUMPY_RAW:
            v = torch.from_numpy(np.frombuffer(self.packed().codes, dtype=_NUMPY_RAW[self.dtype]).copy())
        else:
            v = torch.from_numpy(np.ascontiguousarray(self.numpy()))
            if self.quantized:
                v = v.to(getattr(torch, _TORCH_DTYPES.get(self.dtype, "float32")))
        return v.reshape(self.shape)

    def packed(self, piece: Optional[int] = None) -> PackedTensor:
        """The stored form, whole; or with ``piece``, of that stored piece's rows only
        (:attr:`pieces`), its ``shape`` those rows: what :meth:`packed_pieces` gives one by one."""
        d = self._reader.packed(self._index, piece)
        sdt = np.float16 if d.get("scale_type") == "f16" else np.float32
        ggml_type = d.get("ggml_type")
        shape = list(d["shape"])
        if piece is not None:
            shape = [self.pieces[piece][1]] + shape[1:] if shape else shape
        return PackedTensor(
            name=self.name, shape=shape, dtype=d["dtype"], quantized=d["quantized"], codes=d["codes"],
            scales=None if d["scales"] is None or ggml_type else np.frombuffer(d["scales"], dtype=sdt),
            zero_points=None if d["zero_points"] is None else np.frombuffer(d["zero_points"], dtype=sdt),
            bits=d.get("bits"), group_size=d.get("group_size"), symmetric=d.get("symmetric"),
            input_scale=d.get("input_scale"), ggml_type=ggml_type)

    def __repr__(self) -> str:
        return f"QuantizedTensor({self.name!r}, shape={self.shape}, {self.scheme}, source {self.dtype})"


class QuantizedModel:
    """A quantized model directory, opened lazily (reading the manifest and each component's
    small metadata columns only)."""

    def __init__(self, path: "os.PathLike[str] | str") -> None:
        self.path = os.fspath(path)
        manifest_path = os.path.join(self.path, "manifest.json")
        if not os.path.exists(self.path):
            raise ModelNotFoundError(f"{self.path}: no such directory")
        if not os.path.exists(manifest_path):
            raise ModelFormatError(f"{self.path}: no manifest.json (not an ArrowQuant model directory)")
        with open(manifest_path, encoding="utf-8") as f:
            try:
                self.manifest: Dict[str, Any] = json.load(f)
            except json.JSONDecodeError as e:
                raise ModelFormatError(f"{manifest_path}: not valid JSON ({e})") from None
        if self.manifest.get("format") != "arrowquant":
            raise ModelFormatError(f"{manifest_path}: not an ArrowQuant manifest")
        version = self.manifest.get("format_version")
        if not isinstance(version, int) or not _core.MIN_FORMAT_VERSION <= version <= _core.FORMAT_VERSION:
            raise ModelFormatError(f"{manifest_path}: format version {version}; this version reads "
                                   f"{_core.MIN_FORMAT_VERSION} to {_core.FORMAT_VERSION}")
        self._tensors: Dict[str, QuantizedTensor] = {}
        self._by_component: Dict[str, List[str]] = {}
        for comp in self.manifest["components"]:
            cname = comp["name"]
            reader = _core.WeightsReader(os.path.join(self.path, comp["weights"]))
            names = []
            for i, info in enumerate(reader.tensors()):
                q = f"{cname}/{info['name']}" if cname else info["name"]
                self._tensors[q] = QuantizedTensor(reader, i, info, q)
                names.append(q)
            self._by_component[cname] = names

    @property
    def components(self) -> List[str]:
        return list(self._by_component)

    @property
    def modality(self) -> str:
        return self.manifest["modality"]

    def tensor_names(self, component: Optional[str] = None) -> List[str]:
        if component is None:
            return list(self._tensors)
        return list(self._component(component))

    def __getitem__(self, name: str) -> QuantizedTensor:
        try:
            return self._tensors[name]
        except KeyError:
            raise KeyError(f"no tensor {name!r} in {self.path}") from None

    def __contains__(self, name: object) -> bool:
        return name in self._tensors

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def activation_params(self, layer: str, timestep: float) -> Dict[str, Any]:
        """Activation quantization parameters of ``layer``'s input for the timestep group holding
        ``timestep`` (W8A8 / W4A8; stored when the model was quantized with ``activation_bits``
        and calibration). ``layer`` is the weight's name as in ``tensor_names()``. Returns
        ``{"bits", "scale", "zero_point", "clip_lo", "clip_hi", "group", "step_lo", "step_hi"}``:
        quantize with ``clamp(round(x / scale) + zero_point, 0, 2**bits - 1)``. A timestep outside
        the recorded range takes the nearest group."""
        table = self._activation_table()
        rows = table.get(layer)
        if rows is None:
            raise KeyError(f"no activation parameters for {layer!r} in {self.path}"
                           + ("" if table else " (quantized without activation_bits and calibration)"))
        return dict(rows[timestep_group(rows, timestep)])

    def _activation_table(self) -> Dict[str, List[Dict[str, Any]]]:
        if getattr(self, "_activations", None) is None:
            self._activations: Dict[str, List[Dict[str, Any]]] = {}
            path = os.path.join(self.path, "activations.parquet")
            if os.path.exists(path):
                import pyarrow.parquet as pq

                for r in pq.read_table(path).to_pylist():
                    q = f"{r['component']}/{r['layer']}" if r["component"] else r["layer"]
                    self._activations.setdefault(q, []).append(
                        {k: r[k] for k in ("bits", "scale", "zero_point", "clip_lo", "clip_hi", "group",
                                           "step_lo", "step_hi")})
                for rows in self._activations.values():
                    rows.sort(key=lambda r: r["step_lo"])
        return self._activations

    def state_dict(self, component: Optional[str] = None, dtype: Any = np.float32) -> Dict[str, np.ndarray]:
        """{name: numpy array} of one component (names without the component prefix), or of a
        single-component model."""
        component = self._default_component(component)
        names = self._component(component)
        prefix = len(component) + 1 if component else 0
        return {n[prefix:]: self._tensors[n].numpy(dtype) for n in names}

    def to_torch_state_dict(self, component: Optional[str] = None, dtype: Any = None) -> Dict[str, Any]:
        """{name: torch.Tensor} of one component, each in its source dtype (bf16 stays bf16) unless
        ``dtype`` (a torch dtype) is given; ready for ``module.load_state_dict``. Needs torch
        (``pip install arrow_quant_v2[torch]``)."""
        try:
            import torch
        except ImportError as e:
            raise ImportError("to_torch_state_dict needs PyTorch: pip install 'arrow_quant_v2[torch]'") from e
        component = self._default_component(component)
        prefix = len(component) + 1 if component else 0
        out = {}
        for n in self._component(component):
            t = self._tensors[n]
            target = dtype if dtype is not None else getattr(torch, _TORCH_DTYPES.get(t.dtype, "float32"))
            out[n[prefix:]] = t.to_torch().to(target)  # kept tensors bit for bit, not through float32
        return out

    def _default_component(self, component: Optional[str]) -> str:
        if component is not None:
            return component
        if len(self._by_component) == 1:
            return next(iter(self._by_component))
        raise ValueError(f"{self.path} has components {self.components}; name one")

    def _component(self, component: str) -> List[str]:
        try:
            return self._by_component[component]
        except KeyError:
            raise KeyError(f"no component {component!r} in {self.path}; components: {self.components}") from None

    def __repr__(self) -> str:
        return f"QuantizedModel({self.path!r}, components={self.components}, tensors={len(self)})"


def load(path: "os.PathLike[str] | str") -> QuantizedModel:
    """Opens a quantized model directory written by ArrowQuant."""
    return QuantizedModel(path)
