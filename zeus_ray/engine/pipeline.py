"""The Ray Data executions of the cohort job (engine/shape.py says which):

fused (CPU encoders): slides → map_batches(SlideWorker) on an autoscaling actor pool, each call a
whole slide (engine/slide_worker.py) → Reduced records.

split (GPU encoders): slides (or a later pass's chunks) stream through
    plan (CPU tasks, flat_map: Planned record + one row per chunk, each row its own block)
    → read (CPU tasks)
    → encode (map_batches, ChunkEncoder on an autoscaling actor pool; writes the parts)
    → small records, consumed by the driver as they come (engine/cohort_run.py);
full overlap is one execution, adaptive overlap one per pass over the chunks the driver selected.
Ray Data is imported when a run starts, never at the package's import (CLI start-up).
"""
from __future__ import annotations

import logging
import os
import sys
import warnings
from contextlib import contextmanager

from .records import REC, pack, unpack
from .shape import PoolShape
from .slide_worker import SlideWorker
from .stages import ChunkEncoder, plan_stage, read_stage

# Bytes a split-shape reader task requests: its worker process with our imports and a chunk's regions
# and tiles (about 150 MB at 256 × 448 px) peaked at 534 MiB; Ray Data warns on the console when a
# worker uses more than its request.
READ_MEMORY = 768 << 20
MAX_INPUT_BLOCKS = 2000   # slides per plan task = ceil(slides / this): one block per slide up to here


class _Notices(logging.Filter):
    """Ray Data's console notices that our own settings cause (progress bars off: we draw ours)."""
    DROP = ("Progress bars disabled", "Progress bars for operators disabled")

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.DROP)


def configure_data_context(progress_bars: bool = False) -> dict:
    """Per-run Ray Data settings: our own progress line instead of per-operator bars, no stats dump,
    one record per block, and its console handler at WARNING (its INFO lines announce each
    execution). Returns the settings it replaced (`restore_data_context`)."""
    import ray.data
    _spend_actor_notice()
    ctx = ray.data.DataContext.get_current()
    old = {k: getattr(ctx, k) for k in _SETTINGS}
    ctx.enable_progress_bars = progress_bars
    ctx.enable_auto_log_stats = False
    ctx.execution_options.verbose_progress = False
    ctx.print_on_execution_start = False
    # Every record its own block (blocks are "full" past one byte): a slide's chunks go to different
    # encoder actors and a record reaches the driver as soon as it is made. A repartition stage
    # would do the same at the cost of a 1-CPU task per block, which a fused pool holding every
    # CPU never gets (the pipeline would stall).
    ctx.target_max_block_size = 1
    # A block Ray loses beyond repair fails that slide alone (engine/cohort_run.py gives it a
    # `worker_lost` row), not the execution. (A slide that kills its worker on every try is stopped
    # by its slide worker: slide_worker.MAX_TRIES.)
    ctx.max_errored_blocks = -1
    # A task pool's bound above its inputs' count (a short pass, a small cohort) is no problem.
    warnings.filterwarnings("ignore", message="The maximum number of concurrent tasks for", category=UserWarning)
    for h in logging.getLogger("ray.data").handlers:
        if type(h).__name__ != "SessionFileHandler":   # the console one; ray-data.log keeps everything
            h.setLevel(logging.WARNING)
            if not any(isinstance(f, _Notices) for f in h.filters):
                h.addFilter(_Notices())
    return old


_SETTINGS = ("enable_progress_bars", "enable_auto_log_stats", "print_on_execution_start", "target_max_block_size",
             "max_errored_blocks")


def restore_data_context(old: dict) -> None:
    import ray.data
    ctx = ray.data.DataContext.get_current()
    for k, v in old.items():
        setattr(ctx, k, v)


@contextmanager
def data_context():
    """Our Ray Data settings for the executions inside the block, the caller's restored after."""
    old = configure_data_context()
    try:
        yield
    finally:
        restore_data_context(old)


_NOTICE_SPENT: list = []


def _spend_actor_notice() -> None:
    """Ray 2.60's driver prints one ERROR line, once per process, the first time an actor with
    restarts gets an argument from the object store — as every Ray Data actor pool does
    (ray-project/ray#57733; harmless here: Ray Data keeps those objects alive for the pool's life).
    It comes from the C++ core worker, straight to file descriptor 2, so it is spent here, once, on a
    throwaway actor while that descriptor points at /dev/null (for the microseconds of the call)."""
    import ray
    if _NOTICE_SPENT:
        return
    _NOTICE_SPENT.append(True)

    class _Spend:
        def __init__(self, arg):
            pass

    ref = ray.put(None)
    sys.stderr.flush()
    saved, null = os.dup(2), os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 2)
    try:
        # A resource no node has: the actor is never placed, so dropping it stops no worker.
        actor = ray.remote(_Spend).options(num_cpus=0, max_restarts=1, resources={"zeus_notice": 1}).remote(ref)
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(null)
    del actor


def _items(items: list):
    """The execution's input: one block per item (up to MAX_INPUT_BLOCKS), so items spread over
    the pool as it frees up."""
    import ray.data
    n_blocks = max(1, min(len(items), MAX_INPUT_BLOCKS))
    return ray.data.from_items([{REC: pack(x)} for x in items], override_num_blocks=n_blocks), n_blocks


def _encoder_pool(shape: PoolShape, workers: int, calls_per_actor: int | None = None) -> dict:
    """map_batches arguments of the encoder actor pool: Ray Data's autoscaling ActorPoolStrategy
    between the config's bounds, and the resources each actor requests (what a cluster autoscaler
    sees: pending actors' requests make it add nodes)."""
    import ray.data
    # Start with as many actors as the cluster holds now (each takes seconds to import torch and
    # build the model; growing one at a time costs that again).
    kw = {"min_size": shape.encoders_min, "max_size": shape.encoders_max, "initial_size": _initial(shape, workers)}
    if calls_per_actor:
        kw["max_tasks_in_flight_per_actor"] = calls_per_actor
    # Ray Data's actors retry a call for ever: one actor death burns several retries while the actor
    # restarts ("temporarily unavailable"), so a finite count lost slides to a single preemption. A
    # slide that kills its worker on every try is stopped by its slide worker instead
    # (slide_worker.MAX_TRIES).
    enc = {"compute": ray.data.ActorPoolStrategy(**kw), "num_cpus": shape.encoder_cpus}
    if shape.encoder_gpus:
        enc["num_gpus"] = shape.encoder_gpus
    if shape.encoder_resources:
        enc["resources"] = shape.encoder_resources
    return enc


def build_slides(items: list, *, shape: PoolShape, cfg, store, prompt_set, workers: int):
    """Fused shape: SlideTask rows → slide workers (engine/slide_worker.py) → Reduced records."""
    ds, _ = _items(items)
    # A call is a whole slide: one running and one queued per actor, so the cohort's last slides
    # are not queued behind a busy actor while another is idle.
    return ds.map_batches(SlideWorker, batch_size=1, batch_format="pyarrow",
                          fn_constructor_kwargs={"cfg": cfg, "store": store, "threads": shape.threads,
                                                 "prompt_set": prompt_set},
                          **_encoder_pool(shape, workers, calls_per_actor=2))


def build(items: list, *, plan: bool, shape: PoolShape, cfg, store, class_matrix, n_classes: int,
          workers: int):
    """Split shape: the dataset of one execution. `items`: SlideTask (plan=True) or stages.ChunkGroup
    records."""
    import ray.data
    ds, n_blocks = _items(items)
    task = {"num_cpus": shape.task_cpus}
    if shape.reader_resources:
        task["resources"] = shape.reader_resources
    if plan:
        ds = ds.flat_map(plan_stage, fn_kwargs={"store_root": store, "cfg": cfg, "class_matrix": class_matrix,
                                                "n_classes": n_classes, "workers": workers,
                                                "batch": shape.batch_size},
                         compute=ray.data.TaskPoolStrategy(size=min(shape.task_slots, n_blocks)), **task)
    if not shape.fused:
        # A reader task's logical memory request (it holds a chunk's decoded regions) also keeps Ray
        # Data from fusing the reads into the encoder actors, which would take them off the CPU nodes.
        ds = ds.map_batches(read_stage, batch_size=1, batch_format="pyarrow",
                            fn_kwargs={"cache_cfg": cfg.cache, "storage_options": cfg.input.storage_options},
                            compute=ray.data.TaskPoolStrategy(size=min(shape.readers_max, n_blocks)) if shape.readers_max else None,
                            memory=READ_MEMORY, **task)
    return ds.map_batches(ChunkEncoder, batch_size=1, batch_format="pyarrow",
                          fn_constructor_kwargs={"cfg": cfg, "store_root": store, "threads": shape.threads,
                                                 "class_matrix": class_matrix},
                          **_encoder_pool(shape, workers))


def _initial(shape: PoolShape, workers: int) -> int:
    # Pinned to a node group (the cluster's CPU count says nothing), or split (actors started at the
    # cluster's size would hold the CPUs the plan and read tasks need): Ray Data grows the pool.
    if shape.encoder_resources or not shape.fused:
        return shape.encoders_min
    hi = shape.encoders_max if shape.encoders_max is not None else workers
    return max(shape.encoders_min, min(workers, hi))


def records(ds):
    """The execution's records as they come (Planned, Encoded)."""
    for batch in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=0):
        for cell in batch.column(REC).to_pylist():
            yield unpack(cell)
