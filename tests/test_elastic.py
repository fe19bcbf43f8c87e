"""An elastic cluster (ray.cluster_utils.Cluster): a node that joins mid-run gets encoder actors and
tiles (seen in the records' node ids); a node lost mid-run loses nothing (outputs equal an
undisturbed run's)."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from _cohort import job_config, make_cohort
from _cohort import mask_and_similarities as _outputs

from zeus_ray.engine.driver import run_cohort

# Small chunks: many encoder calls, spread over the actors.
SMALL = ["ray.chunk_tiles=16"]
# A slower (ViT-B) random encoder for the join: the run must outlast a new node's start and its
# actor's (process, torch import, model).
SLOW = [*SMALL, "model.id=random:vit_base_patch16_224"]


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n=3)



def _first_part(out: Path):
    return lambda: bool(list(out.glob("slides/*/embeddings/*/*/pass-*.parquet")))


def _run_and(cfg, ready, action):
    """Run the cohort in a thread; once `ready()`, `action()` here (a Cluster adds and removes nodes
    from the main thread only). Returns (summary, action's result)."""
    result: dict = {}

    def job():
        try:
            result["summary"] = run_cohort(cfg, progress=False)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            result["error"] = e
    t = threading.Thread(target=job, daemon=True)
    t.start()
    deadline = time.time() + 600
    while time.time() < deadline and t.is_alive() and not ready():
        time.sleep(0.05)
    assert t.is_alive(), "the run ended before it was ready for the action"
    done = action()
    t.join(900)
    if "error" in result:
        raise result["error"]
    return result["summary"], done


@pytest.fixture
def cluster():
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    ray.init(address=c.address, log_to_driver=False)
    yield c
    ray.shutdown()
    c.shutdown()


def test_a_node_that_joins_gets_encoders_and_tiles(cluster, tmp_path):
    import ray
    cohort = make_cohort(tmp_path / "cohort", n=8)
    out = tmp_path / "out"
    head = cluster.head_node.node_id
    # The node joins once the pool's first actor holds the head's one CPU (the pool's size is set).
    # Ray Data sees a new node within its autoscaling coordinator's 20 s poll, and the new actor
    # needs seconds more to build its model: eight ViT-B slides outlast both on a loaded machine.
    pool_placed = lambda: ray.available_resources().get("CPU", 0) < 1
    summary, joined = _run_and(job_config(cohort, out, *SLOW), pool_placed,
                               lambda: cluster.add_node(num_cpus=1).node_id)
    assert summary.ok == 8 and summary.failed == 0
    # The pool started on the head alone (one CPU: one encoder actor) and grew onto the new node.
    assert summary.encode_nodes == {head, joined}, (summary.encode_nodes, head, joined)


def test_a_node_lost_mid_run_loses_nothing(cluster, cohort, tmp_path):
    cluster.add_node(num_cpus=1)
    b = cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    ref_out = tmp_path / "ref"
    ref = run_cohort(job_config(cohort, ref_out, *SMALL), progress=False)
    assert ref.ok == 3

    out = tmp_path / "out"

    def preempt():   # a node goes, a replacement comes (what a spot group does)
        cluster.add_node(num_cpus=1)
        cluster.remove_node(b, allow_graceful=False)
    summary, _ = _run_and(job_config(cohort, out, *SMALL), _first_part(out), preempt)
    assert b not in cluster.worker_nodes and not b.any_processes_alive()   # killed mid-run
    assert summary.ok == 3 and summary.failed == 0, [r.get("error") for r in summary.rows]
    got, want = _outputs(out), _outputs(ref_out)
    assert sorted(got) == sorted(want) == ["syn-0", "syn-1", "syn-2"]
    for sid in want:
        assert np.array_equal(got[sid][0], want[sid][0]), sid
        x, y = got[sid][1], want[sid][1]
        assert x["tile_id"].tolist() == y["tile_id"].tolist()
        np.testing.assert_allclose(x["sim_tumor"], y["sim_tumor"], atol=1e-4)


def test_pool_bounds_from_the_config():
    """ray.encoders_min/encoders_max bound the autoscaling pool (no maximum by default);
    ray.num_encoders is a fixed pool; contradictions are one clear error."""
    from zeus_ray.config import load_config
    from zeus_ray.engine.shape import pool_shape
    from zeus_ray.errors import ConfigError
    cluster = {"CPU": 8.0}
    s = pool_shape(load_config(None, []), cluster, 8)
    assert (s.fused, s.encoders_min, s.encoders_max, s.encoder_cpus, s.task_cpus) == (True, 1, None, 1, 0.0)
    s = pool_shape(load_config(None, ["ray.encoders_min=2", "ray.encoders_max=5"]), cluster, 8)
    assert (s.encoders_min, s.encoders_max) == (2, 5)
    s = pool_shape(load_config(None, ["ray.num_encoders=3"]), cluster, 8)
    assert (s.encoders_min, s.encoders_max) == (3, 3)
    gpu = pool_shape(load_config(None, ["model.device=cuda"]), {"CPU": 8.0}, 8)   # GPU group at zero
    assert (gpu.fused, gpu.encoder_gpus, gpu.encoders_max, gpu.task_cpus) == (False, 1.0, None, 1.0)
    for sets, words in ((["ray.encoders_min=3", "ray.encoders_max=2"], "encoders_max (2) is below encoders_min (3)"),
                        (["ray.num_encoders=2", "ray.encoders_max=4"], "either num_encoders")):
        with pytest.raises(ConfigError, match=r"ray") as err:
            load_config(None, sets)
        assert words in str(err.value) and "\n" not in str(err.value).strip(), str(err.value)


def _slide_workers_with_a_slide_open(node, name: str) -> list:
    """This cluster's slide worker processes (children of `node`'s raylet) that have the slide file
    `name` open, i.e. are working on it."""
    import psutil
    raylet = node.all_processes["raylet"][0].process.pid
    busy = []
    for p in psutil.process_iter(["pid", "cmdline", "ppid"]):
        if p.info["ppid"] != raylet or "SlideWorker" not in " ".join(p.info["cmdline"] or []):
            continue
        try:
            if any(f.path.endswith(name) for f in p.open_files()):
                busy.append(p)
        except psutil.Error:
            pass
    return busy


def test_a_slide_that_keeps_killing_its_worker_is_given_up(cluster, tmp_path):
    """A slide whose worker dies on every try (out of memory, say) gets MAX_TRIES tries, then a
    `worker_lost` row, and the run ends; the other slide completes; a re-run completes both. Ray
    itself retries the call for ever, as a node lost mid-slide needs."""
    import psutil

    from zeus_ray.engine.slide_worker import MAX_TRIES
    cohort = make_cohort(tmp_path / "cohort", n=2)
    (tmp_path / "cohort" / "syn-0.svs").write_bytes((tmp_path / "cohort" / "syn-0.svs").read_bytes() + b"\0" * 4096)
    out = tmp_path / "out"
    kills: list[int] = []

    def kill_every_try():   # syn-0 is the larger file: sent first, and the one killed on
        deadline = time.time() + 400
        while time.time() < deadline and len(kills) < MAX_TRIES:
            for p in _slide_workers_with_a_slide_open(cluster.head_node, "syn-0.svs"):
                if p.pid not in kills:
                    p.kill()
                    kills.append(p.pid)
            time.sleep(0.02)
        return kills
    summary, _ = _run_and(job_config(cohort, out, "ray.num_encoders=1"), lambda: True, kill_every_try)
    assert len(kills) == MAX_TRIES and not any(psutil.pid_exists(p) for p in kills)
    rows = {r["slide_id"]: r for r in summary.rows}
    assert rows["syn-1"]["status"] == "ok", rows["syn-1"]
    lost = rows["syn-0"]
    assert (lost["status"], lost["reason"]) == ("failed", "worker_lost")
    assert f"died on each of {MAX_TRIES} tries" in lost["error"] and "\n" not in lost["error"]
    assert not list(out.glob("slides/syn-1/_tries"))   # a completed slide keeps no marks
    again = run_cohort(job_config(cohort, out, "ray.num_encoders=1"), progress=False)
    assert (again.ok, again.skipped, again.failed) == (2, 1, 0), [r.get("error") for r in again.rows]
