"""The pipeline's shape and resource requests, from the config and the cluster as it is at start.

- fused (CPU encoders, readers not pinned to their own node group): each encoder actor plans,
  reads, encodes and reduces whole slides (engine/slide_worker.py), so tile pixels never leave the
  process that decodes them and no other process does work: the actors hold every CPU, as the
  worker processes of a plain pool would.
- split (GPU encoders, or `ray.reader_resources` set): plans, region reads and reduces are CPU
  tasks (pinned with `ray.reader_resources`); encoder actors (one GPU each) receive the read tiles
  through the object store, never through the driver.

The encoder pool autoscales between `ray.encoders_min` and `ray.encoders_max` actors (Ray Data's
ActorPoolStrategy). No maximum (the default) lets it grow with the cluster: its pending actors'
requests are what a cluster autoscaler sees and adds nodes for (docs/clusters.md).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from ..errors import ConfigError


@dataclass
class PoolShape:
    fused: bool
    encoder_cpus: float
    encoder_gpus: float
    threads: int                      # torch/OpenCV threads per encoder actor
    batch_size: int                   # tiles per encoder batch
    encoders_min: int
    encoders_max: int | None          # None: as many as the cluster can hold, now or later
    task_slots: int                   # plans / reads / reduces at a time (fused: zero-CPU tasks)
    task_cpus: float                  # CPUs a plan, read or reduce task requests
    encoder_resources: dict = field(default_factory=dict)
    reader_resources: dict = field(default_factory=dict)
    readers_max: int | None = None    # split: reader tasks at a time (None: Ray Data decides)

    def describe(self) -> str:
        if self.encoders_max == 0:
            return f"no encoders: reduces from stored embeddings, {self.task_slots} at a time"
        dev = f"{self.encoder_gpus:g} GPU" if self.encoder_gpus else f"{self.encoder_cpus:g} CPU"
        hi = "unbounded" if self.encoders_max is None else str(self.encoders_max)
        shape = "fused read+encode" if self.fused else "reader tasks + encoder actors"
        return f"{self.encoders_min}..{hi} encoder actors × {dev} ({shape}), batch {self.batch_size}"


def pool_shape(cfg, cluster: dict, biggest_node_cpus: float) -> PoolShape:
    """`cluster`: ray.cluster_resources() at start. GPU encoders when GPUs exist or the config asks
    for CUDA (an autoscaling cluster may have its GPU group at zero when the job starts: the pool's
    pending actors make the autoscaler add GPU nodes)."""
    r = cfg.ray
    gpus, cpus = int(cluster.get("GPU", 0)), float(cluster.get("CPU", 1))
    use_gpu = cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and gpus > 0)
    fused = {"on": True, "off": False}.get(r.fuse_read_encode, not use_gpu and not r.reader_resources)
    if fused and use_gpu:
        raise ConfigError("ray.fuse_read_encode=on needs CPU encoders (model.device=cpu): a GPU encoder's "
                          "reads run as CPU tasks beside it")
    lo, hi = (r.num_encoders, r.num_encoders) if r.num_encoders else (r.encoders_min, r.encoders_max)
    common = {"encoder_resources": dict(r.encoder_resources), "reader_resources": dict(r.reader_resources),
              "encoders_min": lo, "encoders_max": hi}
    slots = max(2, int(cpus))
    if use_gpu:
        return PoolShape(False, 1.0, 1.0, 1, cfg.model.batch_size or 128, task_slots=r.num_readers or slots,
                         task_cpus=1.0, readers_max=r.num_readers, **common)
    # CPU encoders: about 8 model copies per node at most (memory), one thread each on small nodes.
    wcpus = r.encoder_cpus or max(1, round((biggest_node_cpus or 1) / 8))
    if fused:
        return PoolShape(True, wcpus, 0.0, int(wcpus), cfg.model.batch_size or 64, task_slots=slots,
                         task_cpus=0.0, **common)
    return PoolShape(False, wcpus, 0.0, int(wcpus), cfg.model.batch_size or 16, task_slots=r.num_readers or slots,
                     task_cpus=1.0, readers_max=r.num_readers, **common)


def chunk_target(n_tiles: int, chunk_tiles: int, workers: int, batch: int) -> int:
    """Tiles per chunk: a pass of a slide is shared by the encoder actors when it has a batch for
    each (the cohort's last slides would otherwise leave actors idle), never more than
    `ray.chunk_tiles` per chunk."""
    return max(1, min(chunk_tiles, max(batch, -(-n_tiles // max(1, workers)))))


def reduce_only_shape(cluster: dict) -> PoolShape:
    """`zeus reprompt` in full overlap: no encoder actors, only reduces from stored embeddings, as
    1-CPU tasks on every CPU."""
    slots = max(1, int(cluster.get("CPU", 1)))
    return PoolShape(False, 0.0, 0.0, 1, 1, encoders_min=0, encoders_max=0, task_slots=slots, task_cpus=1.0)
