"""Multi-node behaviour with ray.cluster_utils.Cluster: readers and encoders on different nodes;
an encoder actor and a reader node killed mid-run, with outputs identical to an undisturbed run."""
from __future__ import annotations

import os
import signal
import subprocess
import threading
import time

import numpy as np
import psutil
import pytest
from _cohort import completed_results as _results
from _cohort import job_config, make_cohort
from _cohort import mask_and_similarities as _outputs

from zeus_ray.engine.driver import run_cohort

PIN = ["ray.reader_resources={reader: 0.01}", "ray.encoder_resources={encoder: 0.01}", "ray.num_readers=2"]


@pytest.fixture(scope="module")
def cluster():
    import ray
    from ray.cluster_utils import Cluster
    ray.shutdown()
    c = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    nodes = {"reader_a": c.add_node(num_cpus=1, resources={"reader": 1}),
             "reader_b": c.add_node(num_cpus=1, resources={"reader": 1}),
             "encoder": c.add_node(num_cpus=1, resources={"encoder": 1})}
    c.wait_for_nodes()
    ray.init(address=c.address, log_to_driver=False)
    yield c, nodes
    ray.shutdown()
    c.shutdown()


@pytest.fixture(scope="module")
def cohort(tmp_path_factory):
    return make_cohort(tmp_path_factory.mktemp("cohort"), n=4)



@pytest.fixture(scope="module")
def undisturbed(cluster, cohort, tmp_path_factory):
    out = tmp_path_factory.mktemp("a") / "out"
    return out, run_cohort(job_config(cohort, out, *PIN), progress=False)


def test_readers_and_encoders_on_their_own_nodes(cluster, undisturbed):
    _, nodes = cluster
    _, summary = undisturbed
    assert summary.ok == 4 and summary.failed == 0
    readers = {nodes["reader_a"].node_id, nodes["reader_b"].node_id}
    assert summary.read_nodes and summary.read_nodes <= readers
    assert summary.encode_nodes == {nodes["encoder"].node_id}


def _encoder_pids(node) -> list[int]:
    """The encoder actors (MapWorker(MapBatches(ChunkEncoder))) of this test's cluster only:
    children of `node`'s raylet. (Matching the process title alone also SIGKILLed the encode workers of every other Ray on the machine, other
    test sessions' and users' `zeus run` included: their SYSTEM_ERROR "code 2" worker deaths.)"""
    raylet = node.all_processes["raylet"][0].process.pid
    pids = []
    for p in psutil.process_iter(["pid", "cmdline", "ppid"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ChunkEncoder" in cmd and "ray::" in cmd and p.info["ppid"] == raylet:
            pids.append(p.info["pid"])
    return pids


def test_actor_and_node_killed_mid_run(cluster, cohort, undisturbed, tmp_path):
    c, nodes = cluster
    out = tmp_path / "out"
    events = []

    def disturb():
        deadline = time.time() + 600
        # Once the first slide is fully encoded (its reduce has written the embeddings), the
        # encoder is busy with the others: kill it there.
        while time.time() < deadline and not list(out.glob("slides/*/embeddings/*/*/_COMPLETE.json")):
            time.sleep(0.05)
        for pid in _encoder_pids(nodes["encoder"]):
            os.kill(pid, signal.SIGKILL)
            events.append(("encoder killed", pid))
        while time.time() < deadline and not _results(out):
            time.sleep(0.1)
        c.remove_node(nodes["reader_b"])        # a reader node lost while slides remain
        events.append(("node removed", nodes["reader_b"].node_id))

    t = threading.Thread(target=disturb, daemon=True)
    t.start()
    summary = run_cohort(job_config(cohort, out, *PIN), progress=False)
    t.join(60)
    assert [e[0] for e in events][-1] == "node removed" and "encoder killed" in [e[0] for e in events], events
    assert summary.ok == 4 and summary.failed == 0
    ref, got = _outputs(undisturbed[0]), _outputs(out)
    assert sorted(got) == sorted(ref)
    for sid in ref:
        assert np.array_equal(got[sid][0], ref[sid][0]), sid
        a, b = got[sid][1], ref[sid][1]
        assert a["tile_id"].tolist() == b["tile_id"].tolist()
        np.testing.assert_allclose(a["sim_tumor"], b["sim_tumor"], atol=1e-4)


def test_the_kill_spares_encode_workers_of_other_rays(cluster):
    """A process titled like an encode worker but outside this cluster (another session's Ray, a
    user's `zeus run`) is never among the processes the mid-run kill targets."""
    _, nodes = cluster
    decoy = subprocess.Popen(["bash", "-c", 'exec -a "ray::MapWorker(MapBatches(ChunkEncoder)).submit" sleep 600'])
    try:
        deadline = time.time() + 10
        while time.time() < deadline and "ray::" not in " ".join(psutil.Process(decoy.pid).cmdline()):
            time.sleep(0.05)
        assert "ray::MapWorker(MapBatches(ChunkEncoder))" in " ".join(psutil.Process(decoy.pid).cmdline())
        assert decoy.pid not in _encoder_pids(nodes["encoder"])
    finally:
        decoy.kill()
        decoy.wait()
