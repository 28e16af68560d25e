"""DiffusionQuantConfig: what to quantize and how.

The seed's fields keep their names and defaults; the fields after them are ArrowQuant's own.
Every assignment is checked, so a wrong value fails where it is written, with a message that
names the field and the values allowed.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Tuple

from .errors import ConfigurationError

BIT_WIDTHS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (0, 32, 64, 128, 256)  # 0 = one group per output channel
MODALITIES = ("text", "code", "image", "audio")
PROFILES = ("edge", "local", "cloud")
SCALE_METHODS = ("search", "minmax")
# ggml's block types (docs/format.md): the bytes llama.cpp, stable-diffusion.cpp, ComfyUI-GGUF
# and diffusers' GGUF loader compute on; each has its own code width (bit_width follows it).
GGML_TYPES: Dict[str, int] = {"q8_0": 8, "q6_k": 6, "q5_k": 5, "q4_k": 4, "q3_k": 3, "q2_k": 2, "iq4_xs": 4, "iq4_nl": 4}
SCHEMES = ("affine", "entropy") + tuple(GGML_TYPES)
GGML_FOR_BITS: Dict[int, str] = {2: "q2_k", 3: "q3_k", 4: "q4_k", 5: "q5_k", 6: "q6_k", 8: "q8_0"}
NONFINITE_POLICIES = ("error", "keep")
KEEP_BITS = 16  # a bit override of 16 keeps a tensor unquantized

# The deployment profiles produce models that run small: every quantized layer is one of ggml's
# block types, so the model loads in the runtimes people use (llama.cpp, stable-diffusion.cpp,
# ComfyUI-GGUF, diffusers' GGUF loader) and decodes per forward instead of expanding at load.
# Sensitive layers take Q8_0 and the accuracy fallback climbs Q2_K -> Q3_K -> Q4_K -> Q8_0; rows
# that K types cannot take (not a multiple of 256) go to IQ4_NL (up to 4 bits) or Q8_0.
# scheme="entropy" stays as the archive / download format (least error per stored bit, decoded
# to full precision at load). group_size and symmetric keep fixed-rate settings for whoever sets
# scheme="affine" on top of a profile.
PROFILE_SETTINGS: Dict[str, Dict[str, Any]] = {  # noqa: E501
    # Q2_K, ~2.6-3 bits/weight with the sensitive layers: the smallest models.
    "edge": {"bit_width": 2, "group_size": 64, "symmetric": False, "scheme": "q2_k", "min_accuracy": 0.85},
    # Q4_K, ~4.5-4.9 bits/weight: laptops and desktops, quality close to the original.
    "local": {"bit_width": 4, "group_size": 128, "symmetric": False, "scheme": "q4_k", "min_accuracy": 0.95},
    # Q8_0, 8.5 bits/weight: servers, near-lossless.
    "cloud": {"bit_width": 8, "group_size": 0, "symmetric": True, "scheme": "q8_0", "min_accuracy": 0.99},
}


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _check_choice(name: str, allowed: Iterable[str]) -> Callable[[Any], str]:
    allowed = tuple(allowed)

    def check(v: Any) -> str:
        if not isinstance(v, str) or v not in allowed:
            raise ConfigurationError(f"{name} must be one of {', '.join(map(repr, allowed))}; got {v!r}")
        return v

    return check


def _check_bool(name: str) -> Callable[[Any], bool]:
    def check(v: Any) -> bool:
        if not isinstance(v, bool):
            raise ConfigurationError(f"{name} must be True or False; got {v!r}")
        return v

    return check


def _check_optional_bool(name: str) -> Callable[[Any], Optional[bool]]:
    def check(v: Any) -> Optional[bool]:
        if v is not None and not isinstance(v, bool):
            raise ConfigurationError(f"{name} must be True, False or None; got {v!r}")
        return v

    return check


def _check_target_bpw(v: Any) -> Optional[float]:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 1.0 <= float(v) <= 12.0:
        raise ConfigurationError(f"target_bits_per_weight must be None or a number between 1 and 12; got {v!r}")
    return float(v)


def _check_path(name: str) -> Callable[[Any], Optional[str]]:
    def check(v: Any) -> Optional[str]:
        if v is None:
            return None
        if isinstance(v, os.PathLike):
            v = os.fspath(v)
        if not isinstance(v, str) or not v:
            raise ConfigurationError(f"{name} must be None or a path; got {v!r}")
        return v

    return check


def _check_activation_bits(v: Any) -> Optional[int]:
    if v is None:
        return None
    if not _is_int(v) or v not in (4, 8):
        raise ConfigurationError(f"activation_bits must be 4, 8 or None (weight-only); got {v!r}")
    return v


def _check_damp(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 < float(v) <= 1.0:
        raise ConfigurationError(f"gptq_damp must be a number in (0, 1]; got {v!r}")
    return float(v)


def _check_int(name: str, lo: int, hi: Optional[int] = None, note: str = "") -> Callable[[Any], int]:
    def check(v: Any) -> int:
        if not _is_int(v) or v < lo or (hi is not None and v > hi):
            rng = f">= {lo}" if hi is None else f"between {lo} and {hi}"
            raise ConfigurationError(f"{name} must be an integer {rng}{note}; got {v!r}")
        return v

    return check


def _check_bits(v: Any) -> int:
    if not _is_int(v) or v not in BIT_WIDTHS:
        raise ConfigurationError(f"bit_width must be one of 2, 3, 4, 5, 6, 8; got {v!r}")
    return v


def _check_scheme(v: Any) -> str:
    if isinstance(v, str) and v.lower() in GGML_TYPES:
        return v.lower()
    if not isinstance(v, str) or v not in SCHEMES:
        raise ConfigurationError(f"scheme must be one of {', '.join(map(repr, SCHEMES))} (ggml types in any case); got {v!r}")
    return v


def _check_group_size(v: Any) -> int:
    if not _is_int(v) or v not in GROUP_SIZES:
        raise ConfigurationError(f"group_size must be one of 32, 64, 128, 256, or 0 (per channel); got {v!r}")
    return v


def _check_min_accuracy(v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= float(v) <= 1.0:
        raise ConfigurationError(f"min_accuracy must be a number between 0 and 1; got {v!r}")
    return float(v)


def _check_modality(v: Any) -> Optional[str]:
    if v is None:
        return None
    if not isinstance(v, str) or v.lower() not in MODALITIES:
        raise ConfigurationError(f"modality must be None (detect) or one of {', '.join(MODALITIES)}; got {v!r}")
    return v.lower()


def _check_profile(v: Any) -> str:
    if not isinstance(v, str) or v not in PROFILES:
        raise ConfigurationError(f"deployment_profile must be one of {', '.join(PROFILES)}; got {v!r}")
    return v


def _check_patterns(name: str) -> Callable[[Any], Optional[Tuple[str, ...]]]:
    def check(v: Any) -> Optional[Tuple[str, ...]]:
        if v is None and name == "sensitive_patterns":
            return None
        if isinstance(v, str) or not isinstance(v, Iterable):
            raise ConfigurationError(f"{name} must be a list of regular expressions; got {v!r}")
        out = []
        for p in v:
            if not isinstance(p, str):
                raise ConfigurationError(f"{name} must contain strings; got {p!r}")
            # The engine matches with ECMAScript regular expressions (C++ std::regex); check with it,
            # so a pattern the engine cannot use fails here rather than mid-run.
            from . import _core

            _core.check_pattern(name, p)
            out.append(p)
        return tuple(out)

    return check


def _check_overrides(v: Any) -> Dict[str, int]:
    if v is None:
        return {}
    if not isinstance(v, Mapping):
        raise ConfigurationError(f"bit_overrides must be a dict of regular expression -> bits; got {v!r}")
    out: Dict[str, int] = {}
    for p, b in v.items():
        _check_patterns("bit_overrides")([p])
        if not _is_int(b) or b not in BIT_WIDTHS + (KEEP_BITS,):
            raise ConfigurationError(f"bit_overrides[{p!r}] must be 2, 3, 4, 5, 6, 8, or 16 (keep unquantized); got {b!r}")
        out[p] = b
    return out


def _check_components(v: Any) -> Optional[Tuple[str, ...]]:
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, Iterable) or not all(isinstance(c, str) and c for c in v):
        raise ConfigurationError(f"components must be None (the denoiser), 'all', or a list of component names; got {v!r}")
    return tuple(v)


def _check_time_groups(v: Any) -> Optional[Tuple[Tuple[int, ...], ...]]:
    if v is None:
        return None
    expected = ("time_groups must be None or a list of non-empty lists of step bins (integers >= 0), ascending "
                "and disjoint, e.g. [[0, 1], [2, 3, 4]]")
    if isinstance(v, (str, bytes)) or not isinstance(v, Iterable):
        raise ConfigurationError(f"{expected}; got {v!r}")
    groups = []
    last = -1
    for g in v:
        if isinstance(g, (str, bytes)) or not isinstance(g, Iterable):
            raise ConfigurationError(f"{expected}; got {v!r}")
        g = tuple(g)
        if not g:
            raise ConfigurationError(f"{expected}; got {v!r}")
        for b in g:
            if not _is_int(b) or not last < b <= 100000:
                raise ConfigurationError(f"{expected}; got {v!r}")
            last = b
        groups.append(tuple(int(b) for b in g))
    if not groups:
        raise ConfigurationError(f"{expected}; got {v!r}")
    return tuple(groups)


def _check_sensitive_bits(v: Any) -> int:
    if not _is_int(v) or v not in BIT_WIDTHS + (KEEP_BITS,):
        raise ConfigurationError(f"sensitive_bit_width must be 2, 3, 4, 5, 6, 8, or 16 (keep unquantized); got {v!r}")
    return v


# name -> (default, checker, doc). Order: the seed's fields first.
_FIELDS: Dict[str, Tuple[Any, Callable[[Any], Any], str]] = {
    "bit_width": (4, _check_bits, "integer code width: 2, 3, 4, 5, 6 or 8 (a ggml scheme sets it)"),
    "modality": (None, _check_modality, "text, code, image or audio; None detects it from the model"),
    "num_time_groups": (10, _check_int("num_time_groups", 1, 1000), "timestep groups for time-aware calibration"),
    "time_groups": (None, _check_time_groups,
                    "the timestep groups as lists of step bins, e.g. [[0, 1], [2, 3, 4]]; None = num_time_groups "
                    "groups of adjacent bins merged by activation range"),
    "group_size": (128, _check_group_size, "weights per scale along the input dimension (0 = per channel)"),
    "enable_time_aware": (True, _check_bool("enable_time_aware"), "timestep-aware calibration (needs calibration data)"),
    "enable_spatial": (True, _check_bool("enable_spatial"), "channel equalization (needs calibration data)"),
    "min_accuracy": (0.85, _check_min_accuracy, "per-layer cosine similarity under which a layer falls back"),
    "calibration_samples": (128, _check_int("calibration_samples", 1), "calibration samples to record"),
    "deployment_profile": ("local", _check_profile, "edge, local or cloud"),
    "fail_fast": (False, _check_bool("fail_fast"), "stop at the first per-layer error instead of collecting"),
    # ArrowQuant's own fields
    "scheme": ("affine", _check_scheme,
               "'affine' (fixed-rate group-wise codes), 'entropy' (rANS-coded: least error per stored bit; an "
               "archive format), or a ggml block type: q8_0, q6_k, q5_k, q4_k, q3_k, q2_k, iq4_xs, iq4_nl"),
    "target_bits_per_weight": (None, _check_target_bpw,
                               "entropy scheme: stored bits per weight of each tensor (None = bit_width + 0.5); "
                               "ggml schemes: the model's budget, each layer's type chosen by measured "
                               "sensitivity (None = the scheme's type everywhere)"),
    "rotate": (False, _check_bool("rotate"), "randomized Hadamard rotation of rows (helps affine codes on heavy tails)"),
    "symmetric": (False, _check_bool("symmetric"), "symmetric codes (no offset) instead of asymmetric"),
    "scale_method": ("search", _check_choice("scale_method", SCALE_METHODS), "'search' (error-minimizing) or 'minmax'"),
    "enable_fallback": (True, _check_bool("enable_fallback"), "raise a layer's bits while its cosine < min_accuracy"),
    "num_threads": (0, _check_int("num_threads", 0, 1024, " (0 = every core)"), "worker threads; 0 = every core"),
    "components": (None, _check_components, "pipeline components to quantize; None = the denoiser"),
    "skip_patterns": ((), _check_patterns("skip_patterns"), "regexes of tensors to keep unquantized"),
    "bit_overrides": ({}, _check_overrides, "regex -> bits for chosen tensors (16 keeps them)"),
    "sensitive_patterns": (None, _check_patterns("sensitive_patterns"), "regexes of sensitive tensors; None = defaults"),
    "sensitive_bit_width": (8, _check_sensitive_bits, "bits for sensitive tensors (16 keeps them)"),
    "min_tensor_size": (1024, _check_int("min_tensor_size", 0), "tensors with fewer weights are kept"),
    "piece_bytes": (64 << 20, _check_int("piece_bytes", 1),
                    "a tensor storing more bytes is written in pieces of at most this size (whole row blocks), "
                    "so writing, validating and loading it never hold it whole"),
    "nonfinite": ("error", _check_choice("nonfinite", NONFINITE_POLICIES), "'error' or 'keep' for NaN/Inf weights"),
    "overwrite": (False, _check_bool("overwrite"), "replace an existing output directory"),
    "calibration_path": (None, _check_path("calibration_path"),
                         "calibration.parquet recorded by arrow_quant_v2.calibration; None = <model>/calibration.parquet if present"),
    "gptq_damp": (0.01, _check_damp, "GPTQ dampening: fraction of the Hessian's mean diagonal added to it"),
    "activation_bits": (None, _check_activation_bits, "W8A8 / W4A8: 8 or 4 stores activation parameters per timestep group (needs calibration); None = weight-only"),
    "gptq_act_order": (True, _check_bool("gptq_act_order"), "GPTQ: quantize input columns in order of decreasing activation energy"),
    "ggml_weighting": ("llama", _check_choice("ggml_weighting", ("plain", "magnitude", "llama")),
                       "ggml schemes: the error the encoder minimises, 'plain' squared error, 'magnitude' "
                       "(each weight's error times sqrt(mean x^2 of its sub-block) + |x|, llama.cpp's Q4_K/Q5_K "
                       "weighting, for every type) or 'llama' (each type's own llama.cpp weights: Q2_K |x|, "
                       "Q3_K/Q6_K/IQ4 x^2, Q4_K/Q5_K as 'magnitude', Q8_0 none; with calibration "
                       "importance * sqrt(2 mean x^2 + x^2) as llama.cpp with an imatrix)"),
    "time_group_weighting": ("uniform", _check_choice("time_group_weighting", ("uniform", "relative")),
                             "GPTQ Hessian over timestep groups: 'uniform' (each group's mean H_g alike) or "
                             "'relative' (each group weighted by 1 / its output energy tr(W H_g W^T), so every "
                             "group's relative output error counts alike)"),
}


class DiffusionQuantConfig:
    """Configuration of a quantization run.

    ``DiffusionQuantConfig()`` gives the seed's defaults (INT4, groups of 128, min_accuracy 0.85).
    ``DiffusionQuantConfig(deployment_profile="edge")`` -- or ``from_profile("edge")`` -- applies the
    profile's settings to every field not given explicitly.
    """

    __slots__ = tuple(_FIELDS)

    def __init__(self, **kwargs: Any) -> None:
        unknown = sorted(set(kwargs) - set(_FIELDS))
        if unknown:
            raise ConfigurationError(
                f"unknown DiffusionQuantConfig field(s): {', '.join(unknown)}; known: {', '.join(_FIELDS)}"
            )
        for name, (default, _, _) in _FIELDS.items():
            object.__setattr__(self, name, default() if callable(default) else _copy(default))
        profile = kwargs.get("deployment_profile")
        if profile is not None:
            _check_profile(profile)
            for name, value in PROFILE_SETTINGS[profile].items():
                if name not in kwargs:
                    setattr(self, name, value)
        # bit_width before scheme: a ggml scheme given explicitly then sets the width
        for name, value in sorted(kwargs.items(), key=lambda kv: kv[0] == "scheme"):
            setattr(self, name, value)
        if "bit_width" in kwargs and "scheme" in kwargs and self.scheme in GGML_TYPES:
            self._check_ggml_width(kwargs["bit_width"])  # given both: they must agree

    def __setattr__(self, name: str, value: Any) -> None:
        if name not in _FIELDS:
            raise ConfigurationError(f"DiffusionQuantConfig has no field {name!r}; known: {', '.join(_FIELDS)}")
        value = _FIELDS[name][1](value)
        object.__setattr__(self, name, value)
        # A ggml type fixes the code width: setting the scheme sets bit_width; setting another
        # bit_width on a ggml scheme (a profile's, or --bits on the command line) picks the ggml
        # type of that width (2 -> q2_k ... 6 -> q6_k, 8 -> q8_0).
        if name == "scheme" and value in GGML_TYPES:
            object.__setattr__(self, "bit_width", GGML_TYPES[value])
        elif name == "bit_width" and getattr(self, "scheme", None) in GGML_TYPES and GGML_TYPES[self.scheme] != value:
            object.__setattr__(self, "scheme", GGML_FOR_BITS[value])

    def _check_ggml_width(self, bits: int) -> None:
        want = GGML_TYPES[self.scheme]
        if bits != want:
            raise ConfigurationError(f"scheme {self.scheme!r} is {want}-bit; bit_width={bits} was given "
                                     f"(leave bit_width out, or give {want})")

    @staticmethod
    def from_profile(profile: str, **overrides: Any) -> "DiffusionQuantConfig":
        """The settings of a deployment profile: ``edge`` (INT2, groups of 64), ``local`` (INT4,
        groups of 128) or ``cloud`` (INT8, per channel); keyword arguments override fields."""
        _check_profile(profile)
        return DiffusionQuantConfig(deployment_profile=profile, **overrides)

    def validate(self) -> "DiffusionQuantConfig":
        """Checks every field again (they are checked on assignment too), and the fields that
        only make sense together; returns self."""
        for name, (_, check, _) in _FIELDS.items():
            check(getattr(self, name))
        if self.scheme in GGML_TYPES:
            self._check_ggml_width(self.bit_width)
        if self.target_bits_per_weight is not None and self.scheme == "affine":
            raise ConfigurationError("target_bits_per_weight applies to scheme='entropy' (the tensor budget) and "
                                     "ggml schemes (the model budget); the size of affine codes follows bit_width "
                                     "and group_size")
        return self

    def to_dict(self) -> Dict[str, Any]:
        d = {name: _copy(getattr(self, name)) for name in _FIELDS}
        for k in ("skip_patterns", "components", "sensitive_patterns"):
            if d[k] is not None:
                d[k] = list(d[k])
        if d["time_groups"] is not None:
            d["time_groups"] = [list(g) for g in d["time_groups"]]
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "DiffusionQuantConfig":
        return cls(**dict(d))

    def replace(self, **changes: Any) -> "DiffusionQuantConfig":
        """A copy with `changes` applied as assignments (so ``replace(bit_width=3)`` of a q8_0
        configuration gives q3_k, as ``cfg.bit_width = 3`` would)."""
        new = DiffusionQuantConfig(**self.to_dict())
        for name, value in changes.items():
            setattr(new, name, value)
        if "bit_width" in changes and "scheme" in changes and new.scheme in GGML_TYPES:
            new.scheme = changes["scheme"]
            new._check_ggml_width(changes["bit_width"])
        return new

    def _engine_json(self) -> str:
        """The JSON the C++ engine reads (bit_overrides as ordered pairs: first match wins)."""
        d = self.to_dict()
        d["bit_overrides"] = [[p, b] for p, b in self.bit_overrides.items()]
        return json.dumps(d)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, DiffusionQuantConfig) and self.to_dict() == other.to_dict()

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={getattr(self, k)!r}" for k in _FIELDS)
        return f"DiffusionQuantConfig({fields})"


def _copy(v: Any) -> Any:
    if isinstance(v, dict):
        return dict(v)
    if isinstance(v, list):
        return list(v)
    return v


def field_docs() -> List[Tuple[str, Any, str]]:
    """(name, default, description) of every field, for documentation and the CLI."""
    return [(n, d, doc) for n, (d, _, doc) in _FIELDS.items()]
