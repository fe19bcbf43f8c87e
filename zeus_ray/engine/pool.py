"""The worker pool the pass engine feeds: long-lived encoder actors (they stay up across passes and
slides) and, in split mode, CPU tasks for plans, region reads and reduces (engine/cluster.py says
which shape). Every call returns a small record (engine/work.py); the pool only routes calls and
counts what is in flight so the driver can keep each worker busy without flooding it.
"""
from __future__ import annotations

from ..storage.store import OutputStore
from . import work

# Calls queued per encoder actor: one running, the next ones ready (their reads already running in
# split mode), so an actor never waits for the driver.
FUSED_DEPTH, SPLIT_DEPTH = 2, 4
RETRIES = 2   # an actor that dies (node lost, killed) is restarted and the call retried this often


class EncodeWorker:
    """A Ray actor holding the frozen encoder. Fused mode: plans, reads, encodes and reduces;
    split mode: encodes tiles read by reader tasks."""

    def __init__(self, cfg, store_root: str, threads: int):
        work.set_threads(threads)
        from ..encoders.registry import load_encoder
        from ..errors import ZeusError
        self.cfg = cfg
        self.store_root = store_root
        self.store = OutputStore(store_root)
        self.opts = cfg.input.storage_options
        self.error = None
        try:
            self.encoder = load_encoder(cfg.model)
        except ZeusError as e:   # kept and raised by text(): one line for the user, no actor restarts
            self.encoder, self.error = None, e

    def ready(self) -> str:
        return work.node_id()

    def text(self, prompt_set) -> tuple:
        """Class matrix (C, D) per the paper's Eq. 1, the model key and the logit scale."""
        if self.error is not None:
            raise self.error
        from ..prompts import class_embeddings
        return class_embeddings(self.encoder, prompt_set), self.encoder.model_key, float(self.encoder.logit_scale)

    def plan(self, entry, keys, source, class_matrix) -> dict:
        return work.plan_work(self.store_root, entry, self.cfg, keys, source, class_matrix)

    def encode(self, job, *read) -> dict:
        """Split mode: encode one chunk from reader tasks' results (regions from the object store,
        encoded as they come, no concatenated copy)."""
        tiles = [(ids, images) for ids, images, _ in read]
        return work.encode_work(self.encoder, self.store, job | {"read_node": read[0][2]}, tiles)

    def encode_jobs(self, jobs) -> list:
        """Fused mode: read and encode chunks (of one or several slides) in shared batches."""
        return work.encode_jobs(self.encoder, self.store, jobs, self.cfg.cache, self.opts)

    def reduce(self, job) -> dict:
        return work.reduce_work(self.store_root, job)


def _read_task(job, cache_cfg, storage_options):
    """Split mode: one region's tiles (ids, uint8 images, node) for an encoder actor."""
    ids, images = next(work.read_regions(job, cache_cfg, storage_options))
    return ids, images, work.node_id()


def _text_task(cfg, prompt_set):
    """Class matrix, model key and logit scale without a pool (re-prompts from stored embeddings)."""
    from ..encoders.registry import load_encoder
    from ..prompts import class_embeddings
    enc = load_encoder(cfg.model)
    return class_embeddings(enc, prompt_set), enc.model_key, float(enc.logit_scale)


def _plan_task(store_root, entry, cfg, keys, source, class_matrix):
    return work.plan_work(store_root, entry, cfg, keys, source, class_matrix)


class Pool:
    """Routes plan / encode / reduce calls to the actors (fused) or to actors and CPU tasks (split)."""

    def __init__(self, plan, cfg, store_root: str):
        import ray
        self.plan_ = plan
        self.cfg = cfg
        self.store_root = store_root
        opts = {"num_cpus": plan.worker_cpus, "max_restarts": -1, "max_task_retries": RETRIES}
        if plan.worker_gpus:
            opts["num_gpus"] = plan.worker_gpus
        if plan.worker_resources:
            opts["resources"] = plan.worker_resources
        actor = ray.remote(EncodeWorker).options(**opts)
        self.actors = [actor.remote(cfg, store_root, plan.threads) for _ in range(plan.n_workers)]
        self.load = [0] * len(self.actors)
        self.owner: dict = {}           # ref → actor index, or -1 for a CPU task
        self.tasks = 0                  # CPU tasks in flight (split mode)
        if not plan.fused:
            task = {"num_cpus": 1, "max_retries": RETRIES}
            if plan.reader_resources:
                task["resources"] = plan.reader_resources
            self.read = ray.remote(_read_task).options(**task)
            self.plan_task = ray.remote(_plan_task).options(**task)
            self.reduce_task = ray.remote(work.reduce_work).options(**task)

    # --- capacity -------------------------------------------------------------------------------
    def _free_actor(self, depth: int) -> int | None:
        if not self.actors:
            return None
        i = min(range(len(self.actors)), key=self.load.__getitem__)
        return i if self.load[i] < depth else None

    def can_encode(self) -> bool:
        return self._free_actor(FUSED_DEPTH if self.plan_.fused else SPLIT_DEPTH) is not None

    def idle(self) -> bool:
        """An actor has nothing queued."""
        return 0 in self.load

    def can_task(self) -> bool:
        """Room for a plan or reduce."""
        if self.plan_.fused:
            return self._free_actor(FUSED_DEPTH) is not None
        return self.tasks < self.plan_.n_readers

    def _to_actor(self, method: str, *args, depth: int = FUSED_DEPTH):
        i = self._free_actor(depth)
        ref = getattr(self.actors[i], method).remote(*args)
        self.load[i] += 1
        self.owner[ref] = i
        return ref

    def _to_task(self, fn, *args):
        ref = fn.remote(*args)
        self.tasks += 1
        self.owner[ref] = -1
        return ref

    def release(self, ref) -> None:
        i = self.owner.pop(ref)
        if i >= 0:
            self.load[i] -= 1
        else:
            self.tasks -= 1

    # --- calls ----------------------------------------------------------------------------------
    def text(self, prompt_set):
        if self.actors:
            return self.actors[0].text.remote(prompt_set)
        import ray
        return ray.remote(_text_task).options(num_cpus=1).remote(self.cfg, prompt_set)

    def plan(self, entry, keys, source, class_matrix):
        if self.plan_.fused:
            return self._to_actor("plan", entry, keys, source, class_matrix)
        return self._to_task(self.plan_task, self.store_root, entry, self.cfg, keys, source, class_matrix)

    def encode(self, jobs: list):
        """Fused: any number of chunks in one call; split: one chunk (its regions read by tasks)."""
        if self.plan_.fused:
            return self._to_actor("encode_jobs", jobs)
        (job,) = jobs
        opts = getattr(self.cfg.input, "storage_options", None)
        reads = [self.read.remote({**job, "regions": [r], "class_matrix": None}, self.cfg.cache, opts)
                 for r in job["regions"]]
        return self._to_actor("encode", {k: v for k, v in job.items() if k != "regions"}, *reads,
                              depth=SPLIT_DEPTH)

    def reduce(self, job):
        if self.plan_.fused:
            return self._to_actor("reduce", job)
        return self._to_task(self.reduce_task, self.store_root, job)

    def shutdown(self) -> None:
        import ray
        for a in self.actors:
            ray.kill(a)
        self.actors = []
