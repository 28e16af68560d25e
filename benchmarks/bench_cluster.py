"""Ray on this machine (issue 14): a zoo run on one worker and on two, the cost of a task to the
driver, and what a 100 B-class checkpoint would take on N workers (an extrapolation from measured
costs, not a run).

Every Ray figure uses ray.cluster_utils.Cluster: nodes of one CPU each on this machine, started
and stopped here, so "2 workers" is this machine's two cores as two nodes.

    .venv/bin/python benchmarks/bench_cluster.py [--models 6] [--layers 12] [--workdir W]

1. Zoo: --models models of --layers DiT-XL-width blocks each (bf16; per block a 1152 x 4608 and a
   4608 x 1152 MLP weight and a 1152 x 3456 qkv, 12.4 M weights), profile `local`, one job per
   model and profile: run_zoo on a 1-node cluster, on a 2-node cluster, and here without Ray
   (one job at a time on both cores), alternated over --rounds.
2. Per task: a distributed run whose parts each hold one tiny tensor (200 of them, sharded in 10
   files): the wall time per part, what the worker's engine spends per part (opening the model
   and checking the plan), and Ray's own share (the rest).
3. Extrapolation: the measured throughput of one worker on these blocks (M weights/s) and the
   per-part costs, for 100 B weights in 256 MiB parts on N one-core workers:
   T(N) = W / (rate * N) + parts * per_part / N, plus the driver's assembly (measured on one model).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

import arrow_quant_v2 as aq
from arrow_quant_v2.cluster import PART_BYTES, quantize_distributed
from arrow_quant_v2.safetensors_writer import write_safetensors
from arrow_quant_v2.zoo import run_zoo


def _bf16(a: np.ndarray) -> np.ndarray:
    return (a.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)


def make_model(root: str, layers: int, seed: int) -> int:
    """A DiT-XL-width stack of blocks, bf16; returns the weight count."""
    os.makedirs(root, exist_ok=True)
    rng = np.random.default_rng(seed)
    shapes = {}
    for i in range(layers):
        shapes[f"blocks.{i}.attn.qkv.weight"] = (3456, 1152)
        shapes[f"blocks.{i}.mlp.fc1.weight"] = (4608, 1152)
        shapes[f"blocks.{i}.mlp.fc2.weight"] = (1152, 4608)
    write_safetensors(os.path.join(root, "model.safetensors"), [(n, "BF16", s) for n, s in shapes.items()],
                      lambda n: _bf16(rng.standard_normal(shapes[n], dtype=np.float32) * 0.02))
    with open(os.path.join(root, "config.json"), "w") as f:
        json.dump({"architectures": ["DiT"]}, f)
    return sum(int(np.prod(s)) for s in shapes.values())


def make_tiny_sharded(root: str, tensors: int = 200, shards: int = 10) -> None:
    os.makedirs(root, exist_ok=True)
    weight_map = {}
    per = tensors // shards
    for k in range(shards):
        names = [f"blocks.{k * per + i}.weight" for i in range(per)]
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(os.path.join(root, fname), [(n, "F32", (64, 64)) for n in names],
                          lambda n: np.full((64, 64), 0.01, np.float32))
        weight_map.update({n: fname for n in names})
    with open(os.path.join(root, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)


class Nodes:
    """A Ray cluster of `n` one-CPU nodes on this machine, with the driver connected."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        import ray
        from ray.cluster_utils import Cluster

        self.cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
        for _ in range(self.n - 1):
            self.cluster.add_node(num_cpus=1)
        self.cluster.wait_for_nodes()
        ray.init(address=self.cluster.address, log_to_driver=False, configure_logging=False)
        warm = ray.remote(lambda: time.sleep(0.3)).options(scheduling_strategy="SPREAD")
        ray.get([warm.remote() for _ in range(2 * self.n)])  # a worker process up on every node
        return self.cluster.address

    def __exit__(self, *exc):
        import ray

        ray.shutdown()
        self.cluster.shutdown()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", type=int, default=6)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workdir")
    a = p.parse_args()
    work = a.workdir or tempfile.mkdtemp(prefix="aq-cluster-")
    try:
        models = []
        weights = a.layers * 1152 * (3456 + 4608 + 4608)
        for i in range(a.models):
            root = os.path.join(work, "models", f"dit{i}-{a.layers}")
            if not os.path.exists(root):
                make_model(root, a.layers, seed=i)
            models.append(root)
        zoo = {"output": os.path.join(work, "zoo-out"), "profiles": ["local"], "cpus_per_job": 1,
               "models": [{"path": m} for m in models]}
        zoo_local = dict(zoo, config={"num_threads": 2})
        total_w = weights * a.models
        print(f"# Zoo: {a.models} models x 1 profile (local), {weights / 1e6:.1f} M weights each, "
              f"{total_w / 1e6:.0f} M in all\n")
        print("| run | round | wall | M weights/s |\n|---|---|---|---|")
        times = {"ray-1": [], "ray-2": [], "local": []}
        for r in range(a.rounds):
            for kind in ("ray-1", "ray-2", "local"):
                if kind == "local":
                    t = time.perf_counter()
                    s = run_zoo(zoo_local, cluster="local", base_dir="/")
                    wall = time.perf_counter() - t
                else:
                    with Nodes(int(kind[-1])) as address:
                        t = time.perf_counter()
                        s = run_zoo(zoo, cluster=address, base_dir="/")
                        wall = time.perf_counter() - t
                assert s["failed"] == 0, s
                times[kind].append(wall)
                print(f"| {kind} | {r + 1} | {wall:.1f} s | {total_w / wall / 1e6:.1f} |", flush=True)
        t1, t2, tl = (sum(times[k]) for k in ("ray-1", "ray-2", "local"))
        print(f"\nScaling 1 -> 2 workers: {t1 / t2:.2f}x (sum over rounds); 2 Ray workers against one local "
              f"job at a time on 2 threads: {tl / t2:.2f}x\n")
        rate = total_w / (t1 / a.rounds)  # weights per second on one one-core worker

        # the driver's assembly (weights.parquet written from the journal) on one model
        with Nodes(2) as address:
            one = quantize_distributed(models[0], os.path.join(work, "one-out"),
                                       aq.DiffusionQuantConfig.from_profile("local", overwrite=True), address,
                                       part_bytes=64 << 20)
        assemble_rate = one["quantized_weight_bytes"] / one["cluster"]["assemble_s"]
        print(f"One model distributed ({one['cluster']['parts']} parts of 64 MiB): assembling its "
              f"{one['quantized_weight_bytes'] / 2**20:.0f} MiB of output on the driver took "
              f"{one['cluster']['assemble_s']:.2f} s ({assemble_rate / 1e6:.0f} MB/s)\n")

        # 2. per task
        tiny = os.path.join(work, "tiny")
        if not os.path.exists(tiny):
            make_tiny_sharded(tiny)
        cfg = aq.DiffusionQuantConfig(min_tensor_size=0, overwrite=True)
        with Nodes(2) as address:
            rows = []
            for _ in range(3):
                t = time.perf_counter()
                rep = quantize_distributed(tiny, os.path.join(work, "tiny-out"), cfg, address, part_bytes=1)
                wall = time.perf_counter() - t
                c = rep["cluster"]
                rows.append((wall, c["parts"], c["parts_s"], c["part_engine_s"], c["plan_s"], c["assemble_s"]))
        wall, parts, parts_s, engine_s, plan_s, assemble_s = rows[-1]
        per_part_wall = statistics.median(r[2] / r[1] * 2 for r in rows)  # 2 workers: a part's slot time
        per_part_engine = statistics.median(r[3] / r[1] for r in rows)
        print("# Per task: 200 tensors of 64 x 64 in 10 shards, one part each, 2 workers\n")
        print("| run | parts | wall | plan | parts | assemble | engine per part |\n|---|---|---|---|---|---|---|")
        for i, r in enumerate(rows):
            print(f"| {i + 1} | {r[1]} | {r[0]:.2f} s | {r[4] * 1e3:.0f} ms | {r[2]:.2f} s | {r[5] * 1e3:.0f} ms | "
                  f"{r[3] / r[1] * 1e3:.1f} ms |")
        print(f"\nA part costs a worker {per_part_wall * 1e3:.1f} ms of its time (median), of which the engine "
              f"{per_part_engine * 1e3:.1f} ms (opening the 10 shards' headers, checking the plan): Ray's own "
              f"share {max(0.0, per_part_wall - per_part_engine) * 1e3:.1f} ms.\n")

        # 3. extrapolation
        W = 100e9
        parts100 = int(W * 2 / PART_BYTES) + 1  # bf16: 2 bytes per weight
        print(f"# Extrapolation (not a run): 100 B weights (bf16, {parts100} parts of 256 MiB), profile local, "
              f"one-core workers at the measured {rate / 1e6:.1f} M weights/s each and {per_part_wall * 1e3:.0f} ms "
              f"per part\n")
        print("| workers | quantize | of which per-part overhead |\n|---|---|---|")
        for n in (1, 2, 8, 32, 64, 256):
            t = W / (rate * n) + parts100 * per_part_wall / n
            print(f"| {n} | {t / 60:.1f} min | {parts100 * per_part_wall / n:.1f} s |")
        out_bytes = W * one["quantized_weight_bytes"] / weights
        print(f"\nPlus the driver's assembly, sequential whatever N: {out_bytes / 1e9:.0f} GB of output at the "
              f"{assemble_rate / 1e6:.0f} MB/s measured here (from the page cache; at that size the disks' rate "
              f"bounds it), {out_bytes / assemble_rate / 60:.1f} min. Not included: reading 200 GB of source over "
              f"the shared file system (each worker reads only its parts).")
    finally:
        if a.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
