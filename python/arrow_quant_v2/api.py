"""ArrowQuantV2: the seed's entry point, every word of it true."""

from __future__ import annotations

import json
import os
from typing import Any, Callable, Dict, Mapping, Optional, Union

import numpy as np

from . import _core
from ._progress import ProgressAdapter, TerminateAsInterrupt
from .cluster import RaySession, quantize_distributed, ray_available, resolve_cluster, run_local_instead
from .arrays import QuantizedArray, quantize_arrays
from .config import DiffusionQuantConfig
from .errors import ConfigurationError, QuantizationError, ValidationError

PathLike = Union[str, "os.PathLike[str]"]
ProgressCallback = Callable[[str, float], object]

MODES = ("diffusion",)


def run_quantize(model_path: str, output_path: str, config: DiffusionQuantConfig, progress: Any, resume: bool,
                 cluster: Any = None) -> Dict[str, Any]:
    """One quantization, on this machine or (cluster) on Ray; progress in the core's raw form
    (ProgressAdapter). The report as a dict."""
    address = resolve_cluster(cluster)
    if address is not None and not ray_available():
        run_local_instead(cluster)
        address = None
    with TerminateAsInterrupt():
        if address is None:
            return json.loads(_core.quantize_model(model_path, output_path, config._engine_json(), progress, 10, 5.0,
                                                   resume))
        with RaySession(address):
            return quantize_distributed(model_path, output_path, config, address, progress, resume)


class ArrowQuantV2:
    """Quantizes diffusion models (image/video/audio DiTs and UNets, diffusion language models).

    >>> from arrow_quant_v2 import ArrowQuantV2, DiffusionQuantConfig
    >>> q = ArrowQuantV2(mode="diffusion")
    >>> result = q.quantize_diffusion_model("sd-model/", "sd-model-int4/",
    ...                                     config=DiffusionQuantConfig.from_profile("local"))
    """

    def __init__(self, mode: str = "diffusion") -> None:
        if mode not in MODES:
            raise ConfigurationError(f"mode must be one of {', '.join(map(repr, MODES))}; got {mode!r}")
        self.mode = mode

    def quantize_diffusion_model(self, model_path: PathLike, output_path: PathLike,
                                 config: Optional[DiffusionQuantConfig] = None,
                                 progress_callback: Optional[ProgressCallback] = None,
                                 resume: bool = False, cluster: Optional[str] = None,
                                 report: bool = False) -> Dict[str, Any]:
        """Quantizes the model at ``model_path`` (a .safetensors file, a Hugging Face directory, or a
        diffusers pipeline) into a new directory ``output_path``.

        Returns a dict with ``quantized_path``, ``compression_ratio`` (source weight bytes / stored
        weight bytes), ``cosine_similarity`` (mean over quantized layers), ``model_size_mb``,
        ``modality``, ``bit_width``, ``quantization_time_s``, ``bits_per_weight``, per-layer details
        (``layers``), and what was kept (``skipped``), fell back (``fallbacks``) or failed
        (``errors``). ``progress_callback(message, progress)`` is called at least every 10 layers or
        5 seconds. The output appears only when complete; Ctrl-C or SIGTERM leaves nothing
        behind, and the staging directory of a run that was killed is removed by the next run
        into the same ``output_path``.

        ``resume=True``: when a run into ``output_path`` was interrupted (killed, or stopped while
        it too ran with ``resume``), continues after the tensors it completed, if its configuration
        and source files are the same; the result is byte-identical to an uninterrupted run
        (``result["resume"]`` says what was taken over). An interruption of a resumable run, or an
        error that stops it (a full disk), keeps its staging directory for the next ``resume``
        instead of removing it; the error message says where.

        ``cluster="ray"`` (or a Ray address such as ``"auto"`` or ``"ray://head:10001"``): the run is
        planned here and its tensors are quantized as Ray tasks on the cluster's workers, which must
        see ``model_path`` and the output's parent folder at the same paths; the output is
        byte-identical to a run on this machine (``result["cluster"]`` says how it was spread).
        Without Ray installed it runs here, with a warning (docs/cluster.md).

        ``report=True``: also writes the HTML quality report (plots of the error per layer, per
        timestep group, where the bits went; :func:`arrow_quant_v2.report`) beside the output, as
        ``<output_path>.report.html``; ``result["report_path"]`` names it. Needs matplotlib.
        """
        config = _resolve_config(config)
        if not isinstance(report, bool):
            raise ConfigurationError(f"report must be True or False; got {report!r}")
        if report:
            from .quality_report import _require_matplotlib

            _require_matplotlib()  # before quantizing, not after
        adapter = ProgressAdapter(progress_callback)
        result = run_quantize(os.fspath(model_path), os.fspath(output_path), config,
                              adapter if progress_callback is not None else None, bool(resume), cluster)
        result["warnings"] = list(result.get("warnings", []))
        if adapter.errors:
            extra = f" (and {len(adapter.errors) - 1} more times)" if len(adapter.errors) > 1 else ""
            result["warnings"].append(adapter.errors[0] + extra)
        result["deployment_profile"] = config.deployment_profile
        if report:
            from .quality_report import report as write_report

            result["report_path"] = write_report(result["quantized_path"], result=result)
        return result

    def validate_quality(self, original_path: PathLike, quantized_path: PathLike,
                         num_threads: int = 0) -> Dict[str, Any]:
        """Recomputes quality from the files: every stored tensor is decoded and compared with the
        original. Returns ``cosine_similarity`` (mean over quantized layers),
        ``per_layer_accuracy`` ({layer: cosine}), ``passed`` (every layer at or above the
        ``min_accuracy`` recorded in the manifest, kept layers byte-identical),
        ``compression_ratio``, and per-layer ``layers``. Raises ValidationError when the two
        models do not correspond."""
        with TerminateAsInterrupt():
            text = _core.validate_model(os.fspath(original_path), os.fspath(quantized_path), num_threads)
        return json.loads(text)

    def quantize(self, weights: Mapping[str, Any], bit_width: Optional[int] = None,
                 config: Optional[DiffusionQuantConfig] = None) -> Dict[str, QuantizedArray]:
        """Quantizes in-memory weights (LoRA, ControlNet deltas): a dict of arrays (numpy, or
        anything with ``.numpy()`` such as torch tensors). No files are written.

        Returns {name: QuantizedArray}; ``.dequantize()`` gives the values back, ``.codes`` the
        packed codes. Arrays of fewer than 2 dimensions are kept as they are (as in files).
        """
        config = _resolve_config(config)
        if bit_width is not None:
            config = config.replace(bit_width=bit_width)
        return quantize_arrays(weights, config)


def _resolve_config(config: Optional[DiffusionQuantConfig]) -> DiffusionQuantConfig:
    if config is None:
        return DiffusionQuantConfig()
    if not isinstance(config, DiffusionQuantConfig):
        raise ConfigurationError(f"config must be a DiffusionQuantConfig; got {type(config).__name__}")
    return config.validate()


__all__ = ["ArrowQuantV2", "QuantizationError", "ValidationError"]
