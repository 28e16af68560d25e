"""ArrowQuant: quantization for diffusion models.

A C++ core (reading safetensors, quantization kernels, bit packing, the engine, Parquet output)
under the seed's Python API:

    from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
    result = ArrowQuantV2().quantize_diffusion_model("model/", "model-int4/",
                                                     config=DiffusionQuantConfig.from_profile("local"))
"""

from . import _core
from .api import ArrowQuantV2
from .arrays import QuantizedArray
from .config import DiffusionQuantConfig
from .errors import (
    ArrowQuantError,
    ConfigurationError,
    ModelFormatError,
    ModelNotFoundError,
    NonFiniteWeightError,
    QuantizationError,
    UnsupportedFeatureError,
    ValidationError,
)
from .loader import QuantizedModel, QuantizedTensor, load


def export_gguf(quant_dir, out_path, **kwargs):
    """Writes one component of a quantized model as GGUF (see :func:`arrow_quant_v2.export.export_gguf`)."""
    from .export import export_gguf as _export

    return _export(quant_dir, out_path, **kwargs)

def report(quant_dir, out_path=None, against=None, figures_dir=None, result=None):
    """Writes the HTML quality report of a quantized model (plots embedded, no network) and returns
    its path (see :func:`arrow_quant_v2.quality_report.report`). Needs matplotlib."""
    from .quality_report import report as _report

    return _report(quant_dir, out_path, against=against, figures_dir=figures_dir, result=result)


__version__ = "0.1.0"
FORMAT_VERSION = _core.FORMAT_VERSION

__all__ = [
    "ArrowQuantV2",
    "DiffusionQuantConfig",
    "QuantizedArray",
    "QuantizedModel",
    "QuantizedTensor",
    "load",
    "export_gguf",
    "report",
    "ArrowQuantError",
    "QuantizationError",
    "ConfigurationError",
    "ValidationError",
    "ModelNotFoundError",
    "ModelFormatError",
    "NonFiniteWeightError",
    "UnsupportedFeatureError",
    "FORMAT_VERSION",
]
