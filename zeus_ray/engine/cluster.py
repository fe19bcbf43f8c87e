"""Ray for the cohort job: start or join a cluster (quietly, with one clear line when an address
cannot be reached) and size the worker pool from the cluster's resources.

Pool shapes (`PoolPlan`):
- fused (CPU encoders, readers not pinned to their own node group): each worker actor plans,
  reads, encodes, writes and reduces the slides it is given, so tile pixels never leave the
  process that decodes them (no object-store copies) — the shape of a plain process pool.
- split (GPU encoders, or `ray.reader_resources` set): plans, region reads and reduces are CPU
  tasks (pinned with `ray.reader_resources`), encoders are actors (one per GPU); read tiles go from
  the reader to the encoder through the object store, never through the driver.
"""
from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass, field

from ..errors import ConfigError
from .connect import join

log = logging.getLogger(__name__)

def resolve_address(cfg) -> str:
    """The address to join, or "local" for a new local cluster. Never the last cluster Ray
    remembers in /tmp/ray/ray_current_cluster (a dead `ray start` leaves it behind) unless asked
    with `auto`: only ray.address, --address or RAY_ADDRESS join an existing cluster."""
    return cfg.ray.address or os.environ.get("RAY_ADDRESS") or "local"


class _AuthNotice(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Token authentication is enabled for this Ray cluster")


def init_ray(cfg) -> bool:
    """Start a local Ray or join the configured cluster; True when this call started Ray."""
    import ray
    if ray.is_initialized():
        return False
    address = resolve_address(cfg)
    if address != "local":   # in seconds or one line: `auto`, stale addresses, token auth (connect.py)
        join(address)
        return True
    # Ray turns token authentication on for new local clusters and says so on every run: keep it
    # on, drop the notice (a filter on that one logger and message).
    logging.getLogger("ray._private.authentication.authentication_token_setup").addFilter(_AuthNotice())
    # Workers of a local cluster inherit the environment the raylet starts with (cloud and hub
    # settings included); they also need the driver's import path. Set for the start only: a
    # runtime_env would do the same per worker, about a second slower.
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
    try:
        ray.init(address="local", include_dashboard=False, log_to_driver=True, configure_logging=False)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH", None)
        else:
            os.environ["PYTHONPATH"] = old
    return True


@dataclass
class PoolPlan:
    fused: bool
    n_workers: int                    # encoder actors
    worker_cpus: float
    worker_gpus: float
    threads: int                      # torch/OpenCV threads per worker
    batch_size: int
    n_readers: int = 0                # split mode: concurrent CPU tasks (plans, reads, reduces)
    worker_resources: dict = field(default_factory=dict)
    reader_resources: dict = field(default_factory=dict)

    def describe(self) -> str:
        dev = f"{self.worker_gpus:g} GPU" if self.worker_gpus else f"{self.worker_cpus:g} CPU"
        shape = ("fused read+encode workers" if self.fused
                 else f"encoder actors fed by {self.n_readers} reader task slots")
        return f"{self.n_workers} × {dev} {shape}, batch {self.batch_size}"


def pool_plan(cfg) -> PoolPlan:
    """Size the pool from the cluster. GPU encoders when GPUs exist or the config asks for CUDA
    (an autoscaling cluster may have its GPU group at zero when the job starts: the pool's requests
    make the autoscaler add GPU nodes)."""
    import ray
    r = cfg.ray
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), float(res.get("CPU", 1))
    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1) or 1
    use_gpu = cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and gpus > 0)
    fused = {"on": True, "off": False}.get(r.fuse_read_encode, not use_gpu and not r.reader_resources)
    if fused and use_gpu:
        raise ConfigError("ray.fuse_read_encode=on needs CPU encoders (model.device=cpu): a GPU encoder's "
                          "reads run as CPU tasks beside it")
    common = {"worker_resources": dict(r.encoder_resources), "reader_resources": dict(r.reader_resources)}
    if use_gpu:
        n = r.num_encoders or max(1, gpus)
        return PoolPlan(False, n, 1.0, 1.0, 1, cfg.model.batch_size or 128,
                        r.num_readers or max(1, int(cpus) - n), **common)
    # CPU encoders: about 8 model copies per node at most (memory), one thread each on small nodes.
    wcpus = r.encoder_cpus or max(1, round(biggest / 8))
    if fused:
        n = r.num_encoders or max(1, int(cpus // wcpus))
        return PoolPlan(True, n, wcpus, 0.0, int(wcpus), cfg.model.batch_size or 64, **common)
    n = r.num_encoders or 1
    wcpus = r.encoder_cpus or max(1, min(int((cpus - 1) // n), int(biggest)))
    return PoolPlan(False, n, wcpus, 0.0, int(wcpus), cfg.model.batch_size or 16,
                    r.num_readers or max(1, int(cpus - wcpus * n)), **common)
