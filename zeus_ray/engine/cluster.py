"""Ray for the cohort job: start or join a cluster (quietly, with one clear line when an address
cannot be reached). The pipeline's shape and pool bounds: engine/shape.py.
"""
from __future__ import annotations

import logging
import os
import sys

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
