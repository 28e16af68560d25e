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
stream from the model one at a time, and a big tensor a block of rows at a time (one stored
piece in memory).
"""

from __future__ import annotations

import os
import time
from typing import Any, Dict, Iterator, List, Optional, Union

import numpy as np

from . import _core
from .errors import ConfigurationError, ModelFormatError
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
# UNets under their original (LDM / CompVis) checkpoint names, `general.architecture` as ComfyUI-GGUF
# spells it; stable-diffusion.cpp, ComfyUI-GGUF and diffusers' single-file loader read these names
ORIGINAL_ARCHS = ("sd1", "sdxl")
ORIGINAL_PREFIX = "model.diffusion_model."
# DiTs under their original (single-file) names, fused where the original fuses: Flux's
# double_blocks.N.img_attn.qkv = rows of to_q, to_k, to_v; single_blocks.N.linear1 = to_q, to_k,
# to_v, proj_mlp; SD3's joint_blocks.N.x_block.attn.qkv; final_layer.adaLN_modulation.1 =
# norm_out.linear with its halves swapped
DIT_ARCHS = ("flux", "sd3")
ARCHS = ("diffusers",) + LM_ARCHS + ORIGINAL_ARCHS + DIT_ARCHS


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
                arch: Optional[str] = None, tokenizer_pre: str = "qwen2",
                packed_convs: bool = False) -> Dict[str, Any]:
    """Writes one component of the quantized model at ``quant_dir`` (default: the denoiser) to the
    GGUF file ``out_path``. ``arch``: ``"diffusers"`` keeps the source tensor names (image, video
    and audio denoisers); ``"sd1"`` or ``"sdxl"`` writes a UNet2DConditionModel under the original
    checkpoint's names (``model.diffusion_model.input_blocks.1.0.in_layers.2.weight``, ...) with
    that ``general.architecture``, as stable-diffusion.cpp, ComfyUI-GGUF and diffusers'
    single-file loader read them; ``"flux"`` a FluxTransformer2DModel in the single-file (Black
    Forest Labs) layout ComfyUI-GGUF requires, with ``img_attn.qkv``, ``txt_attn.qkv`` and
    ``linear1`` joined from their diffusers parts (as stored when the parts share a ggml type; else
    refused unless ``requantize``); ``"sd3"`` an SD3Transformer2DModel in its single-file layout
    (``joint_blocks``, ``x_block.attn.qkv``, ...); ``"dream"`` or ``"llada"`` writes a diffusion LM
    as llama.cpp reads it
    (its tensor names, hyper-parameters from config.json, non-causal attention, the tokenizer of
    tokenizer.json with ``tokenizer_pre`` as its pre-tokenizer, the mask token id); None detects
    it from config.json's ``model_type`` / ``architectures``. ``packed_convs`` (sd1/sdxl): ggml
    convolution weights are written as their stored bytes, a 2-D tensor of rows ``in*kh*kw``, with
    their shape in ``comfy.gguf.orig_shape.<name>``, which ComfyUI-GGUF's loader applies (other
    consumers need the default: dense F16 convolutions). Returns ``path``, ``component``,
    ``arch``, ``tensors``, ``bytes``, ``seconds``, ``types`` (tensors per GGUF type), ``copied``
    (ggml layers written as stored), ``requantized`` and ``dequantized`` (the names), and
    ``config_dir`` (the component's directory holding config.json, for loaders that need it, or
    None)."""
    gguf = _gguf()
    if requantize is not None and requantize not in GGML_EXPORT_TYPES:
        raise ConfigurationError(f"requantize must be None or a ggml type ({', '.join(GGML_EXPORT_TYPES)}); "
                                 f"got {requantize!r}")
    if arch is not None and arch not in ARCHS:
        raise ConfigurationError(f"arch must be None (detect) or one of {', '.join(ARCHS)}; got {arch!r}")
    if packed_convs and arch not in ORIGINAL_ARCHS:
        raise ConfigurationError(f"packed_convs is ComfyUI-GGUF's layout of UNet convolutions: it needs arch "
                                 f"'sd1' or 'sdxl'; got arch {arch!r}")
    t0 = time.perf_counter()
    model = load(quant_dir)
    comp = _pick_component(model, component)
    cfg_dir = os.path.join(model.path, comp) if comp else model.path
    config = _read_json(os.path.join(cfg_dir, "config.json"))
    arch = arch or _detect_arch(config)
    out_path, parent = _check_output(out_path, overwrite)
    prefix = f"{comp}/" if comp else ""
    names = [q[len(prefix):] for q in model.tensor_names(comp)]
    if arch in DIT_ARCHS:  # several stored tensors to one written tensor
        layout = _dit_original_layout(arch, names, cfg_dir)
    else:  # one to one
        if arch == "diffusers":
            rename = lambda n: n  # noqa: E731
        elif arch in ORIGINAL_ARCHS:
            rename = _unet_original_names(config, cfg_dir)
        else:
            rename = _llama_names(gguf, arch, config, model.path)
        layout = [(rename(n), [n], False) for n in names]

    # Plan every tensor before writing anything: the errors name every layer at once.
    plan: List[Dict[str, Any]] = []
    refused: List[str] = []
    for out_name, sources, swap in layout:
        parts = [_plan_part(model, prefix + n, n, requantize, packed_convs, refused) for n in sources]
        if any(p is None for p in parts):
            continue
        entry = _merge_parts(model.path, out_name, parts, swap, requantize, refused)
        if entry is not None:
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
                rows, cols = e["shape"][0], int(np.prod(e["shape"][1:]))
                byte_shape = (rows, cols // block * nbytes)
                e["nbytes"] = rows * byte_shape[1]
                writer.add_tensor_info(e["name"], byte_shape, np.dtype(np.uint8), e["nbytes"], raw_dtype=gtype)
                if len(e["shape"]) > 2:  # packed convolution: ComfyUI-GGUF restores the shape
                    writer.add_array(f"comfy.gguf.orig_shape.{e['name']}", list(e["shape"]))
            else:
                np_dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float32}[e["type"]]
                numel = int(np.prod(e["shape"])) if e["shape"] else 1
                e["nbytes"] = numel * np.dtype(np_dtype).itemsize
                writer.add_tensor_info(e["name"], e["shape"] or (1,), np.dtype(np_dtype), e["nbytes"],
                                       raw_dtype=gtype if e["type"] == "BF16" else None)
            result["types"][e["type"]] = result["types"].get(e["type"], 0) + 1
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for e in plan:
            writer.write_tensor_data(_TensorData(model, e))
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
    if result["dequantized"]:
        import warnings

        first = result["dequantized"][0]
        warnings.warn(f"{out_path}: {len(result['dequantized'])} tensors of more than two dimensions (convolution "
                      f"weights, positional tables) in ggml types were decoded and written as F16 (e.g. {first}): "
                      f"they keep their quantization error at float16 size. For consumers that run convolutions "
                      f"from F16 (stable-diffusion.cpp, diffusers) quantize with convolutions kept "
                      f"(skip_patterns); for ComfyUI-GGUF pass packed_convs=True", stacklevel=2)
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


# diffusers ResnetBlock2D -> the original ResBlock
_RESNET_ORIGINAL = {"norm1": "in_layers.0", "conv1": "in_layers.2", "norm2": "out_layers.0",
                    "conv2": "out_layers.3", "time_emb_proj": "emb_layers.1", "conv_shortcut": "skip_connection"}


def _unet_original_names(config: Optional[Dict[str, Any]], where: str):
    """diffusers UNet2DConditionModel tensor name -> the original (LDM) checkpoint's, from the
    block layout in config.json: level ``i`` of the down path holds ``input_blocks``
    ``1 + i*(L+1) .. i*(L+1) + L`` (resnet ``.0``, its attention ``.1``) and its downsampler at
    ``1 + i*(L+1) + L``; level ``i`` of the up path ``output_blocks`` ``i*(L+1) ..`` with the upsampler
    after the attention of the level's last block. Transformer internals keep their names."""
    if not config or config.get("_class_name") not in (None, "UNet2DConditionModel"):
        raise ConfigurationError(f"{where}: original checkpoint names are those of a UNet2DConditionModel; "
                                 f"config.json has {config and config.get('_class_name')!r}")
    lpb = config.get("layers_per_block", 2)
    if not isinstance(lpb, int):
        raise ConfigurationError(f"{where}: layers_per_block {lpb!r} differs per level; the original layout has "
                                 f"one count")
    down, up = list(config.get("down_block_types", [])), list(config.get("up_block_types", []))
    mid = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if not down or len(down) != len(up) or mid != "UNetMidBlock2DCrossAttn":
        raise ConfigurationError(f"{where}: no original layout for down blocks {down}, up blocks {up}, mid block "
                                 f"{mid!r}")
    blocks: Dict[str, tuple] = {  # diffusers prefix -> (original prefix, is a resnet)
        "time_embedding.linear_1.": ("time_embed.0.", False), "time_embedding.linear_2.": ("time_embed.2.", False),
        "add_embedding.linear_1.": ("label_emb.0.0.", False), "add_embedding.linear_2.": ("label_emb.0.2.", False),
        "conv_in.": ("input_blocks.0.0.", False), "conv_norm_out.": ("out.0.", False), "conv_out.": ("out.2.", False),
        "mid_block.resnets.0.": ("middle_block.0.", True), "mid_block.attentions.0.": ("middle_block.1.", False),
        "mid_block.resnets.1.": ("middle_block.2.", True)}
    for i in range(len(down)):
        for j in range(lpb):
            k = 1 + i * (lpb + 1) + j
            blocks[f"down_blocks.{i}.resnets.{j}."] = (f"input_blocks.{k}.0.", True)
            blocks[f"down_blocks.{i}.attentions.{j}."] = (f"input_blocks.{k}.1.", False)
        blocks[f"down_blocks.{i}.downsamplers.0.conv."] = (f"input_blocks.{1 + i * (lpb + 1) + lpb}.0.op.", False)
    for i, kind in enumerate(up):
        for j in range(lpb + 1):
            k = i * (lpb + 1) + j
            blocks[f"up_blocks.{i}.resnets.{j}."] = (f"output_blocks.{k}.0.", True)
            blocks[f"up_blocks.{i}.attentions.{j}."] = (f"output_blocks.{k}.1.", False)
        last = i * (lpb + 1) + lpb
        blocks[f"up_blocks.{i}.upsamplers.0.conv."] = (
            f"output_blocks.{last}.{2 if 'CrossAttn' in kind else 1}.conv.", False)

    def rename(name: str) -> str:
        head = name
        while True:  # the longest prefix of the name that is a block (every prefix ends in ".")
            cut = head.rfind(".", 0, len(head) - 1)
            head = name[:cut + 1] if cut >= 0 else ""
            if not head or head in blocks:
                break
        if not head:
            raise ConfigurationError(f"{where}: tensor {name!r} has no name in the original UNet layout")
        original, resnet = blocks[head]
        rest = name[len(head):]
        if resnet:
            layer, _, param = rest.partition(".")
            if layer not in _RESNET_ORIGINAL:
                raise ConfigurationError(f"{where}: tensor {name!r}: no original name for resnet part {layer!r}")
            rest = f"{_RESNET_ORIGINAL[layer]}.{param}"
        return ORIGINAL_PREFIX + original + rest

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


def _plan_part(model: Any, q: str, name: str, requantize: Optional[str], packed_convs: bool,
               refused: List[str]) -> Optional[Dict[str, Any]]:
    """How one stored tensor is written: kind (float, copy, dequantize, requantize) and GGUF type,
    from the metadata columns (no codes read while planning); None (and a line in ``refused``) if
    it cannot be written as asked."""
    t = model[q]
    shape = tuple(int(d) for d in t.shape)
    part: Dict[str, Any] = {"q": q, "name": name, "shape": shape, "dtype": t.dtype}
    if not t.quantized:
        if t.dtype not in ("F32", "F16", "BF16", "F64"):
            raise ConfigurationError(f"{model.path}: tensor {name!r} is {t.dtype}; GGUF export writes float "
                                     f"tensors only")
        part["kind"], part["type"] = "float", None  # the type follows the written tensor's size
        return part
    ggml_type = t.info.get("ggml_type")
    equalized = bool(t.info.get("equalized"))
    if ggml_type and not equalized and (len(shape) == 2 or (packed_convs and len(shape) > 2)):
        part["kind"], part["type"] = "copy", ggml_type
    elif ggml_type and not equalized:
        part["kind"], part["type"] = "dequantize", "F16"
    elif requantize is not None:
        part["kind"], part["type"] = ("requantize", None) if len(shape) == 2 else ("dequantize", "F16")
    else:
        why = "equalized (its stored weight needs an input scale)" if equalized else f"scheme {t.scheme}"
        refused.append(f"{name} ({why})")
        return None
    return part


def _merge_parts(path: str, out_name: str, parts: List[Dict[str, Any]], swap: bool,
                 requantize: Optional[str], refused: List[str]) -> Optional[Dict[str, Any]]:
    """The written tensor: its parts' rows one after the other (a single part: the tensor itself),
    the halves of its rows exchanged if ``swap``. Parts in one ggml type are concatenated as
    stored (a row's blocks are independent of other rows); parts in different types are
    encoded again as ``requantize``, or refused."""
    rest = {p["shape"][1:] for p in parts}
    if len(rest) != 1:
        raise ConfigurationError(f"{path}: {out_name!r} joins {[p['name'] for p in parts]} whose shapes "
                                 f"{[p['shape'] for p in parts]} differ beyond the first dimension")
    shape = (sum(p["shape"][0] for p in parts),) + rest.pop() if parts[0]["shape"] else ()
    if swap and (len(shape) == 0 or shape[0] % 2):
        raise ConfigurationError(f"{path}: {out_name!r} exchanges the halves of {shape[0] if shape else 0} rows")
    entry: Dict[str, Any] = {"name": out_name, "parts": [p["q"] for p in parts], "shape": shape, "swap": swap}
    kinds = {(p["kind"], p["type"]) for p in parts}
    numel = int(np.prod(shape)) if shape else 1
    if kinds == {("float", None)}:
        dtypes = {p["dtype"] for p in parts}
        small = len(shape) <= 1 or numel <= SMALL_TENSOR
        entry["kind"] = "float"
        entry["type"] = "F32" if small or len(dtypes) > 1 or dtypes & {"F32", "F64"} else dtypes.pop()
    elif len(kinds) == 1 and next(iter(kinds))[0] != "requantize":
        entry["kind"], entry["type"] = next(iter(kinds))
    elif requantize is not None and len(shape) == 2:
        entry["kind"], entry["type"] = "requantize", _requantize_type(path, out_name, shape[1], requantize)
    else:
        stored = ", ".join(f"{p['name']} {p['type'] or p['dtype']}" for p in parts)
        refused.append(f"{out_name} (joins {stored}: one GGUF tensor holds one type)")
        return None
    return entry


def _row_ranges(rows: List[int], swap: bool) -> List[tuple]:
    """(part, first row, end row) in the order the written tensor holds them: the parts' rows one
    after the other, and with ``swap`` the second half of all of them before the first."""
    total = sum(rows)
    order = [(total // 2, total), (0, total // 2)] if swap else [(0, total)]
    out, starts = [], np.cumsum([0] + rows)
    for g0, g1 in order:
        for i, n in enumerate(rows):
            a, b = max(g0, int(starts[i])), min(g1, int(starts[i]) + n)
            if a < b:
                out.append((i, a - int(starts[i]), b - int(starts[i])))
    return out


def _tensor_blocks(model: Any, e: Dict[str, Any]) -> Iterator[np.ndarray]:
    """The written tensor's data, a block of rows at a time in file order, holding one stored
    piece: ggml layers and bfloat16 tensors as their stored bytes, the others decoded (and
    encoded again for ``requantize``: a row's blocks do not depend on other rows, so encoding
    by blocks of rows writes the bytes a whole-tensor encoding would)."""
    kind, parts = e["kind"], [model[q] for q in e["parts"]]
    scheme = next((k for k, v in GGML_EXPORT_TYPES.items() if v == e["type"]), None)
    for i, r0, r1 in _row_ranges([t.shape[0] if t.shape else 1 for t in parts], e["swap"]):
        t = parts[i]
        if kind == "copy" or e["type"] == "BF16":
            yield from t.stored_rows(r0, r1)
            continue
        for w in t.float_rows(r0, r1):
            if kind == "requantize":
                yield np.frombuffer(_core.encode_array(w, 0, scheme=scheme, name=e["name"]).codes, dtype=np.uint8)
            else:
                yield w.astype(np.float16 if e["type"] == "F16" else np.float32)


class _TensorData:
    """One tensor's bytes for ``GGUFWriter.write_tensor_data``, which takes a numpy array and uses
    its ``nbytes`` and ``tofile``: this object gives the same two, writing the tensor a block
    of rows at a time, so no big tensor is ever whole in memory (a 262k-row Q8_0 embedding is
    1 GB)."""

    def __init__(self, model: Any, e: Dict[str, Any]) -> None:
        self.model, self.entry, self.nbytes = model, e, e["nbytes"]

    def tofile(self, f: Any) -> None:
        written = 0
        for block in _tensor_blocks(self.model, self.entry):
            block = np.ascontiguousarray(block)
            block.tofile(f)
            written += block.nbytes
        if written != self.nbytes:
            raise ModelFormatError(f"{self.model.path}: tensor {self.entry['name']!r}: its stored data make "
                                   f"{written} bytes where its type and shape make {self.nbytes}")


# DiT name maps. Modules: diffusers module -> (original module, position among the parts it joins
# with); full names: diffusers tensor -> original tensor (where the parameter is renamed too).
_FLUX_TOP = {"x_embedder": ("img_in", 0), "context_embedder": ("txt_in", 0),
             "time_text_embed.timestep_embedder.linear_1": ("time_in.in_layer", 0),
             "time_text_embed.timestep_embedder.linear_2": ("time_in.out_layer", 0),
             "time_text_embed.text_embedder.linear_1": ("vector_in.in_layer", 0),
             "time_text_embed.text_embedder.linear_2": ("vector_in.out_layer", 0),
             "time_text_embed.guidance_embedder.linear_1": ("guidance_in.in_layer", 0),
             "time_text_embed.guidance_embedder.linear_2": ("guidance_in.out_layer", 0),
             "norm_out.linear": ("final_layer.adaLN_modulation.1", 0), "proj_out": ("final_layer.linear", 0)}
_FLUX_DOUBLE = {"norm1.linear": ("img_mod.lin", 0), "norm1_context.linear": ("txt_mod.lin", 0),
                "attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1),
                "attn.to_v": ("img_attn.qkv", 2), "attn.add_q_proj": ("txt_attn.qkv", 0),
                "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2),
                "attn.to_out.0": ("img_attn.proj", 0), "attn.to_add_out": ("txt_attn.proj", 0),
                "ff.net.0.proj": ("img_mlp.0", 0), "ff.net.2": ("img_mlp.2", 0),
                "ff_context.net.0.proj": ("txt_mlp.0", 0), "ff_context.net.2": ("txt_mlp.2", 0)}
_FLUX_DOUBLE_FULL = {"attn.norm_q.weight": "img_attn.norm.query_norm.scale",
                     "attn.norm_k.weight": "img_attn.norm.key_norm.scale",
                     "attn.norm_added_q.weight": "txt_attn.norm.query_norm.scale",
                     "attn.norm_added_k.weight": "txt_attn.norm.key_norm.scale"}
_FLUX_SINGLE = {"norm.linear": ("modulation.lin", 0), "attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1),
                "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3), "proj_out": ("linear2", 0)}
_FLUX_SINGLE_FULL = {"attn.norm_q.weight": "norm.query_norm.scale", "attn.norm_k.weight": "norm.key_norm.scale"}
_SD3_TOP = {"pos_embed.proj": ("x_embedder.proj", 0), "context_embedder": ("context_embedder", 0),
            "time_text_embed.timestep_embedder.linear_1": ("t_embedder.mlp.0", 0),
            "time_text_embed.timestep_embedder.linear_2": ("t_embedder.mlp.2", 0),
            "time_text_embed.text_embedder.linear_1": ("y_embedder.mlp.0", 0),
            "time_text_embed.text_embedder.linear_2": ("y_embedder.mlp.2", 0),
            "norm_out.linear": ("final_layer.adaLN_modulation.1", 0), "proj_out": ("final_layer.linear", 0)}
_SD3_BLOCK = {"norm1.linear": ("x_block.adaLN_modulation.1", 0),
              "norm1_context.linear": ("context_block.adaLN_modulation.1", 0),
              "attn.to_q": ("x_block.attn.qkv", 0), "attn.to_k": ("x_block.attn.qkv", 1),
              "attn.to_v": ("x_block.attn.qkv", 2), "attn.add_q_proj": ("context_block.attn.qkv", 0),
              "attn.add_k_proj": ("context_block.attn.qkv", 1), "attn.add_v_proj": ("context_block.attn.qkv", 2),
              "attn.norm_q": ("x_block.attn.ln_q", 0), "attn.norm_k": ("x_block.attn.ln_k", 0),
              "attn.norm_added_q": ("context_block.attn.ln_q", 0), "attn.norm_added_k": ("context_block.attn.ln_k", 0),
              "attn.to_out.0": ("x_block.attn.proj", 0), "attn.to_add_out": ("context_block.attn.proj", 0),
              "attn2.to_q": ("x_block.attn2.qkv", 0), "attn2.to_k": ("x_block.attn2.qkv", 1),
              "attn2.to_v": ("x_block.attn2.qkv", 2), "attn2.norm_q": ("x_block.attn2.ln_q", 0),
              "attn2.norm_k": ("x_block.attn2.ln_k", 0), "attn2.to_out.0": ("x_block.attn2.proj", 0),
              "ff.net.0.proj": ("x_block.mlp.fc1", 0), "ff.net.2": ("x_block.mlp.fc2", 0),
              "ff_context.net.0.proj": ("context_block.mlp.fc1", 0), "ff_context.net.2": ("context_block.mlp.fc2", 0)}
# arch -> (top modules, top full names, {diffusers block list: (original list, modules, full names)},
#          original modules whose rows' halves are exchanged, the same in the last block only)
_DIT_LAYOUTS = {
    "flux": (_FLUX_TOP, {}, {"transformer_blocks": ("double_blocks", _FLUX_DOUBLE, _FLUX_DOUBLE_FULL),
                             "single_transformer_blocks": ("single_blocks", _FLUX_SINGLE, _FLUX_SINGLE_FULL)},
             {"final_layer.adaLN_modulation.1"}, set()),
    # SD3's last block has no context output: diffusers' AdaLayerNormContinuous orders its
    # modulation scale, shift; the original shift, scale
    "sd3": (_SD3_TOP, {"pos_embed.pos_embed": "pos_embed"}, {"transformer_blocks": ("joint_blocks", _SD3_BLOCK, {})},
            {"final_layer.adaLN_modulation.1"}, {"context_block.adaLN_modulation.1"}),
}


def _dit_original_layout(arch: str, names: List[str], where: str) -> List[tuple]:
    """(original name, diffusers names whose rows it joins, swap halves) for a Flux or SD3
    transformer in its single-file layout, each name prefixed ``model.diffusion_model.``."""
    import re

    top, top_full, block_lists, swap_top, swap_last = _DIT_LAYOUTS[arch]
    lists = "|".join(re.escape(k) for k in block_lists)
    last = {k: max((int(m.group(2)) for n in names if (m := re.match(rf"({re.escape(k)})\.(\d+)\.", n))),
                   default=-1) for k in block_lists}
    fused: Dict[str, Dict[int, str]] = {}
    want: Dict[str, int] = {}
    swap: Dict[str, bool] = {}
    order: List[str] = []

    def put(out: str, pos: int, src: str, parts: int, exchange: bool) -> None:
        if out not in fused:
            fused[out] = {}
            order.append(out)
        fused[out][pos] = src
        want[out], swap[out] = parts, exchange

    parts_of: Dict[str, int] = {}  # original module -> how many diffusers modules it joins
    for table in [top] + [modules for _, modules, _ in block_lists.values()]:
        for original, pos in table.values():
            parts_of[original] = max(parts_of.get(original, 0), pos + 1)

    for n in names:
        m = re.match(rf"({lists})\.(\d+)\.(.+)$", n)
        if m:
            head_name, modules, full = block_lists[m.group(1)]
            head, rest = f"{head_name}.{m.group(2)}.", m.group(3)
            in_last = int(m.group(2)) == last[m.group(1)]
        else:
            modules, full, head, rest, in_last = top, top_full, "", n, False
        if rest in full:
            put(head + full[rest], 0, n, 1, False)
            continue
        module, _, param = rest.rpartition(".")
        if module not in modules or param not in ("weight", "bias"):
            raise ConfigurationError(f"{where}: tensor {n!r} has no name in the original {arch} layout")
        original, pos = modules[module]
        exchange = (not head and original in swap_top) or (bool(head) and in_last and original in swap_last)
        put(f"{head}{original}.{param}", pos, n, parts_of[original], exchange)

    layout = []
    for out in order:
        got = fused[out]
        if sorted(got) != list(range(want[out])):
            raise ConfigurationError(f"{where}: {out!r} joins {want[out]} tensors; the model has "
                                     f"{sorted(got.values())}")
        layout.append((ORIGINAL_PREFIX + out, [got[i] for i in range(want[out])], swap[out]))
    return layout


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
    last: Dict[str, Any] = {}

    def codes_of(t: Any, words: int) -> Iterator[np.ndarray]:
        """The layer's codes as int32 words, a stored piece at a time; its scales (small) are kept
        for weight_scale, written next: each piece is read once."""
        last.clear()
        last["tensor"], last["scales"] = t, []
        for p in t.packed_pieces():
            last["scales"].append(p.scales)
            yield np.frombuffer(p.codes, dtype="<i4").reshape(p.shape[0], words)

    def scales_of(t: Any, rows: int, ngroups: int) -> np.ndarray:
        if last.get("tensor") is not t:  # written out of order: read them again
            last["tensor"], last["scales"] = t, [p.scales for p in t.packed_pieces()]
        return np.concatenate(last["scales"]).astype(np.float32).reshape(rows, ngroups)

    packed_layers = 0
    for q in model.tensor_names(comp):
        t = model[q]
        name = q[prefix:]
        shape = [int(d) for d in t.shape]
        if not t.quantized:
            if t.dtype not in ("F32", "F16", "BF16", "F64", "I64", "I32", "I16", "I8", "U8", "BOOL"):
                raise ConfigurationError(f"{model.path}: tensor {name!r} is {t.dtype}; not written by this export")
            specs.append((name, t.dtype, shape))
            # floats a block of rows at a time (exact in their own dtype: bf16 -> f32 -> bf16)
            makers[name] = (lambda t=t: t.float_rows() if t.dtype in ("F32", "F16", "BF16", "F64") else t.numpy())
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
        makers[f"{layer}.weight_packed"] = (lambda t=t, words=words: codes_of(t, words))
        makers[f"{layer}.weight_scale"] = (lambda t=t, rows=rows, ngroups=ngroups: scales_of(t, rows, ngroups))
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
