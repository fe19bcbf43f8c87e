"""The driver's side of the stream: runs the Ray Data executions (engine/pipeline.py) and turns
their records into the run's summary, progress line and slide rows.

Fused shape (CPU encoders): one execution; each record is a slide's result (engine/slide_worker.py).
Split shape (GPU encoders): counts each slide's chunks from its records, starts the slide's reduce
(a Ray task) as soon as its last chunk is in, and in adaptive overlap selects each slide's next
pass between executions. Full overlap is one execution. Adaptive overlap runs in waves of
`ray.max_slides_in_flight` slides (the driver holds their selection state, PassState, between
passes); a wave is one execution that plans the slides and encodes their first pass, then one
execution per later pass over the chunks of the slides that still need one.
The driver holds positions and class scores (adaptive), never pixels or embeddings.
"""
from __future__ import annotations

import logging
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import numpy as np

from ..errors import ZeusError
from ..storage.keys import FAILED, OK
from . import pipeline
from .progress import Progress
from .records import Encoded, Planned, ReduceJob, Reduced, SlideTask, status_row
from .slide_worker import reduce_job
from .shape import chunk_target
from .stages import ChunkGroup, chunks_for

log = logging.getLogger(__name__)

ADAPTIVE_WAVE = 512   # default slides per adaptive wave


@dataclass
class SlideRun:
    entry: dict
    planned: Planned | None = None
    expected: int | None = None     # chunks of the current pass (known once Planned is in)
    got: int = 0
    new_tiles: int = 0
    early: list = field(default_factory=list)   # Encoded records that came before their Planned
    done: bool = False


class CohortRun:
    def __init__(self, cfg, shape, store, prompts: dict | None, keys_of: dict, sources: dict, summary,
                 progress: bool = True, prompt_set=None):
        """`prompt_set` (fused shape): slide workers compute the class embeddings and keys themselves;
        `prompts` (split shape): the driver's class embeddings, for plans and reduces."""
        self.cfg, self.shape, self.store, self.prompts = cfg, shape, store, prompts
        self.prompt_set = prompt_set
        self.keys_of, self.sources, self.summary = keys_of, sources, summary
        self.adaptive = cfg.tiling.mode == "adaptive"
        self.runs: dict[str, SlideRun] = {}
        self.next_pass: list = []            # adaptive: chunks selected for the next execution
        self.reduce_q: deque = deque()
        self.reducing: dict = {}             # ref → slide id
        self.progress = Progress(progress)
        self._reduce_fn = None
        self.workers = 1

    # --- executions ------------------------------------------------------------------------------
    def run(self, to_plan: list, to_reduce: list) -> None:
        self.progress.start(len(to_plan) + len(to_reduce))
        try:
            if self.prompt_set is not None:
                # Slide workers: every slide in one execution; each worker sees what is stored.
                run_id = uuid.uuid4().hex[:12]
                items = [SlideTask(e.as_dict(), self.keys_of[e.slide_id], self.sources[e.slide_id], run_id)
                         for e in to_plan]
                with pipeline.data_context():
                    self._execute(pipeline.build_slides(items, shape=self.shape, cfg=self.cfg, store=self.store,
                                                        prompt_set=self.prompt_set, workers=self._workers()),
                                  len(items), plan=True, pass_no=0)
                done = {r["slide_id"] for r in self.summary.rows}
                for e in to_plan:
                    if e.slide_id not in done:   # its block was lost to Ray (a worker's death beyond repair)
                        self._row(status_row(e.as_dict(), FAILED, f"slide {e.slide_id!r}: its worker was lost beyond "
                                             "Ray's retries (killed for memory? a node removed?); re-run to complete it",
                                             reason="worker_lost"))
            else:
                for e in to_reduce:
                    self._queue_reduce(e.as_dict(), None)
                self._submit()
                if to_plan:
                    with pipeline.data_context():
                        wave = len(to_plan) if not self.adaptive else (self.cfg.ray.max_slides_in_flight or ADAPTIVE_WAVE)
                        for i in range(0, len(to_plan), wave):
                            self._wave(to_plan[i:i + wave])
            self._drain()
        finally:
            self.progress.close()

    def _wave(self, entries: list) -> None:
        for e in entries:
            self.runs[e.slide_id] = SlideRun(e.as_dict())
        items = [SlideTask(e.as_dict(), self.keys_of[e.slide_id], self.sources[e.slide_id]) for e in entries]
        self._chunks(items, plan=True, pass_no=1)
        while self.next_pass:
            groups = self._groups(self.next_pass)
            pass_no = min(c.pass_no for c in self.next_pass)
            self.next_pass = []
            self._chunks(groups, plan=False, pass_no=pass_no)
        for sid in [s for s in (e.slide_id for e in entries) if s in self.runs and not self.runs[s].done]:
            self._fail(sid, f"slide {sid!r}: its records were lost in the pipeline (re-run to complete it)",
                       "lost")

    def _workers(self) -> int:
        """Encoder actors the cluster holds now (a pass of a slide is split so each gets a share)."""
        import ray
        res = ray.cluster_resources().get("GPU" if self.shape.encoder_gpus else "CPU", 1)
        self.workers = max(1, int(res // max(self.shape.encoder_gpus or self.shape.encoder_cpus, 1)))
        return self.workers

    def _chunks(self, items: list, plan: bool, pass_no: int) -> None:
        """Split shape: one execution of plan tasks (or a later pass's chunks) → readers → encoders."""
        workers = self._workers()
        ds = pipeline.build(items, plan=plan, shape=self.shape, cfg=self.cfg, store=self.store,
                            class_matrix=self.prompts["class_matrix"], n_classes=len(self.prompts["class_names"]),
                            workers=workers)
        self._execute(ds, len(items), plan, pass_no)

    def _execute(self, ds, n_items: int, plan: bool, pass_no: int) -> None:
        t0 = time.perf_counter()
        first = None
        n = 0
        for rec in pipeline.records(ds):
            first = first if first is not None else time.perf_counter() - t0
            n += 1
            if isinstance(rec, Planned):
                self._on_planned(rec)
            elif isinstance(rec, Encoded):
                self._on_encoded(rec)
            elif isinstance(rec, Reduced):
                self._on_reduced(rec)
            self._poll()
        self.summary.executions.append({"pass": pass_no, "plan": plan, "items": n_items, "records": n,
                                        "first_record_s": round(first or 0.0, 3),
                                        "seconds": round(time.perf_counter() - t0, 3)})

    def _groups(self, chunks: list) -> list[ChunkGroup]:
        """Chunks of later passes as encoder calls: a big chunk alone, small ones (of any slides)
        together up to a batch, so their tiles share batches."""
        groups, cur, n = [], [], 0
        for c in sorted(chunks, key=lambda c: -c.n_tiles):
            if c.n_tiles >= self.shape.batch_size:
                groups.append(ChunkGroup([c]))
                continue
            cur.append(c)
            n += c.n_tiles
            if n >= self.shape.batch_size:
                groups.append(ChunkGroup(cur))
                cur, n = [], 0
        if cur:
            groups.append(ChunkGroup(cur))
        return groups

    # --- records ---------------------------------------------------------------------------------
    def _on_planned(self, rec: Planned) -> None:
        run = self.runs.get(rec.slide_id)
        self.summary.add_timing(rec.timing)
        if run is None or run.done:
            return
        if rec.status != OK:
            self._finish(rec.slide_id, status_row(run.entry, rec.status, rec.message, rec.reason))
            return
        run.planned, run.expected = rec, rec.n_chunks
        early, run.early = run.early, []
        for e in early:
            self._on_encoded(e)
        self._check(run)

    def _on_encoded(self, rec: Encoded) -> None:
        run = self.runs.get(rec.slide_id)
        if run is None or run.done:
            return
        if run.planned is None:   # its Planned record is still on its way
            run.early.append(rec)
            return
        self.summary.add_timing(rec.timing)
        if rec.status != OK:
            self._fail(rec.slide_id, rec.message, rec.reason)
            return
        self.summary.add_tiles(rec.pass_no, rec.n, rec.read_node, rec.encode_node)
        self.progress.tiles(rec.n)
        run.got += 1
        run.new_tiles += rec.n
        if self.adaptive:
            state = run.planned.state
            state.add(*np.divmod(rec.tile_ids, run.planned.grid.n_cols), rec.pass_no, rec.scores)
        self._check(run)

    def _check(self, run: SlideRun) -> None:
        """The pass is in: full overlap reduces; adaptive selects the next pass or reduces."""
        if run.done or run.expected is None or run.got < run.expected:
            return
        p = run.planned
        if not self.adaptive:
            info = {"n_tiles": p.n_stored + run.new_tiles, "n_tiles_full": p.n_kept,
                    "passes": max(p.n_passes, p.pass_no if p.n_chunks else 0)}
            self._queue_reduce(run.entry, info)
            run.done = True
            return
        state = p.state
        pass_no, todo = state.select()
        n = int(todo.sum())
        if n:
            keys = self.keys_of[p.slide_id]
            target = chunk_target(n, self.cfg.ray.chunk_tiles, self.workers, self.shape.batch_size)
            chunks = chunks_for(p.slide_id, run.entry["uri"], p.grid, keys, pass_no, todo, self.cfg, target)
            run.expected, run.got = len(chunks), 0
            self.next_pass.extend(chunks)
            return
        info = {"n_tiles": state.n_encoded, "n_tiles_full": int(state.kept.sum()), "passes": state.n_passes}
        self.summary.tiles_full += info["n_tiles_full"]
        self.summary.tiles_stored += info["n_tiles"]
        p.state = None   # the driver keeps no selection state of a converged slide
        self._queue_reduce(run.entry, info)
        run.done = True

    def _fail(self, sid: str, message: str | None, reason: str | None) -> None:
        run = self.runs[sid]
        self._finish(sid, status_row(run.entry, FAILED, message, reason))

    def _finish(self, sid: str, row: dict) -> None:
        run = self.runs.pop(sid, None)
        if run is not None:
            run.done = True
        self._row(row)

    # --- reduces ---------------------------------------------------------------------------------
    def _reduce_job(self, entry: dict, info: dict | None) -> ReduceJob:
        sid = entry["slide_id"]
        return reduce_job(entry, self.sources[sid], self.keys_of[sid], self.prompts, self.cfg, info)

    def _queue_reduce(self, entry: dict, info: dict | None) -> None:
        self.reduce_q.append(self._reduce_job(entry, info))
        self.runs.pop(entry["slide_id"], None)
        self._submit()

    def _on_reduced(self, rec: Reduced) -> None:
        """Fused shape: a slide worker's whole slide (its stored row if it was complete)."""
        if rec.fatal:
            raise ZeusError(rec.fatal)
        s = self.summary
        s.prompt_key = s.prompt_key or rec.prompt_key or ""
        if rec.skipped:
            s.rows.append(rec.row)
            s.skipped += 1
            self.progress.slide(rec.row, quiet=True)
            return
        s.add_timing(rec.timing)
        for p, n in rec.pass_tiles.items():
            s.add_tiles(p, n, rec.node, rec.node)
            self.progress.tiles(n)
        s.tiles_full += rec.tiles_full
        s.tiles_stored += rec.tiles_stored
        self._row(rec.row)

    def _submit(self) -> None:
        import ray
        if self._reduce_fn is None:
            from .work import reduce_work
            opts = {"num_cpus": self.shape.task_cpus, "max_retries": 3}
            if self.shape.reader_resources:
                opts["resources"] = self.shape.reader_resources
            self._reduce_fn = ray.remote(reduce_work).options(**opts)
        while self.reduce_q and len(self.reducing) < self.shape.task_slots:
            job = self.reduce_q.popleft()
            self.reducing[self._reduce_fn.remote(self.store, job)] = job

    def _poll(self, wait: bool = False) -> None:
        import ray
        if not self.reducing:
            return
        refs = list(self.reducing)
        ready, _ = ray.wait(refs, num_returns=1 if wait else len(refs), timeout=None if wait else 0)
        for ref in ready:
            job = self.reducing.pop(ref)
            try:
                res: Reduced = ray.get(ref)
            except Exception as e:  # noqa: BLE001 - a worker lost beyond its retries: this slide only
                cause = getattr(e, "cause", None) or e
                why = f"{type(cause).__name__}: {str(cause).splitlines()[0] if str(cause) else ''}"
                sid = job.entry["slide_id"]
                res = Reduced(sid, status_row(job.entry, FAILED, f"slide {sid!r}: reduce failed: {why}",
                                              reason="worker_lost"))
            self.summary.add_timing(res.timing)
            self._row(res.row)
        self._submit()

    def _drain(self) -> None:
        while self.reducing or self.reduce_q:
            self._poll(wait=True)

    def _row(self, row: dict) -> None:
        self.summary.rows.append(row)
        self.progress.slide(row)
