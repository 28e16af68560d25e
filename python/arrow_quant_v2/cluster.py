"""Quantizing one model on a Ray cluster (``quantize_diffusion_model(..., cluster="ray")``,
``arrowquant quantize --ray [ADDRESS]``).

The driver plans the run once (``_core.DistributedRun``: headers validated, staging directory
created beside the output, the model budget planned); each part of the plan -- consecutive
tensors of a component, about ``part_bytes`` of source -- becomes a Ray task that quantizes them
into the staging directory's journal (``_core.quantize_part``), reading the source from the same
path; the driver then writes ``weights.parquet`` from the journal, the manifest, and renames the
staging directory onto the output (``DistributedRun.assemble``), quantizing itself any tensor no
part journaled. Journal entries are written atomically and are the same whoever writes them, so a
part that Ray retries after a worker died, or that the driver does instead, changes nothing: the
output is byte-identical to a run on one machine, for any number of workers.

Every worker must see the model and the output's parent folder at the driver's paths (one
machine, or a shared file system); a worker that sees other files (sizes, modification times) or
another version of the package refuses its part. Ray is optional: without it (or with
``cluster=None``) the same call runs on this machine.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple

from . import _core
from .config import DiffusionQuantConfig
from .errors import ArrowQuantError, ConfigurationError

PART_BYTES = 256 << 20  # source bytes per task: large enough that a task's overhead does not show
RAY_INSTALL = "pip install 'arrow_quant_v2[ray]'"


def ray_available() -> bool:
    try:
        import ray  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_cluster(cluster: Any) -> Optional[str]:
    """None / "local": this machine; "ray": the Ray cluster of RAY_ADDRESS or a running one, else a
    local one started for the run; any other string: that Ray address ("auto", "host:6379",
    "ray://host:10001"). Returns None for local runs, else the address ("" for Ray's default)."""
    if cluster is None or cluster is False or cluster == "local":
        return None
    if cluster is True or cluster == "ray":
        return ""
    if isinstance(cluster, str) and cluster.strip():
        return cluster.strip()
    raise ConfigurationError(f"cluster must be None, 'local', 'ray' or a Ray address; got {cluster!r}")


class RaySession:
    """ray.init for the duration of a run when Ray is not initialized yet (and ray.shutdown after);
    a session the caller started is used as it is."""

    def __init__(self, address: str) -> None:
        self.address = address
        self.started = False

    def __enter__(self) -> "RaySession":
        import ray

        if not ray.is_initialized():
            kwargs: Dict[str, Any] = {"log_to_driver": False, "include_dashboard": False,
                                      "configure_logging": False}
            if self.address:
                kwargs["address"] = self.address
            ray.init(**kwargs)
            self.started = True
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.started:
            import ray

            ray.shutdown()


def plan_parts(plan: Dict[str, Any], part_bytes: int = PART_BYTES) -> List[Tuple[int, int, int, int]]:
    """The plan's tensors not yet journaled, as (component index, first, last, source bytes) ranges
    of consecutive tensors, each closed once it holds part_bytes of source."""
    parts = []
    for comp in plan["components"]:
        tensors = comp["tensors"]
        first, size = None, 0
        for k, t in enumerate(tensors + [None]):
            if t is None or t["journaled"]:
                if first is not None:
                    parts.append((comp["index"], first, k, size))
                first, size = None, 0
                continue
            if first is None:
                first = k
            size += t["bytes"]
            if size >= part_bytes:
                parts.append((comp["index"], first, k + 1, size))
                first, size = None, 0
    return parts


def _run_part(model_path: str, plan_json: str, config_json: str, component: int, first: int,
              last: int) -> Dict[str, Any]:
    """The body of a Ray task (on a worker)."""
    t = time.perf_counter()
    out = json.loads(_core.quantize_part(model_path, plan_json, config_json, component, first, last))
    import ray

    out.update(host=socket.gethostname(), pid=os.getpid(), node=ray.get_runtime_context().get_node_id(),
               wall_s=time.perf_counter() - t)
    return out


def as_completed(pending: Dict[Any, int]) -> Iterator[Tuple[int, Callable[[], Any]]]:
    """Yields (index, get) for Ray tasks {ref: index} as they finish; ``get()`` returns the task's
    result or raises its error. The tasks still running are cancelled when the caller stops early
    (an exception, Ctrl-C)."""
    import ray

    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=0.5)
            for ref in ready:
                yield pending.pop(ref), (lambda ref=ref: ray.get(ref))
    finally:
        for ref in pending:
            ray.cancel(ref, force=True)


def _cause(err: BaseException) -> BaseException:
    """The exception a Ray task raised (ArrowQuantError subclasses come back as themselves)."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


# progress(tensors_done, tensors_total, weights_done, weights_total, elapsed_s, eta_s, current) -> stop?,
# as the core calls it (ProgressAdapter, the command line's bar)
Progress = Callable[[int, int, int, int, float, float, str], bool]


def quantize_distributed(model_path: str, output_path: str, config: DiffusionQuantConfig, address: str,
                         progress: Optional[Progress] = None, resume: bool = False,
                         part_bytes: int = PART_BYTES, cpus_per_task: int = 1,
                         max_retries: int = 3) -> Dict[str, Any]:
    """Quantizes model_path into output_path on the Ray cluster at ``address`` ("" for Ray's
    default). Returns the engine's report with a ``cluster`` section."""
    import ray

    if not isinstance(part_bytes, int) or part_bytes < 1:
        raise ConfigurationError(f"part_bytes must be a positive integer; got {part_bytes!r}")
    if not isinstance(cpus_per_task, int) or cpus_per_task < 1:
        raise ConfigurationError(f"cpus_per_task must be a positive integer; got {cpus_per_task!r}")
    t0 = time.perf_counter()
    config_json = config._engine_json()
    run = _core.DistributedRun(model_path, output_path, config_json, bool(resume))
    plan_json = run.plan_json
    plan = json.loads(plan_json)
    plan_s = time.perf_counter() - t0
    parts = plan_parts(plan, part_bytes)
    # each task's engine runs on the CPUs Ray gives it (the output does not depend on the count)
    task_config = json.dumps(dict(json.loads(config_json), num_threads=cpus_per_task))
    tensors = {c["index"]: c["tensors"] for c in plan["components"]}
    all_tensors = [t for ts in tensors.values() for t in ts]
    count = {"tensors": sum(t["journaled"] for t in all_tensors),
             "weights": sum(t["numel"] for t in all_tensors if t["journaled"])}
    totals = (len(all_tensors), sum(t["numel"] for t in all_tensors))

    def say(current: str) -> None:
        if progress is None:
            return
        elapsed = time.perf_counter() - t0
        w = count["weights"]
        eta = elapsed * (totals[1] - w) / w if w else -1.0
        if progress(count["tensors"], totals[0], w, totals[1], elapsed, eta, current):
            raise KeyboardInterrupt("quantization interrupted from the progress callback")

    # SPREAD: parts go to every node rather than filling the driver's first
    remote = ray.remote(_run_part).options(num_cpus=cpus_per_task, max_retries=max_retries, retry_exceptions=False,
                                           name="arrowquant_part", scheduling_strategy="SPREAD")
    model_abs, pending = os.path.abspath(model_path), {}
    done: List[Dict[str, Any]] = []
    failed: List[Dict[str, Any]] = []
    t1 = time.perf_counter()
    try:
        for i, (c, a, b, _) in enumerate(parts):
            pending[remote.remote(model_abs, plan_json, task_config, c, a, b)] = i
        say(f"{len(parts)} parts on the Ray cluster")
        for i, get in as_completed(pending):
            try:
                r = get()
            except (ray.exceptions.WorkerCrashedError, ray.exceptions.NodeDiedError,
                    ray.exceptions.RaySystemError, ray.exceptions.ObjectLostError) as e:
                # out of retries: the driver quantizes what the part did not journal
                failed.append({"part": list(parts[i][:3]), "error": f"{type(e).__name__}: {e}"})
                continue
            except ray.exceptions.RayTaskError as e:
                raise _cause(e) from None
            c, a, b, _ = parts[i]
            r["part"] = [c, a, b]
            done.append(r)
            count["tensors"] += b - a
            count["weights"] += sum(t["numel"] for t in tensors[c][a:b])
            say(f"part {len(done)}/{len(parts)} on {r['host']}: {tensors[c][b - 1]['name']}")
    except BaseException:
        if resume:
            run.keep()  # the parts journaled so far stay for the next run with resume
        del run
        raise
    parts_s = time.perf_counter() - t1
    t2 = time.perf_counter()
    report = json.loads(run.assemble(progress))
    assemble_s = time.perf_counter() - t2
    total_tensors = sum(len(c["tensors"]) for c in plan["components"])
    workers = sorted({(r["node"], r["pid"]) for r in done})
    report["cluster"] = {
        "backend": "ray",
        "address": address or "default",
        "nodes": len([n for n in ray.nodes() if n.get("Alive")]),
        "parts": len(parts),
        "part_bytes": part_bytes,
        "cpus_per_task": cpus_per_task,
        "workers": len(workers),
        "nodes_used": len({n for n, _ in workers}),
        "hosts": sorted({r["host"] for r in done}),
        "tensors_from_parts": int(report.get("journaled_tensors", 0)),
        "tensors_by_driver": total_tensors - int(report.get("journaled_tensors", 0)),
        "failed_parts": failed,
        "plan_s": plan_s,
        "parts_s": parts_s,
        "assemble_s": assemble_s,
        "part_engine_s": sum(r["seconds"] for r in done),
    }
    if failed:
        report.setdefault("warnings", []).append(
            f"{len(failed)} part(s) failed on the cluster beyond Ray's retries ({failed[0]['error']}); the driver "
            f"quantized their tensors")
    return report


def _record_share(make_pipe: Callable[[], Any], runs: List[Any], first: int, total: int, num_inference_steps: int,
                  shard_path: str, record_kwargs: Dict[str, Any]) -> Dict[str, Any]:
    """The body of a recording task (on a worker): its share of the runs, saved as a shard."""
    import ray

    from .calibration import record_pipeline

    t = time.perf_counter()
    rec = record_pipeline(make_pipe(), runs, num_inference_steps, output_path=shard_path, shard=(first, total),
                          progress=False, **record_kwargs)
    return {"calls": rec.calls, "recorded": rec.recorded_calls, "seconds": time.perf_counter() - t,
            "node": ray.get_runtime_context().get_node_id(), "pid": os.getpid()}


def record_on_ray(make_pipe: Callable[[], Any], prompts_or_kwargs: Any, num_inference_steps: int,
                  output_path: str, cluster: Any = "ray", workers: Optional[int] = None, cpus_per_task: int = 1,
                  **record_kwargs: Any) -> Dict[str, Any]:
    """Records calibration on a Ray cluster: the runs (prompts or pipeline-argument dicts, as for
    ``record_pipeline``) are split into ``workers`` contiguous shares (default: one per CPU slot of
    ``cpus_per_task``, at most one per run); each share is a task that builds the pipeline with
    ``make_pipe()`` (a function the workers can call: it loads the pipeline there) and records its
    runs as a shard, numbering its calls in the whole recording; the driver merges the shards
    (``merge_calibration``) into ``output_path``. The file is the one ``record_pipeline`` of every
    run on one machine writes with ``holdout_rule="sample"``, but for floating-point summation
    order in the Hessians and step sums. ``record_kwargs`` go to ``record_pipeline`` (max_samples,
    num_bins, max_memory, ...). Shards are written beside ``output_path`` (a folder every worker
    must see) and removed. Without Ray the runs are recorded here, in one shard-free pass.
    Returns {"path", "shards", "calls", "seconds", "nodes_used", "backend"}."""
    from .calibration import merge_calibration, record_pipeline

    if isinstance(prompts_or_kwargs, (str, dict)):
        runs = [prompts_or_kwargs]
    else:
        runs = list(prompts_or_kwargs)
    if not runs:
        raise ConfigurationError("record_on_ray: no runs given")
    for k in ("shard", "output_path", "holdout_rule"):
        if k in record_kwargs:
            raise ConfigurationError(f"record_on_ray sets {k} itself")
    output_path = os.path.abspath(os.fspath(output_path))
    address = resolve_cluster(cluster)
    t0 = time.perf_counter()
    if address is not None and not ray_available():
        run_local_instead(cluster)
        address = None
    if address is None:
        rec = record_pipeline(make_pipe(), runs, num_inference_steps, output_path=output_path, holdout_rule="sample",
                              **record_kwargs)
        return {"path": output_path, "shards": 0, "calls": rec.calls, "seconds": time.perf_counter() - t0,
                "nodes_used": 1, "backend": "local"}
    import shutil
    import tempfile

    import ray

    with RaySession(address):
        if workers is None:
            slots = int(ray.cluster_resources().get("CPU", 1)) // cpus_per_task
            workers = max(1, min(len(runs), slots))
        if not isinstance(workers, int) or workers < 1:
            raise ConfigurationError(f"workers must be a positive integer; got {workers!r}")
        workers = min(workers, len(runs))
        bounds = [len(runs) * w // workers for w in range(workers + 1)]
        folder = tempfile.mkdtemp(prefix=f".{os.path.basename(output_path)}.shards-",
                                  dir=os.path.dirname(output_path))
        try:
            remote = ray.remote(_record_share).options(num_cpus=cpus_per_task, max_retries=3, retry_exceptions=False,
                                                       name="arrowquant_record", scheduling_strategy="SPREAD")
            refs = [remote.remote(make_pipe, runs[a:b], a, len(runs), num_inference_steps,
                                  os.path.join(folder, f"shard-{w}.parquet"), record_kwargs)
                    for w, (a, b) in enumerate(zip(bounds, bounds[1:]))]
            try:
                results = ray.get(refs)
            except ray.exceptions.RayTaskError as e:
                raise _cause(e) from None
            except BaseException:
                for ref in refs:
                    ray.cancel(ref, force=True)
                raise
            merge_calibration([os.path.join(folder, f"shard-{w}.parquet") for w in range(workers)], output_path)
        finally:
            shutil.rmtree(folder, ignore_errors=True)
    return {"path": output_path, "shards": workers, "calls": sum(r["calls"] for r in results),
            "seconds": time.perf_counter() - t0, "nodes_used": len({r["node"] for r in results}), "backend": "ray",
            "shard_seconds": [r["seconds"] for r in results]}


def run_local_instead(cluster: Any) -> None:
    """Warns that Ray is missing and the run goes on here."""
    warnings.warn(f"cluster={cluster!r} needs Ray, which is not installed ({RAY_INSTALL}); quantizing on this "
                  f"machine instead", RuntimeWarning, stacklevel=3)


__all__ = ["quantize_distributed", "record_on_ray", "as_completed", "resolve_cluster", "ray_available", "plan_parts", "RaySession",
           "PART_BYTES"]
