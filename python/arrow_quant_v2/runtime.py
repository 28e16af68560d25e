"""Running quantized models in PyTorch with their weights kept packed.

>>> from arrow_quant_v2 import runtime
>>> pipe = runtime.load_pipeline("sd-int4/")          # a diffusers pipeline
>>> image = pipe("a lighthouse at dusk").images[0]

Every quantized Linear and Conv1d/2d/3d keeps its stored bytes (Q4_K blocks, affine codes and
scales, ...) and decodes them before each call, with the same C++ decoder ``load(...).numpy()``
uses, straight into a scratch tensor in the dtype of the call's input, on torch's number of
threads; then the dense op runs on that tensor. So the model lives in memory at its stored size,
plus one scratch buffer the size of its largest layer (per dtype). Module classes do not change:
only the instance's ``forward`` and its ``weight`` are replaced (``weight`` becomes a
placeholder of the right shape, dtype and device whose values are NaN, so code that reads
weights directly fails loudly; ``state_dict()`` returns the decoded values).

Embeddings keep their bytes too and decode only the rows looked up. Entropy-coded layers cannot
be decoded fast enough for every call and are decoded once at load (a warning says how many
bytes that costs); so are quantized weights of other layer kinds (ConvTranspose, ...).

With activation parameters in the model (quantized with ``activation_bits`` and calibration,
``activations.parquet``), each quantized layer's input is fake-quantized on the fly with the
parameters of the current timestep group (W8A8 / W4A8 in the loop): the group is picked from the
timestep argument of each call of the module given to :func:`apply` (the denoiser), as
:meth:`CalibrationRecorder.attach_timestep` reads it, or set with :func:`step`.

Inference only: the scratch buffer is reused, so autograd through the decoded weights is not
supported (a call that needs gradients gets a fresh buffer and a warning).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import threading
import types
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Tuple, Union

try:
    import torch
    import torch.nn.functional as F
    from torch import nn
except ImportError as e:  # pragma: no cover - exercised by a subprocess test
    raise ImportError("arrow_quant_v2.runtime needs PyTorch: pip install 'arrow_quant_v2[torch]'") from e

import numpy as np

from .errors import ConfigurationError, ModelFormatError, UnsupportedFeatureError
from .loader import _TORCH_DTYPES, QuantizedModel, QuantizedTensor, load, timestep_group

__all__ = ["apply", "load_model", "load_pipeline", "step", "resident_bytes", "PackedLayerState"]

_PACKED_KINDS = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)  # ConvTranspose is not a subclass of these
_FLOAT_DTYPES = {torch.float32, torch.float16, torch.bfloat16}


# -- scratch buffers ---------------------------------------------------------------------------

# The largest packed layer applied so far (values): the scratch buffer is made that large at once,
# not grown layer by layer (every freed step of a growing buffer stayed in the process's heap).
_LARGEST = [0]


class _Scratch(threading.local):
    """Per thread and dtype, one flat buffer the size of the largest packed layer."""

    def __init__(self) -> None:
        self.buffers: Dict[torch.dtype, torch.Tensor] = {}

    def get(self, dtype: torch.dtype, numel: int) -> torch.Tensor:
        buf = self.buffers.get(dtype)
        if buf is None or buf.numel() < numel:
            buf = None
            self.buffers.pop(dtype, None)
            buf = torch.empty(max(numel, _LARGEST[0]), dtype=dtype)
            self.buffers[dtype] = buf
        return buf[:numel]


_SCRATCH = _Scratch()


def scratch_bytes() -> int:
    """Bytes held by this thread's scratch buffers."""
    return sum(b.numel() * b.element_size() for b in _SCRATCH.buffers.values())


# -- the current step ----------------------------------------------------------------------------

class _StepState(threading.local):
    def __init__(self) -> None:
        self.value: Optional[float] = None


_STEP = _StepState()


@contextlib.contextmanager
def step(value: float) -> Iterator[None]:
    """Sets the timestep (or mask ratio) that picks the activation parameters' group for the
    calls inside the block, for models run without the module given to :func:`apply`."""
    from .calibration import _step_value

    previous = _STEP.value
    _STEP.value = _step_value(value, "runtime.step(value)")
    try:
        yield
    finally:
        _STEP.value = previous


# -- per layer -----------------------------------------------------------------------------------

class _ActGroups:
    """A layer's activation parameters per timestep group, sorted by step_lo."""

    def __init__(self, rows: List[Dict[str, Any]]) -> None:
        self.rows = rows

    def index(self, t: float) -> int:
        return timestep_group(self.rows, t)

    def fake_quantize(self, x: torch.Tensor, t: float) -> torch.Tensor:
        r = self.rows[self.index(t)]
        scale, zp, qmax = float(r["scale"]), float(r["zero_point"]), float(2 ** r["bits"] - 1)
        # the engine's rule (activation.h): c = clamp(round(x / s) + z, 0, 2^b - 1), x' = (c - z) s
        xf = x.float()
        c = torch.clamp(torch.round(xf / scale) + zp, 0.0, qmax)
        return ((c - zp) * scale).to(x.dtype)


class PackedLayerState:
    """What a swapped module holds: the stored bytes (or, for entropy-coded layers, the decoded
    weight), the input scale of channel equalization, and activation parameters."""

    def __init__(self, name: str, shape: Tuple[int, ...], packed: Any, dense: Optional[torch.Tensor],
                 input_scale: Optional[np.ndarray], acts: Optional[_ActGroups], scheme: str, threads: Optional[int]) -> None:
        self.name = name
        self.shape = shape
        self.packed = packed          # _core.PackedLayer, or None when dense
        self.dense = dense            # decoded once (entropy-coded), or None
        self.scheme = scheme
        self.acts = acts
        self.threads = threads
        self._input_scale = None if input_scale is None else torch.from_numpy(np.asarray(input_scale, np.float32).copy())
        self._scale_cache: Dict[torch.dtype, torch.Tensor] = {}
        self.numel = int(np.prod(shape))

    @property
    def nbytes(self) -> int:
        """Bytes this layer's weight occupies while the model runs (scratch not included)."""
        if self.dense is not None:
            return self.dense.numel() * self.dense.element_size()
        return int(self.packed.nbytes)

    def weight(self, dtype: torch.dtype, fresh: bool = False) -> torch.Tensor:
        """The decoded weight in `dtype`: a view of the thread's scratch buffer (valid until the
        next layer decodes), or a new tensor when `fresh`."""
        if self.dense is not None:
            return self.dense if self.dense.dtype == dtype else self.dense.to(dtype)
        if dtype not in _FLOAT_DTYPES:
            raise ConfigurationError(f"{self.name}: the runtime computes in float32, float16 or bfloat16; the input "
                                     f"is {dtype}")
        out = torch.empty(self.numel, dtype=dtype) if fresh else _SCRATCH.get(dtype, self.numel)
        self.packed.decode_into(out, torch.get_num_threads() if self.threads is None else self.threads)
        return out.view(self.shape)

    def prepare_input(self, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
        if self._input_scale is not None:
            s = self._scale_cache.get(x.dtype)
            if s is None:
                s = self._input_scale.to(x.dtype)
                self._scale_cache[x.dtype] = s
            if channel_dim != -1:
                s = s.view([-1] + [1] * (x.dim() - 1 - (channel_dim % x.dim())))
            x = x * s
        if self.acts is not None:
            t = _STEP.value
            if t is None:
                raise ConfigurationError(
                    f"{self.name}: this model quantizes activations per timestep group, and no timestep is known: "
                    f"call it through the module given to runtime.apply (its timestep argument picks the group), "
                    f"or inside `with arrow_quant_v2.runtime.step(t):`; or apply with activations=False")
            x = self.acts.fake_quantize(x, t)
        return x


def _needs_fresh(x: torch.Tensor) -> bool:
    if torch.is_grad_enabled() and x.requires_grad:
        warnings.warn("arrow_quant_v2.runtime is for inference: a call needing gradients gets a fresh weight "
                      "buffer each time (no gradient flows into the stored weights)", RuntimeWarning, stacklevel=3)
        return True
    return False


def _linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    st: PackedLayerState = self._aq_state
    x = st.prepare_input(x, -1)
    return F.linear(x, st.weight(x.dtype, _needs_fresh(x)), self.bias)


def _conv_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    st: PackedLayerState = self._aq_state
    x = st.prepare_input(x, 1 if x.dim() == self.weight.dim() else 0)
    return self._conv_forward(x, st.weight(x.dtype, _needs_fresh(x)), self.bias)


def _embedding_forward(self: nn.Embedding, ids: torch.Tensor) -> torch.Tensor:
    # only the looked-up rows are decoded (each distinct index once)
    st: PackedLayerState = self._aq_state
    flat = ids.reshape(-1)
    rows, dim = st.shape
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= rows):
        raise IndexError(f"{st.name}: index out of range for an embedding of {rows} rows "
                         f"(got {int(flat.min())} .. {int(flat.max())})")
    uniq, inverse = torch.unique(flat, return_inverse=True)
    table = torch.empty(uniq.numel(), dim, dtype=self.weight.dtype)
    for i, r in enumerate(uniq.tolist()):
        st.packed.decode_rows_into(table[i], r, 1)
    return table[inverse].reshape(*ids.shape, dim)


def _state_dict_hook(module: nn.Module, state_dict: Dict[str, Any], prefix: str, local_metadata: Any) -> None:
    st: Optional[PackedLayerState] = getattr(module, "_aq_state", None)
    key = prefix + "weight"
    if st is not None and key in state_dict:
        # the values the layer computes with (equalization folded in, as numpy() gives them)
        w = st.weight(module.weight.dtype, fresh=True)
        if st._input_scale is not None:
            k = st.numel // st.shape[0] // st._input_scale.numel()
            s = st._input_scale.repeat_interleave(k) if k > 1 else st._input_scale
            w = (w.reshape(st.shape[0], -1).float() * s).to(w.dtype).view(st.shape)
        state_dict[key] = w


def _placeholder(shape: Tuple[int, ...], dtype: torch.dtype) -> nn.Parameter:
    # One NaN element seen through a zero-stride view: shape, dtype and device are right, no
    # memory is taken, and any code that reads the values directly gets NaN, not a silent zero.
    return nn.Parameter(torch.full((), float("nan"), dtype=dtype).expand(shape), requires_grad=False)


# -- apply ---------------------------------------------------------------------------------------

def _component_of(model: QuantizedModel, component: Optional[str]) -> str:
    if component is not None:
        model.tensor_names(component)  # KeyError naming the components when unknown
        return component
    if len(model.components) == 1:
        return model.components[0]
    raise ConfigurationError(f"{model.path} has components {model.components}; pass component=")


def _kept_tensor(t: QuantizedTensor, dtype: Optional[torch.dtype]) -> torch.Tensor:
    """t.to_torch(), converted to `dtype` when given (floating tensors only)."""
    v = t.to_torch()
    return v.to(dtype) if dtype is not None and v.is_floating_point() else v


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor, where: str) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = module.get_submodule(owner_name) if owner_name else module
    current = owner._parameters.get(leaf) if leaf in owner._parameters else owner._buffers.get(leaf)
    if leaf not in owner._parameters and leaf not in owner._buffers:
        raise ModelFormatError(f"{where}: tensor {name!r} has no parameter or buffer in {type(module).__name__}")
    if current is not None and _same_but_unit_dims(tuple(current.shape), tuple(value.shape)):
        value = value.reshape(current.shape)
    if current is not None and tuple(current.shape) != tuple(value.shape):
        raise ModelFormatError(f"{where}: tensor {name!r} has shape {list(value.shape)}, the module's "
                               f"{list(current.shape)}")
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=False)
    else:
        owner._buffers[leaf] = value


def _same_but_unit_dims(a: Tuple[int, ...], b: Tuple[int, ...]) -> bool:
    """A 1x1 convolution stored as a linear weight (or the reverse): the same values, row-major."""
    return len(a) >= 2 and len(b) >= 2 and a[:2] == b[:2] and all(d == 1 for d in a[2:] + b[2:])


def _module_name(stored: str, known: set, module: nn.Module) -> str:
    """The module's name for a stored tensor: the same name, or (checkpoints whose names carry a
    wrapper prefix the class no longer has, as transformers 5's CLIPTextModel drops
    ``text_model.``) the name without its first one or two components, or with the class's
    ``base_model_prefix`` added."""
    if stored in known:
        return stored
    parts = stored.split(".")
    candidates = [".".join(parts[k:]) for k in (1, 2) if len(parts) > k + 1]
    base = getattr(module, "base_model_prefix", "")
    if base:
        candidates.append(f"{base}.{stored}")
    for c in candidates:
        if c in known:
            return c
    return stored


def apply(module: nn.Module, quant_dir: Union[str, os.PathLike, QuantizedModel], component: Optional[str] = None, *,
          torch_dtype: Optional[torch.dtype] = None, activations: Union[str, bool] = "auto",
          step_arg: Optional[Union[str, int, Callable[[tuple, dict], Any]]] = None, step_scale: float = 1.0,
          threads: Optional[int] = None) -> nn.Module:
    """Puts the stored model of ``quant_dir`` (its ``component``, e.g. ``"unet"``; may be omitted
    for a single-component directory) into ``module``, in place, and returns it.

    Quantized weights of Linear, Conv1d/2d/3d and Embedding layers stay packed (see the module
    docstring; a tied output head shares its embedding's bytes);
    every other stored tensor (biases, norms, kept layers) is loaded into its parameter or buffer,
    in ``torch_dtype`` if given, else the parameter's current dtype (or, on the meta device, the
    source dtype). The module may have been built on the meta device
    (``accelerate.init_empty_weights``): nothing is allocated for the packed weights.

    ``activations``: ``"auto"`` applies the stored activation parameters when the model has them,
    ``True`` requires them, ``False`` runs weight-only. The timestep that picks their group is
    read from each call of ``module``: ``step_arg`` (a keyword name, a positional index or a
    function ``(args, kwargs) -> value``) or else the keyword ``timestep``/``t``/``timesteps`` or
    the 2nd positional argument, times ``step_scale``.

    ``threads``: threads per decode (default: ``torch.get_num_threads()`` at each call).

    Raises ModelFormatError when a stored tensor has no place in ``module`` or a different
    shape, and when a parameter of ``module`` on the meta device has no stored tensor.
    """
    from .calibration import _find_step_arg, _step_value

    model = quant_dir if isinstance(quant_dir, QuantizedModel) else load(quant_dir)
    comp = _component_of(model, component)
    where = f"{model.path}" + (f" component {comp!r}" if comp else "")
    prefix = len(comp) + 1 if comp else 0
    names = model.tensor_names(comp)
    table = model._activation_table() if activations is not False else {}
    if activations is True and not table:
        raise ConfigurationError(f"{where}: activations=True, but the model has no activation parameters "
                                 f"(quantized without activation_bits and calibration)")
    modules = dict(module.named_modules())
    params = dict(module.named_parameters(recurse=True))
    known = set(params) | {n for n, _ in module.named_buffers()}
    seen = set()
    dense_entropy: List[Tuple[str, int]] = []
    has_acts = False
    for qname in names:
        t = model[qname]
        name = _module_name(qname[prefix:], known, module)
        seen.add(name)
        owner_name, _, leaf = name.rpartition(".")
        owner = modules.get(owner_name)
        current = params.get(name)
        target = torch_dtype or (current.dtype if current is not None and current.is_floating_point() and not current.is_meta
                                 else None)
        if owner is None:
            raise ModelFormatError(f"{where}: tensor {name!r} has no module {owner_name!r} in {type(module).__name__}")
        embedding = (isinstance(owner, nn.Embedding) and owner.max_norm is None and len(t.shape) == 2
                     and t.info.get("scheme_kind") != "entropy")
        if t.quantized and leaf == "weight" and (isinstance(owner, _PACKED_KINDS) or embedding):
            shape = tuple(owner.weight.shape)
            if shape != tuple(t.shape) and not _same_but_unit_dims(shape, tuple(t.shape)):
                raise ModelFormatError(f"{where}: tensor {name!r} has shape {list(t.shape)}, the module's "
                                       f"{list(shape)}")
            dtype = target or getattr(torch, _TORCH_DTYPES.get(t.dtype, "float32"))
            if dtype not in _FLOAT_DTYPES:
                dtype = torch.float32
            packed, dense = None, None
            if t.info.get("scheme_kind") == "entropy":
                # numpy() folds the input scale into the decoded weight: the layer must not apply it again
                dense = _kept_tensor(t, dtype)
                dense_entropy.append((name, dense.numel() * dense.element_size()))
            else:
                packed = t._reader.layer(t._index)
            rows = table.get(qname)
            acts = _ActGroups(rows) if rows else None
            has_acts = has_acts or acts is not None
            st = PackedLayerState(name, shape, packed, dense if dense is None else dense.reshape(shape),
                                  t.input_scale if dense is None else None, acts, t.scheme, threads)
            owner._aq_state = st
            if packed is not None and not embedding:
                _LARGEST[0] = max(_LARGEST[0], st.numel)
            owner._parameters["weight"] = _placeholder(shape, dtype)
            fwd = (_linear_forward if isinstance(owner, nn.Linear) else _embedding_forward if embedding
                   else _conv_forward)
            owner.forward = types.MethodType(fwd, owner)
            if not getattr(owner, "_aq_hooked", False):
                owner._register_state_dict_hook(_state_dict_hook)
                owner._aq_hooked = True
            continue
        value = _kept_tensor(t, target)
        if current is not None and not current.is_meta and current.dtype == value.dtype and \
                tuple(current.shape) == tuple(value.shape):
            with torch.no_grad():
                current.copy_(value)
        else:
            _set_tensor(module, name, value, where)
    _tie(module)
    import pyarrow as pa

    pa.default_memory_pool().release_unused()  # the Parquet reads' buffers, copied out above
    missing = [n for n, p in module.named_parameters() if p.is_meta and n not in seen]
    if missing:
        raise ModelFormatError(f"{where}: {len(missing)} parameters of {type(module).__name__} have no stored tensor "
                               f"(first: {missing[:3]})")
    if dense_entropy:
        total = sum(b for _, b in dense_entropy)
        warnings.warn(f"{where}: {len(dense_entropy)} entropy-coded layers are decoded once at load and take their "
                      f"full memory ({total / 2**20:.1f} MiB; first: {dense_entropy[0][0]!r})", RuntimeWarning,
                      stacklevel=2)
    if has_acts and not getattr(module, "_aq_step_hooked", False):
        where_mod = type(module).__name__

        def pre_hook(mod: nn.Module, args: tuple, kwargs: dict) -> None:
            if callable(step_arg) and not isinstance(step_arg, str):
                with torch.no_grad():
                    value = step_arg(args, kwargs)
            else:
                value = _find_step_arg(args, kwargs, step_arg, where_mod)
            mod._aq_step_saved = _STEP.value
            _STEP.value = _step_value(value, f"{where_mod} timestep argument") * float(step_scale)

        def post_hook(mod: nn.Module, args: tuple, output: Any) -> None:
            _STEP.value = getattr(mod, "_aq_step_saved", None)

        module.register_forward_pre_hook(pre_hook, with_kwargs=True, prepend=True)
        try:
            module.register_forward_hook(post_hook, always_call=True)
        except TypeError:  # torch without always_call
            module.register_forward_hook(post_hook)
        module._aq_step_hooked = True
    return module


def _tie(module: nn.Module) -> None:
    """Tied weights (transformers' tie_word_embeddings: the output head shares the embedding,
    which is stored once): re-tie, and let a layer whose weight is now another layer's packed
    placeholder compute from that layer's stored bytes."""
    tie = getattr(module, "tie_weights", None)
    if callable(tie):
        tie()
    owners = {id(m.weight): m._aq_state for m in module.modules() if getattr(m, "_aq_state", None) is not None}
    for m in module.modules():
        if getattr(m, "_aq_state", None) is None and isinstance(m, nn.Linear) and id(m.weight) in owners:
            st = owners[id(m.weight)]
            if st.dense is None and tuple(m.weight.shape) == st.shape:
                m._aq_state = st
                m.forward = types.MethodType(_linear_forward, m)


def packed_layers(module: nn.Module) -> Dict[str, PackedLayerState]:
    """{module name: its PackedLayerState} of every swapped layer of ``module``."""
    return {n: m._aq_state for n, m in module.named_modules() if getattr(m, "_aq_state", None) is not None}


def resident_bytes(module: nn.Module) -> Dict[str, int]:
    """Memory of ``module``'s weights as it runs: ``packed`` (stored bytes of the swapped layers),
    ``decoded`` (entropy-coded layers decoded at load), ``dense`` (every other parameter and
    buffer), ``scratch`` (this thread's decode buffers) and ``total``."""
    states = {id(s): s for s in packed_layers(module).values()}.values()  # a tied head shares its state
    packed = sum(s.nbytes for s in states if s.dense is None)
    decoded = sum(s.nbytes for s in states if s.dense is not None)
    placeholders = {id(m.weight) for m in module.modules() if getattr(m, "_aq_state", None) is not None}
    dense = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in placeholders)
    dense += sum(b.numel() * b.element_size() for b in module.buffers())
    out = {"packed": packed, "decoded": decoded, "dense": dense, "scratch": scratch_bytes()}
    out["total"] = sum(out.values())
    return out


# -- building models and pipelines ---------------------------------------------------------------

def _source_dtype(model: QuantizedModel, component: str) -> torch.dtype:
    counts: Dict[str, int] = {}
    for n in model.tensor_names(component):
        t = model[n]
        if t.dtype in ("F32", "F16", "BF16"):
            counts[t.dtype] = counts.get(t.dtype, 0) + int(np.prod(t.shape))
    if not counts:
        return torch.float32
    return getattr(torch, _TORCH_DTYPES[max(counts, key=counts.get)])


def _check_device(device: Any) -> None:
    if device is not None and torch.device(device).type != "cpu":
        raise UnsupportedFeatureError(f"arrow_quant_v2.runtime decodes packed weights on the CPU; device={device!r} "
                                      f"is not supported yet (use device='cpu', or load(...).to_torch_state_dict() "
                                      f"for a dense model on another device)")


@contextlib.contextmanager
def _empty_weights() -> Iterator[None]:
    try:
        from accelerate import init_empty_weights
    except ImportError:
        warnings.warn("accelerate is not installed: the model is built with random weights before its stored ones "
                      "replace them (pip install accelerate keeps that memory out)", RuntimeWarning, stacklevel=4)
        yield
        return
    with init_empty_weights(include_buffers=False):
        yield


def _build_module(config_dir: str, where: str) -> nn.Module:
    path = os.path.join(config_dir, "config.json")
    if not os.path.exists(path):
        raise ModelFormatError(f"{where}: no config.json in {config_dir}: the runtime builds the model from it "
                               f"(use runtime.apply on a module you build)")
    with open(path, encoding="utf-8") as f:
        cfg = json.load(f)
    if "_class_name" in cfg:
        import diffusers

        cls = getattr(diffusers, cfg["_class_name"], None)
        if cls is None:
            raise ModelFormatError(f"{path}: diffusers has no class {cfg['_class_name']!r}")
        with _empty_weights():
            return cls.from_config(cls.load_config(config_dir))
    if cfg.get("architectures"):
        import transformers

        name = cfg["architectures"][0]
        cls = getattr(transformers, name, None)
        if cls is None:
            raise ModelFormatError(f"{path}: transformers has no class {name!r} (architectures)")
        config = transformers.AutoConfig.from_pretrained(config_dir)
        with _empty_weights():
            return cls._from_config(config)
    raise ModelFormatError(f"{path}: neither a diffusers config (_class_name) nor a transformers one (architectures)")


def load_model(quant_dir: Union[str, os.PathLike], component: Optional[str] = None, *,
               torch_dtype: Optional[torch.dtype] = None, device: Any = None, **apply_kwargs: Any) -> nn.Module:
    """The model of one component of ``quant_dir`` (or of a single-model directory), built from its
    ``config.json`` (diffusers ``_class_name`` or transformers ``architectures``) with its weights
    kept packed (:func:`apply`), in eval mode. ``torch_dtype`` defaults to the source dtype."""
    _check_device(device)
    model = load(quant_dir)
    comp = _component_of(model, component)
    config_dir = os.path.join(model.path, comp) if comp else model.path
    module = _build_module(config_dir, model.path)
    dtype = torch_dtype or _source_dtype(model, comp)
    apply(module, model, comp, torch_dtype=dtype, **apply_kwargs)
    return module.eval()


def load_pipeline(quant_dir: Union[str, os.PathLike], torch_dtype: Optional[torch.dtype] = None, device: Any = None,
                  pipeline_kwargs: Optional[Dict[str, Any]] = None, **apply_kwargs: Any) -> Any:
    """The diffusers pipeline of ``quant_dir``'s ``model_index.json``: its quantized components built
    by :func:`load_model` (weights kept packed), the others loaded by diffusers from the copied
    files. ``torch_dtype`` applies to every component (default: the source dtype of the first
    quantized component, e.g. bfloat16). ``pipeline_kwargs`` go to diffusers' ``from_pretrained``;
    other keyword arguments to :func:`apply`. A directory without ``model_index.json`` gives its
    single model (as :func:`load_model`)."""
    _check_device(device)
    model = load(quant_dir)
    index = os.path.join(model.path, "model_index.json")
    if not os.path.exists(index):
        return load_model(model.path, None, torch_dtype=torch_dtype, device=device, **apply_kwargs)
    import diffusers

    with open(index, encoding="utf-8") as f:
        index_data = json.load(f)
    cls_name = index_data.get("_class_name")
    cls = getattr(diffusers, cls_name or "", None)
    if cls is None:
        raise ModelFormatError(f"{index}: diffusers has no pipeline class {cls_name!r}")
    if torch_dtype is None:
        # the pipeline runs in one dtype: the source dtype of its (first) quantized component
        torch_dtype = next((_source_dtype(model, c) for c in model.components if c), None)
    parts = {}
    for comp in model.components:
        if not comp:
            continue
        parts[comp] = load_model(model.path, comp, torch_dtype=torch_dtype, **apply_kwargs)
    kwargs: Dict[str, Any] = dict(parts)
    # components the pipeline was saved without ([null, null]): diffusers wants them passed as None
    kwargs.update({k: None for k, v in index_data.items()
                   if not k.startswith("_") and isinstance(v, list) and len(v) == 2 and v[0] is None and v[1] is None})
    kwargs.update(pipeline_kwargs or {})
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*torch_dtype.*deprecated", category=FutureWarning)
        return cls.from_pretrained(model.path, **kwargs)
