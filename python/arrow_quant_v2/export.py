"""Export of a quantized model to GGUF (docs/export.md), written with gguf-py, and to
compressed-tensors checkpoints (pack-quantized), as vLLM and transformers read them.

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


def _check_output(path: PathLike, overwrite: bool) -> "tuple[str, str]":
    """The output path and its directory, checked before anything is read or written."""
    path = os.fspath(path)
    if os.path.exists(path) and not overwrite:
        raise ConfigurationError(f"{path} exists; pass overwrite=True to replace it")
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise ConfigurationError(f"{path}: the directory {parent} does not exist")
    return path, parent


def _refuse(path: str, refused: List[str], what: str, advice: str) -> None:
    """Raises, naming the first layers of ``refused`` (and how many more), when there are any."""
    if refused:
        more = f" and {len(refused) - 8} more" if len(refused) > 8 else ""
        raise ConfigurationError(f"{path}: {len(refused)} {what}: {', '.join(refused[:8])}{more}. {advice}")


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


LM_ARCHS = ("dream", "llada")  # diffusion LMs: llama.cpp's names, hyper-parameters and tokenizer


def _read_json(path: str) -> Optional[Dict[str, Any]]:
    import json

    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _detect_arch(config: Optional[Dict[str, Any]]) -> str:
    if not config:
        return "diffusers"
    kind = str(config.get("model_type", "")).lower()
    names = " ".join(config.get("architectures") or []).lower()
    for arch in LM_ARCHS:
        if kind.startswith(arch) or arch in names:
            return arch
    return "diffusers"


def export_gguf(quant_dir: PathLike, out_path: PathLike, component: Optional[str] = None,
                requantize: Optional[str] = None, overwrite: bool = False,
                arch: Optional[str] = None, tokenizer_pre: str = "qwen2") -> Dict[str, Any]:
    """Writes one component of the quantized model at ``quant_dir`` (default: the denoiser) to the
    GGUF file ``out_path``. ``arch``: ``"diffusers"`` keeps the source tensor names (image, video
    and audio denoisers); ``"dream"`` or ``"llada"`` writes a diffusion LM as llama.cpp reads it
    (its tensor names, hyper-parameters from config.json, non-causal attention, the tokenizer of
    tokenizer.json with ``tokenizer_pre`` as its pre-tokenizer, the mask token id); None detects
    it from config.json's ``model_type`` / ``architectures``. Returns ``path``, ``component``,
    ``arch``, ``tensors``, ``bytes``, ``seconds``, ``types`` (tensors per GGUF type), ``copied``
    (ggml layers written as stored), ``requantized`` and ``dequantized`` (the names), and
    ``config_dir`` (the component's directory holding config.json, for loaders that need it, or
    None)."""
    gguf = _gguf()
    if requantize is not None and requantize not in GGML_EXPORT_TYPES:
        raise ConfigurationError(f"requantize must be None or a ggml type ({', '.join(GGML_EXPORT_TYPES)}); "
                                 f"got {requantize!r}")
    if arch is not None and arch not in ("diffusers",) + LM_ARCHS:
        raise ConfigurationError(f"arch must be None (detect), 'diffusers', 'dream' or 'llada'; got {arch!r}")
    t0 = time.perf_counter()
    model = load(quant_dir)
    comp = _pick_component(model, component)
    cfg_dir = os.path.join(model.path, comp) if comp else model.path
    config = _read_json(os.path.join(cfg_dir, "config.json"))
    arch = arch or _detect_arch(config)
    rename = (lambda n: n) if arch == "diffusers" else _llama_names(gguf, arch, config, model.path)
    out_path, parent = _check_output(out_path, overwrite)
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
        entry: Dict[str, Any] = {"q": q, "name": rename(name), "shape": shape}
        if not t.quantized:
            if t.dtype not in ("F32", "F16", "BF16", "F64"):
                raise ConfigurationError(f"{model.path}: tensor {name!r} is {t.dtype}; GGUF export writes float "
                                         f"tensors only")
            small = len(shape) <= 1 or numel <= SMALL_TENSOR
            entry["kind"] = "float"
            entry["type"] = "F32" if small or t.dtype in ("F32", "F64") else t.dtype
        else:
            ggml_type = t.info.get("ggml_type")  # from the metadata columns: no codes read while planning
            equalized = bool(t.info.get("equalized"))
            if ggml_type and not equalized and len(shape) == 2:
                entry["kind"], entry["type"] = "copy", ggml_type
            elif ggml_type and not equalized:
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
    _refuse(model.path, refused, "layers are not in a ggml block type GGUF can hold as stored",
            "Quantize with a ggml scheme (scheme='q4_k', ...; enable_spatial=False keeps layers unequalized), or "
            "pass requantize='q4_k' (decode and encode again)")

    types = {e["type"]: getattr(gguf.GGMLQuantizationType, e["type"]) for e in plan}
    tmp = f"{out_path}.tmp-{os.getpid()}"
    # consumers of diffusers-named files read the tensors only; llama.cpp reads the architecture's keys
    writer = gguf.GGUFWriter(tmp, arch=arch)
    result: Dict[str, Any] = {"path": out_path, "component": comp, "arch": arch, "tensors": len(plan), "types": {},
                              "copied": 0, "requantized": [], "dequantized": []}
    try:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        if arch in LM_ARCHS:
            _add_lm_metadata(gguf, writer, config, cfg_dir, tokenizer_pre)
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
    result["config_dir"] = cfg_dir if config is not None else None
    result["bytes"] = os.path.getsize(out_path)
    result["seconds"] = time.perf_counter() - t0
    return result


def _llama_names(gguf: Any, arch: str, config: Optional[Dict[str, Any]], where: str):
    """Source (Hugging Face) tensor name -> llama.cpp's, by gguf-py's own name map of the arch."""
    if not config or "num_hidden_layers" not in config:
        raise ConfigurationError(f"{where}: arch {arch!r} needs the model's config.json (num_hidden_layers, "
                                 f"hidden_size, ...) beside its weights")
    table = gguf.get_tensor_name_map(getattr(gguf.MODEL_ARCH, arch.upper()), int(config["num_hidden_layers"]))

    def rename(name: str) -> str:
        mapped = table.get_name(name, try_suffixes=(".weight", ".bias"))
        if mapped is None:
            raise ConfigurationError(f"{where}: tensor {name!r} has no llama.cpp name in the {arch!r} architecture")
        return mapped

    return rename


def _add_lm_metadata(gguf: Any, writer: Any, config: Dict[str, Any], cfg_dir: str, tokenizer_pre: str) -> None:
    """llama.cpp's keys for a diffusion LM: hyper-parameters, non-causal attention, the BPE
    tokenizer of tokenizer.json (tokens by id, types, merges, special ids) and the mask token."""
    def need(key: str) -> Any:
        if key not in config:
            raise ConfigurationError(f"{cfg_dir}/config.json has no {key!r} (llama.cpp needs it)")
        return config[key]

    writer.add_context_length(int(config.get("max_position_embeddings", 4096)))
    writer.add_embedding_length(int(need("hidden_size")))
    writer.add_block_count(int(need("num_hidden_layers")))
    writer.add_feed_forward_length(int(need("intermediate_size")))
    heads = int(need("num_attention_heads"))
    writer.add_head_count(heads)
    writer.add_head_count_kv(int(config.get("num_key_value_heads", heads)))
    # transformers 4 writes rope_theta at the top level, 5 inside rope_parameters
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in (None, "default"):
        raise ConfigurationError(f"{cfg_dir}/config.json: RoPE scaling {kind!r} is not written to GGUF yet")
    writer.add_rope_freq_base(float(config.get("rope_theta", rope.get("rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(float(config.get("rms_norm_eps", 1e-6)))
    writer.add_causal_attention(False)
    tok = _read_json(os.path.join(cfg_dir, "tokenizer.json"))
    if tok is None or (tok.get("model") or {}).get("type") != "BPE":
        raise ConfigurationError(f"{cfg_dir}: a diffusion LM's GGUF needs its BPE tokenizer.json beside the weights")
    vocab: Dict[str, int] = dict(tok["model"]["vocab"])
    added = {a["content"]: a for a in tok.get("added_tokens", [])}
    for content, a in added.items():
        vocab[content] = int(a["id"])
    n = max(int(config.get("vocab_size", 0)), max(vocab.values()) + 1)
    by_id = {i: t for t, i in vocab.items()}
    tokens, types = [], []
    for i in range(n):
        t = by_id.get(i)
        if t is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif t in added:
            tokens.append(t)
            types.append(gguf.TokenType.CONTROL if added[t].get("special") else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(t)
            types.append(gguf.TokenType.NORMAL)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer_pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    special = gguf.SpecialVocab(cfg_dir, load_merges=True, n_vocab=n)
    if not special.merges:
        raise ConfigurationError(f"{cfg_dir}/tokenizer.json has no merges (llama.cpp's BPE tokenizer needs them)")
    mask = config.get("mask_token_id")
    if mask is not None:  # the model's own (Dream's config.json), over a tokenizer's
        special.special_token_ids["mask"] = int(mask)
    special.add_to_gguf(writer, quiet=True)


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


# ---------------------------------------------------------------------------------------------
# compressed-tensors
# ---------------------------------------------------------------------------------------------

def export_compressed_tensors(quant_dir: PathLike, out_dir: PathLike, component: Optional[str] = None,
                              overwrite: bool = False) -> Dict[str, Any]:
    """Writes one component of the quantized model at ``quant_dir`` as a compressed-tensors
    checkpoint directory (``format: pack-quantized``): every layer in symmetric affine codes of 2
    to 8 bits becomes ``<layer>.weight_packed`` (int32: the codes ``q + 2^(bits-1)``, packed
    little-endian along the row -- our code stream itself), ``<layer>.weight_scale`` (float32, per
    group or per row, so that compressed-tensors' ``q * scale`` gives our weight exactly) and
    ``<layer>.weight_shape``; kept tensors are written as they are; config.json gets a
    ``quantization_config`` with one config group per (bits, group size) naming its layers. Other
    quantized layers (asymmetric codes, whose zero points are values, not integer codes; ggml and
    entropy schemes; rotated or equalized layers; rows whose codes do not fill whole int32 words)
    are an error naming them. Returns ``path``, ``component``, ``tensors``, ``packed``, ``groups``
    (the config groups), ``bytes`` and ``seconds``."""
    import json
    import shutil
    import tempfile

    from .safetensors_writer import write_safetensors

    t0 = time.perf_counter()
    model = load(quant_dir)
    comp = _pick_component(model, component)
    out_dir, parent = _check_output(out_dir, overwrite)
    src_dir = os.path.join(model.path, comp) if comp else model.path
    if not os.path.exists(os.path.join(src_dir, "config.json")):
        raise ConfigurationError(f"{src_dir}: no config.json (compressed-tensors keeps its quantization_config there)")
    prefix = len(comp) + 1 if comp else 0

    specs: List[Any] = []
    makers: Dict[str, Any] = {}
    refused: List[str] = []
    groups: Dict[str, Dict[str, Any]] = {}
    packed_layers = 0
    for q in model.tensor_names(comp):
        t = model[q]
        name = q[prefix:]
        shape = [int(d) for d in t.shape]
        if not t.quantized:
            if t.dtype not in ("F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"):
                raise ConfigurationError(f"{model.path}: tensor {name!r} is {t.dtype}; not written by this export")
            specs.append((name, t.dtype, shape))
            makers[name] = (lambda t=t: t.numpy())
            continue
        info = t.info  # the metadata columns: no codes read while planning
        bits, gsize = info.get("bits"), info.get("group_size") or 0
        rows, cols = (shape[0], int(np.prod(shape[1:]))) if len(shape) >= 2 else (1, shape[0] if shape else 1)
        why = None
        if info.get("scheme_kind") != "affine":
            why = f"scheme {t.scheme}"
        elif not info.get("symmetric"):
            why = "asymmetric codes (zero points are values, not integer codes)"
        elif info.get("equalized"):
            why = "equalized (its stored weight needs an input scale)"
        elif t.info.get("rotation", 1) > 1:
            why = "rotated"
        elif len(shape) != 2 or not name.endswith(".weight"):
            why = "not a 2-D layer weight"
        elif (cols * bits) % 32:
            why = f"rows of {cols} {bits}-bit codes do not fill whole int32 words"
        if why:
            refused.append(f"{name} ({why})")
            continue
        layer = name[: -len(".weight")]
        key = f"int{bits}_{'g' + str(gsize) if gsize else 'channel'}"
        g = groups.setdefault(key, {"targets": [], "weights": {
            "num_bits": bits, "type": "int", "symmetric": True, "dynamic": False,
            "strategy": "group" if gsize else "channel", "group_size": gsize or None},
            "input_activations": None, "output_activations": None})
        g["targets"].append(layer)
        words = cols * bits // 32
        ngroups = cols // gsize if gsize else 1
        specs += [(f"{layer}.weight_packed", "I32", [rows, words]), (f"{layer}.weight_scale", "F32", [rows, ngroups]),
                  (f"{layer}.weight_shape", "I64", [2])]
        makers[f"{layer}.weight_packed"] = (lambda t=t, rows=rows, words=words: np.frombuffer(
            t.packed().codes, dtype="<i4").reshape(rows, words))
        makers[f"{layer}.weight_scale"] = (lambda t=t, rows=rows, ngroups=ngroups: t.packed().scales.astype(
            np.float32).reshape(rows, ngroups))
        makers[f"{layer}.weight_shape"] = (lambda rows=rows, cols=cols: np.array([rows, cols], np.int64))
        packed_layers += 1
    _refuse(model.path, refused, "quantized layers cannot be written as compressed-tensors pack-quantized",
            "Quantize with scheme='affine', symmetric=True, rotate=False and enable_spatial=False")

    with open(os.path.join(src_dir, "config.json"), encoding="utf-8") as f:
        config = json.load(f)
    config["quantization_config"] = {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
        "config_groups": {f"group_{i}": g for i, (_, g) in enumerate(sorted(groups.items()))}, "ignore": [],
        "kv_cache_scheme": None}
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir.rstrip(os.sep))}.arrowquant-tmp-", dir=parent)
    try:
        for f in os.listdir(src_dir):  # the component's other files (tokenizer, generation config, ...)
            full = os.path.join(src_dir, f)
            if os.path.isfile(full) and f != "config.json" and not f.endswith((".safetensors", ".parquet")) \
                    and f not in ("manifest.json", "model.safetensors.index.json"):
                shutil.copy2(full, os.path.join(tmp, f))
        with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, indent=2)
        size = write_safetensors(os.path.join(tmp, "model.safetensors"), specs, lambda n: makers[n](),
                                 metadata={"format": "pt"})
        if os.path.exists(out_dir):
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {"path": out_dir, "component": comp, "tensors": len(specs), "packed": packed_layers,
            "groups": {k: len(g["targets"]) for k, g in groups.items()}, "bytes": size,
            "seconds": time.perf_counter() - t0}
