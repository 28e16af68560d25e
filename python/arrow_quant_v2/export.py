"""Export of a quantized model to GGUF (docs/export.md), written with gguf-py.

Layers stored in a ggml block type are written as their stored bytes: a change of container, no
requantization. Kept tensors follow what GGUF consumers expect: 1-D tensors and tensors of at most
1024 weights as F32 (never BF16 or quantized: biases, norms, scales), larger ones in their source
float type. Layers in ``affine`` or ``entropy`` schemes, and equalized layers (their stored weight
needs an input scale no GGUF consumer applies), are an error naming them, unless ``requantize``
names a ggml type: they are then decoded (the input scale folded in) and encoded again with our
encoder, and the result says which. Convolution weights in a ggml type are written as F16 after
decoding: consumers run convolutions from dense weights (diffusers keeps only ``nn.Linear``
quantized, stable-diffusion.cpp runs convolutions in F16), and a GGUF tensor keeps its 4-D shape
only in a float type.

The file is written to a temporary name beside the output and renamed when complete; tensors
stream from the model one at a time.
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, List, Optional, Union

import numpy as np

from . import _core
from .errors import ConfigurationError
from .loader import load

PathLike = Union[str, "os.PathLike[str]"]

# ggml types we encode (DiffusionQuantConfig.scheme spelling) -> gguf-py's name
GGML_EXPORT_TYPES = {"q8_0": "Q8_0", "q6_k": "Q6_K", "q5_k": "Q5_K", "q4_k": "Q4_K", "q3_k": "Q3_K",
                     "q2_k": "Q2_K", "iq4_xs": "IQ4_XS", "iq4_nl": "IQ4_NL"}
SMALL_TENSOR = 1024  # weights: at most this many are stored F32
DENOISERS = ("transformer", "unet", "prior", "decoder")


def _gguf():
    try:
        import gguf
    except ImportError as e:
        raise ImportError("GGUF export needs gguf-py: pip install 'arrow_quant_v2[gguf]' (or pip install gguf)") from e
    return gguf


def _pick_component(model: Any, component: Optional[str]) -> str:
    comps = model.components
    if component is not None:
        if component not in comps:
            raise ConfigurationError(f"{model.path}: no component {component!r}; components: {comps}")
        return component
    if len(comps) == 1:
        return comps[0]
    for c in DENOISERS:
        if c in comps:
            return c
    raise ConfigurationError(f"{model.path} has components {comps} and none is a denoiser "
                             f"({', '.join(DENOISERS)}); name one with component=")


def _requantize_type(path: str, name: str, cols: int, scheme: str) -> str:
    """The ggml type a layer with rows of ``cols`` weights is encoded in for ``requantize=scheme``:
    the scheme's, or where its 256-weight blocks do not fit the row, the engine's fallback of about
    the same size (IQ4_NL up to 4 bits, Q8_0 above)."""
    if scheme in ("q8_0", "iq4_nl") or cols % 256 == 0:
        if cols % 32:
            raise ConfigurationError(f"{path}: layer {name!r} has rows of {cols} weights; ggml block types need a "
                                     f"multiple of 32")
        return GGML_EXPORT_TYPES[scheme]
    if cols % 32:
        raise ConfigurationError(f"{path}: layer {name!r} has rows of {cols} weights; ggml block types need a "
                                 f"multiple of 32")
    return "IQ4_NL" if scheme in ("q4_k", "q3_k", "q2_k", "iq4_xs") else "Q8_0"


def export_gguf(quant_dir: PathLike, out_path: PathLike, component: Optional[str] = None,
                requantize: Optional[str] = None, overwrite: bool = False) -> Dict[str, Any]:
    """Writes one component of the quantized model at ``quant_dir`` (default: the denoiser) to the
    GGUF file ``out_path``, under its source tensor names. Returns ``path``, ``component``,
    ``tensors``, ``bytes``, ``seconds``, ``types`` (tensors per GGUF type), ``copied`` (ggml layers
    written as stored), ``requantized`` and ``dequantized`` (the names), and ``config_dir`` (the
    component's directory holding config.json, for loaders that need it, or None)."""
    gguf = _gguf()
    if requantize is not None and requantize not in GGML_EXPORT_TYPES:
        raise ConfigurationError(f"requantize must be None or a ggml type ({', '.join(GGML_EXPORT_TYPES)}); "
                                 f"got {requantize!r}")
    t0 = time.perf_counter()
    model = load(quant_dir)
    comp = _pick_component(model, component)
    out_path = os.fspath(out_path)
    if os.path.exists(out_path) and not overwrite:
        raise ConfigurationError(f"{out_path} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(os.path.abspath(out_path))
    if not os.path.isdir(parent):
        raise ConfigurationError(f"{out_path}: the directory {parent} does not exist")
    names = model.tensor_names(comp)
    prefix = len(comp) + 1 if comp else 0

    # Plan every tensor before writing anything: the errors name every layer at once.
    plan: List[Dict[str, Any]] = []
    refused: List[str] = []
    for q in names:
        t = model[q]
        name = q[prefix:]
        shape = tuple(int(d) for d in t.shape)
        numel = int(np.prod(shape)) if shape else 1
        entry: Dict[str, Any] = {"q": q, "name": name, "shape": shape}
        if not t.quantized:
            if t.dtype not in ("F32", "F16", "BF16", "F64"):
                raise ConfigurationError(f"{model.path}: tensor {name!r} is {t.dtype}; GGUF export writes float "
                                         f"tensors only")
            small = len(shape) <= 1 or numel <= SMALL_TENSOR
            entry["kind"] = "float"
            entry["type"] = "F32" if small or t.dtype in ("F32", "F64") else t.dtype
        else:
            p = t.packed()
            equalized = p.input_scale is not None
            if p.ggml_type and not equalized and len(shape) == 2:
                entry["kind"], entry["type"] = "copy", p.ggml_type
            elif p.ggml_type and not equalized:
                entry["kind"], entry["type"] = "dequantize", "F16"
            elif requantize is not None:
                cols = int(np.prod(shape[1:]))
                if len(shape) != 2:
                    entry["kind"], entry["type"] = "dequantize", "F16"
                else:
                    entry["kind"], entry["type"] = "requantize", _requantize_type(model.path, name, cols, requantize)
            else:
                why = "equalized (its stored weight needs an input scale)" if equalized else f"scheme {t.scheme}"
                refused.append(f"{name} ({why})")
        plan.append(entry)
    if refused:
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise ConfigurationError(
            f"{model.path}: {len(refused)} layers are not in a ggml block type GGUF can hold as stored: "
            f"{', '.join(refused[:8])}{more}. Quantize with a ggml scheme (scheme='q4_k', ...; "
            f"enable_spatial=False keeps layers unequalized), or pass requantize='q4_k' (decode and encode again)")

    types = {e["type"]: getattr(gguf.GGMLQuantizationType, e["type"]) for e in plan}
    tmp = f"{out_path}.tmp-{os.getpid()}"
    writer = gguf.GGUFWriter(tmp, arch="diffusers")  # consumers of diffusers-named files read tensors only
    result: Dict[str, Any] = {"path": out_path, "component": comp, "tensors": len(plan), "types": {},
                              "copied": 0, "requantized": [], "dequantized": []}
    try:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        manifest = model.manifest
        writer.add_string("arrowquant.source", str(manifest.get("source", "")))
        writer.add_string("arrowquant.component", comp)
        writer.add_string("arrowquant.producer", str(manifest.get("producer", "")))
        for e in plan:
            gtype = types[e["type"]]
            if e["kind"] in ("copy", "requantize"):
                block, nbytes = gguf.GGML_QUANT_SIZES[gtype]
                rows, cols = e["shape"]
                byte_shape = (rows, cols // block * nbytes)
                writer.add_tensor_info(e["name"], byte_shape, np.dtype(np.uint8), rows * byte_shape[1],
                                       raw_dtype=gtype)
            else:
                np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float32}[e["type"]]
                numel = int(np.prod(e["shape"])) if e["shape"] else 1
                writer.add_tensor_info(e["name"], e["shape"] or (1,), np.dtype(np_dtype),
                                       numel * np.dtype(np_dtype).itemsize,
                                       raw_dtype=gtype if e["type"] == "BF16" else None)
            result["types"][e["type"]] = result["types"].get(e["type"], 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in plan:
            writer.write_tensor_data(_tensor_data(model, e, gguf))
            if e["kind"] == "copy":
                result["copied"] += 1
            elif e["kind"] == "requantize":
                result["requantized"].append(e["name"])
            elif e["kind"] == "dequantize":
                result["dequantized"].append(e["name"])
        writer.close()
        os.replace(tmp, out_path)
    except BaseException:
        try:
            writer.close()
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        raise
    cfg_dir = os.path.join(model.path, comp) if comp else model.path
    result["config_dir"] = cfg_dir if os.path.exists(os.path.join(cfg_dir, "config.json")) else None
    result["bytes"] = os.path.getsize(out_path)
    result["seconds"] = time.perf_counter() - t0
    return result


def _tensor_data(model: Any, e: Dict[str, Any], gguf: Any) -> np.ndarray:
    t = model[e["q"]]
    if e["kind"] == "copy":
        codes = np.frombuffer(t.packed().codes, dtype=np.uint8)
        return codes.reshape(e["shape"][0], -1)
    if e["kind"] == "requantize":
        w = np.ascontiguousarray(t.numpy(), dtype=np.float32)
        scheme = next(k for k, v in GGML_EXPORT_TYPES.items() if v == e["type"])
        enc = _core.encode_array(w, 0, scheme=scheme, name=e["name"])
        return np.frombuffer(enc.codes, dtype=np.uint8).reshape(e["shape"][0], -1)
    if e["kind"] == "dequantize":
        return t.numpy().astype(np.float16)
    if e["type"] == "BF16":
        bits = np.frombuffer(t.packed().codes, dtype="<u2")
        return bits.reshape(e["shape"] or (1,))
    return t.numpy().astype(np.float16 if e["type"] == "F16" else np.float32).reshape(e["shape"] or (1,))
