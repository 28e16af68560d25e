"""Many models x profiles as one job (``arrowquant zoo CONFIG.yaml``, :func:`run_zoo`): on a Ray
cluster each (model, profile) is a task on a worker, else they run one after the other here. A
model that fails (a corrupt file, a bad config) is reported with its error and does not stop the
others. Returns (and writes as ``zoo-summary.json`` in the output folder) one row per job: size,
bits per weight, worst layer, time, or the error.

The configuration (YAML or JSON), paths relative to its own folder::

    output: zoo-out               # each job writes <output>/<name>-<profile>
    profiles: [edge, local, cloud]
    config: {num_threads: 1}      # DiffusionQuantConfig fields for every job (optional)
    cpus_per_job: 1               # Ray: CPUs each job asks for, and its engine's threads
    models:
      - path: models/sd15-ft1     # a .safetensors file, HF folder or diffusers pipeline
        name: sd15-ft1            # optional: the folder's (or file's) name
        profiles: [local]         # optional: instead of the top-level profiles
        config: {bit_width: 3}    # optional: fields for this model's jobs
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional

from . import _core
from .cluster import RaySession, as_completed, ray_available, resolve_cluster, run_local_instead
from .config import PROFILES, DiffusionQuantConfig
from .errors import ArrowQuantError, ConfigurationError

SUMMARY_FILE = "zoo-summary.json"


@dataclass
class ZooJob:
    name: str
    model: str
    profile: str
    output: str
    config: Dict[str, Any] = field(default_factory=dict)

    def source_bytes(self) -> int:
        if os.path.isfile(self.model):
            return os.path.getsize(self.model)
        total = 0
        for root, _, files in os.walk(self.model):
            total += sum(os.path.getsize(os.path.join(root, f)) for f in files if f.endswith(".safetensors"))
        return total


def load_zoo_config(path: str) -> Dict[str, Any]:
    """The zoo configuration file (YAML, or JSON), checked."""
    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise ConfigurationError(f"{path}: cannot read the zoo configuration: {e.strerror}") from None
    import yaml

    try:
        cfg = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigurationError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(cfg, dict):
        raise ConfigurationError(f"{path}: the zoo configuration must be a mapping (output, profiles, models)")
    return cfg


def plan_jobs(cfg: Dict[str, Any], base_dir: str = ".") -> List[ZooJob]:
    """One job per model and profile, in the configuration's order."""
    where = "zoo configuration"
    unknown = set(cfg) - {"output", "profiles", "config", "models", "cpus_per_job", "ray", "overwrite"}
    if unknown:
        raise ConfigurationError(f"{where}: unknown keys {sorted(unknown)}")
    models = cfg.get("models")
    if not isinstance(models, list) or not models:
        raise ConfigurationError(f"{where}: 'models' must be a non-empty list")
    output = cfg.get("output")
    if not isinstance(output, str) or not output:
        raise ConfigurationError(f"{where}: 'output' must be a folder path")
    output = os.path.join(base_dir, output)

    def profiles_of(v: Any, what: str) -> List[str]:
        if isinstance(v, str):
            v = [v]
        if not isinstance(v, list) or not v or any(p not in PROFILES for p in v):
            raise ConfigurationError(f"{where}: {what} must be a list of {', '.join(PROFILES)}; got {v!r}")
        return list(v)

    def fields_of(v: Any, what: str) -> Dict[str, Any]:
        if v is None:
            return {}
        if not isinstance(v, dict):
            raise ConfigurationError(f"{where}: {what} must be a mapping of DiffusionQuantConfig fields; got {v!r}")
        return dict(v)

    top_profiles = profiles_of(cfg.get("profiles", ["local"]), "'profiles'")
    top_fields = fields_of(cfg.get("config"), "'config'")
    if cfg.get("overwrite", True):
        top_fields.setdefault("overwrite", True)
    jobs, names = [], set()
    for i, m in enumerate(models):
        if isinstance(m, str):
            m = {"path": m}
        if not isinstance(m, dict) or not isinstance(m.get("path"), str):
            raise ConfigurationError(f"{where}: models[{i}] must be a path or a mapping with 'path'; got {m!r}")
        extra = set(m) - {"path", "name", "profiles", "config"}
        if extra:
            raise ConfigurationError(f"{where}: models[{i}]: unknown keys {sorted(extra)}")
        path = os.path.join(base_dir, m["path"])
        name = m.get("name") or os.path.basename(os.path.normpath(path)).removesuffix(".safetensors")
        if name in names:
            raise ConfigurationError(f"{where}: models[{i}]: the name {name!r} is used twice (set 'name')")
        names.add(name)
        fields = dict(top_fields, **fields_of(m.get("config"), f"models[{i}].config"))
        for profile in profiles_of(m.get("profiles", top_profiles), f"models[{i}].profiles"):
            jobs.append(ZooJob(name, path, profile, os.path.join(output, f"{name}-{profile}"), fields))
    return jobs


def run_job(job: ZooJob, threads: int = 0) -> Dict[str, Any]:
    """Quantizes one job; never raises for a failure of the model (the row carries the error)."""
    row: Dict[str, Any] = {"name": job.name, "model": job.model, "profile": job.profile, "output": job.output}
    t = time.perf_counter()
    try:
        fields = dict(job.config)
        if threads:
            fields["num_threads"] = threads
        config = DiffusionQuantConfig.from_profile(job.profile, **fields)
        r = json.loads(_core.quantize_model(job.model, job.output, config._engine_json(), None, 10, 5.0, False))
    except ArrowQuantError as e:
        row.update(status="failed", error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t)
        return row
    except Exception as e:  # noqa: BLE001 - one model's surprise must not stop the zoo
        row.update(status="failed", error=f"{type(e).__name__}: {e}", seconds=time.perf_counter() - t,
                   traceback=traceback.format_exc(limit=5))
        return row
    worst = min((l for l in r["layers"] if l.get("quantized")), key=lambda l: l["cosine_similarity"], default=None)
    row.update(status="done", seconds=time.perf_counter() - t, size_mb=r["model_size_mb"],
               source_mb=r["source_weight_bytes"] / 2**20, bits_per_weight=r["bits_per_weight"],
               compression_ratio=r["compression_ratio"], cosine_similarity=r["cosine_similarity"],
               worst_layer=worst["name"] if worst else None,
               worst_cosine=worst["cosine_similarity"] if worst else None,
               quantized_layers=r["quantized_layers"], warnings=len(r.get("warnings", [])))
    return row


def _ray_job(job: ZooJob, threads: int) -> Dict[str, Any]:
    import ray

    row = run_job(job, threads)
    row["node"] = ray.get_runtime_context().get_node_id()
    return row


def run_zoo(config: Any, cluster: Any = None, progress: Optional[Callable[[int, int, Dict[str, Any]], object]] = None,
            base_dir: Optional[str] = None) -> Dict[str, Any]:
    """Runs every job of a zoo configuration (a path to YAML/JSON, or the mapping itself).
    ``cluster``: None (the configuration's ``ray`` key, else this machine), "local", "ray" or a
    Ray address. ``progress(done, total, row)`` after each job. Returns {"jobs": rows, "done",
    "failed", "seconds", "backend", "workers"} and writes it to <output>/zoo-summary.json."""
    if isinstance(config, (str, os.PathLike)):
        path = os.fspath(config)
        cfg = load_zoo_config(path)
        base_dir = base_dir if base_dir is not None else os.path.dirname(os.path.abspath(path))
    elif isinstance(config, dict):
        cfg = dict(config)
    else:
        raise ConfigurationError(f"config must be a path or a mapping; got {type(config).__name__}")
    jobs = plan_jobs(cfg, base_dir or ".")
    cpus = cfg.get("cpus_per_job", 1)
    if not isinstance(cpus, int) or cpus < 1:
        raise ConfigurationError(f"zoo configuration: cpus_per_job must be a positive integer; got {cpus!r}")
    address = resolve_cluster(cluster if cluster is not None else cfg.get("ray"))
    if address is not None and not ray_available():
        run_local_instead(cluster)
        address = None
    output = os.path.join(base_dir or ".", cfg["output"])
    os.makedirs(output, exist_ok=True)
    t0 = time.perf_counter()
    rows: List[Optional[Dict[str, Any]]] = [None] * len(jobs)

    def finished(i: int, row: Dict[str, Any]) -> None:
        rows[i] = row
        if progress is not None:
            progress(sum(r is not None for r in rows), len(jobs), row)

    if address is None:
        for i, job in enumerate(jobs):
            finished(i, run_job(job))
        backend, workers = "local", 1
    else:
        import ray

        with RaySession(address):
            remote = ray.remote(_ray_job).options(num_cpus=cpus, max_retries=3, name="arrowquant_zoo_job",
                                                  scheduling_strategy="SPREAD")
            pending = {remote.remote(job, cpus): i for i, job in enumerate(jobs)}
            for i, get in as_completed(pending):
                try:
                    row = get()
                except ray.exceptions.RayError as e:  # the worker died beyond its retries
                    job = jobs[i]
                    row = {"name": job.name, "model": job.model, "profile": job.profile, "output": job.output,
                           "status": "failed", "error": f"{type(e).__name__}: {e}"}
                finished(i, row)
            backend = "ray"
            workers = len({r.get("node") for r in rows if r and r.get("node")})
    summary = {"jobs": rows, "done": sum(r["status"] == "done" for r in rows),
               "failed": sum(r["status"] == "failed" for r in rows), "seconds": time.perf_counter() - t0,
               "backend": backend, "nodes_used": workers, "output": output}
    tmp = os.path.join(output, SUMMARY_FILE + ".part")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(summary, f, indent=2)
    os.replace(tmp, os.path.join(output, SUMMARY_FILE))
    return summary


def format_summary(summary: Dict[str, Any]) -> str:
    """The summary as a Markdown table."""
    lines = ["| model | profile | size | bits/weight | worst layer | time | status |",
             "|---|---|---:|---:|---|---:|---|"]
    for r in summary["jobs"]:
        if r["status"] == "done":
            worst = f"{r['worst_layer']} ({r['worst_cosine']:.4f})" if r.get("worst_layer") else "-"
            lines.append(f"| {r['name']} | {r['profile']} | {r['size_mb']:.1f} MiB | {r['bits_per_weight']:.3f} | "
                         f"{worst} | {r['seconds']:.1f} s | done |")
        else:
            lines.append(f"| {r['name']} | {r['profile']} | | | | {r.get('seconds', 0.0):.1f} s | "
                         f"failed: {r['error'].splitlines()[0][:160]} |")
    lines.append(f"\n{summary['done']} done, {summary['failed']} failed in {summary['seconds']:.1f} s "
                 f"({summary['backend']}{', ' + str(summary['nodes_used']) + ' nodes' if summary['backend'] == 'ray' else ''})")
    return "\n".join(lines)


__all__ = ["run_zoo", "plan_jobs", "load_zoo_config", "format_summary", "ZooJob", "run_job"]
