"""Exceptions raised by ArrowQuant.

Every exception shares the base class :class:`ArrowQuantError`. Errors that come from the C++
core carry a ``code`` attribute naming the core's status (``"FormatError"``, ``"NonFinite"``, ...)
and a message that names the file, the tensor and the offending value.
"""

from __future__ import annotations


class ArrowQuantError(Exception):
    """Base class of every ArrowQuant error."""

    code: str = "Error"


class QuantizationError(ArrowQuantError):
    """Quantization could not be carried out (bad input model, I/O failure, a tensor that cannot be
    quantized as asked)."""

    code = "QuantizationError"


class ConfigurationError(ArrowQuantError, ValueError):
    """A configuration value is outside what is allowed; the message names the field and the
    allowed values."""

    code = "InvalidConfig"


class ValidationError(ArrowQuantError):
    """A quality check could not be carried out (the quantized model does not match its source)."""

    code = "ValidationError"


class ModelNotFoundError(QuantizationError, FileNotFoundError):
    """A model path (or a file it refers to) does not exist."""

    code = "NotFound"


class ModelFormatError(QuantizationError, ValueError):
    """A file is not what it claims to be: a malformed safetensors header, offsets outside the file,
    a damaged quantized model."""

    code = "FormatError"


class NonFiniteWeightError(QuantizationError, ValueError):
    """A weight that policy says must be quantized is NaN or infinite (``nonfinite="keep"`` stores
    such tensors unquantized instead)."""

    code = "NonFinite"


class UnsupportedFeatureError(QuantizationError, NotImplementedError):
    """The input needs a feature this version does not have; the message says which."""

    code = "NotImplemented"


__all__ = [
    "ArrowQuantError",
    "QuantizationError",
    "ConfigurationError",
    "ValidationError",
    "ModelNotFoundError",
    "ModelFormatError",
    "NonFiniteWeightError",
    "UnsupportedFeatureError",
]
