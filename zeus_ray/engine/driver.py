"""The cohort job's driver (`zeus run`, `zeus reprompt`): what each slide needs, the class
embeddings, the Ray Data executions (engine/cohort_run.py), the cohort tables.

Follow one tile from manifest to mask:
  cohort_input/manifest.load_cohort → here: keys (slides/slide_keys.py) and what is stored per slide
  → engine/pipeline.py (Ray Data), by the pool's shape (engine/shape.py):
    fused (CPU encoders): a slide worker (engine/slide_worker.py) plans the slide (engine/work.plan_work
    → slides/planning.plan_slide), selects each pass (maps/selection.PassState), reads and encodes
    its regions, writes the parts (storage/parts.py) and reduces it;
    split (GPU encoders): plan tasks → reader tasks → encoder actors (engine/stages.py), and the
    driver starts each slide's reduce as its last chunk is in (engine/cohort_run.py)
  → results/reduce.reduce_slide: similarities, overlap-averaged maps, argmax, mask, viewer outputs, metrics
  → results/cohort_tables.py: slides/errors tables, Table 1/2, report.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor

from ..errors import ZeusError
from ..storage.keys import FAILED, NO_TISSUE, run_key, tiling_key
from ..slides.slide_keys import cohort_keys
from ..cohort_input.manifest import load_cohort
from ..prompts import load_prompt_set, prompt_key as make_prompt_key
from ..storage.store import OutputStore
from .cluster import init_ray
from .records import status_row
from .shape import pool_shape, reduce_only_shape
from .summary import RunSummary

log = logging.getLogger(__name__)
PENDING = "pending"   # model and prompt key of keys a slide worker completes (storage/keys.with_model)


def run_cohort(cfg, *, progress: bool = True, reprompt: bool = False, recorded: dict | None = None) -> RunSummary:
    """Segment the cohort. With `reprompt` in full-overlap mode, only stored embeddings are used: no
    slide is opened and no image encoded; a slide without stored embeddings for this tiling and
    model keeps the outcome `recorded` (slide_id → row of the earlier run) gives it when that was a
    failure or no tissue (row["recorded"] = True), else is reported as failed with a hint to run
    `zeus run` first."""
    import ray

    t0 = time.perf_counter()
    cfg = absolute_paths(cfg)
    entries = load_cohort(cfg.input)
    prompt_set = load_prompt_set(cfg.prompts.file)
    store = OutputStore(cfg.output.root, cfg.output.storage_options)
    store.check_reachable()
    t1 = time.perf_counter()
    started = init_ray(cfg)
    phases = {"inputs": round(t1 - t0, 3), "ray_start": round(time.perf_counter() - t1, 3)}
    try:
        return _run(cfg, entries, prompt_set, store, t0, progress, reprompt, phases, recorded or {})
    finally:
        if started:
            ray.shutdown()


def _text_task(cfg, prompt_set) -> tuple:
    """Class matrix (C, D) per the paper's Eq. 1, the model key and the logit scale."""
    from ..encoders.registry import load_encoder
    from ..prompts import class_embeddings
    enc = load_encoder(cfg.model)
    return class_embeddings(enc, prompt_set), enc.model_key, float(enc.logit_scale)


def _text(cfg, shape, prompt_set) -> tuple:
    """The class embeddings, computed once in a Ray task where an encoder actor would run (its
    resources), before the pipeline starts: every slide's keys hold the model key."""
    import ray
    opts = {"num_cpus": 1, "max_retries": 1}
    if shape.encoder_gpus:
        opts["num_gpus"] = shape.encoder_gpus
    if shape.encoder_resources:
        opts["resources"] = shape.encoder_resources
    try:
        return ray.get(ray.remote(_text_task).options(**opts).remote(cfg, prompt_set))
    except Exception as e:  # noqa: BLE001 - the encoder could not be built (weights, tokenizer, device)
        raise ZeusError(_actor_error(e)) from None


def _shape(cfg, stored_only: bool):
    import ray
    if stored_only:
        return reduce_only_shape(ray.cluster_resources())
    biggest = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1) or 1
    return pool_shape(cfg, ray.cluster_resources(), biggest)


def _actor_error(e: BaseException) -> str:
    """The one line that matters of an error raised while building the encoder in a worker."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, ZeusError):
        return str(cause)
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    return f"cannot build the encoder: {lines[-1] if lines else type(e).__name__}"


def _run(cfg, entries, prompt_set, store, t0, progress, reprompt, phases, recorded) -> RunSummary:
    from .cohort_run import CohortRun
    stored_only = reprompt and cfg.tiling.mode == "full"
    shape = _shape(cfg, stored_only)
    t1 = time.perf_counter()
    if progress and not stored_only:
        log.info("encoder pool: %s", shape.describe())
    if cfg.model.id.startswith("random:"):   # (not imported from random_model: that pulls torch in)
        log.warning("model %s: random weights, masks carry no meaning", cfg.model.id)
    tkey = tiling_key(cfg)
    if shape.fused and not stored_only:
        # Slide workers load the model, compute the class embeddings and complete each slide's keys
        # themselves (engine/slide_worker.py): the pool starts without waiting for a model here.
        summary = RunSummary(root=store.root_uri, pool=shape.describe())
        sizes: dict = {}
        sources, keys_of = cohort_keys(store, entries, cfg, tkey, PENDING, PENDING, sizes=sizes)
        # Largest files first: a slide is one worker's call, so the cohort's last calls are its
        # smallest slides and no worker finishes long after the others.
        entries = sorted(entries, key=lambda e: -sizes.get(e.slide_id, 0))
        log.info("%d slides: the encoder pool skips what is complete and reduces what is encoded", len(entries))
        phases["what_is_stored"] = round(time.perf_counter() - t1, 3)
        t1 = time.perf_counter()
        CohortRun(cfg, shape, store, None, keys_of, sources, summary, progress, prompt_set=prompt_set).run(entries, [])
        phases["slides"] = round(time.perf_counter() - t1, 3)
        return _finish(cfg, store, summary, prompt_set, phases, t0)
    class_matrix, model_key, logit_scale = _text(cfg, shape, prompt_set)
    phases["text"] = round(time.perf_counter() - t1, 3)
    t1 = time.perf_counter()
    pkey = run_key(make_prompt_key(prompt_set, model_key), cfg)
    summary = RunSummary(root=store.root_uri, prompt_key=pkey, pool=shape.describe())
    # The slide file's identity is part of its keys: a replaced file is planned and encoded anew.
    sources, keys_of = cohort_keys(store, entries, cfg, tkey, model_key, pkey, stored_only)
    with ThreadPoolExecutor(16) as ex:   # bucket reads overlap
        marks = list(ex.map(lambda e: (store.complete(keys_of[e.slide_id].res_dir),
                                       store.complete(keys_of[e.slide_id].emb_dir)), entries))
    to_plan, to_reduce = [], []
    for e, (done, emb_done) in zip(entries, marks):
        src = sources[e.slide_id]
        if done is not None and done.get("source") == src:
            summary.rows.append(done)
            summary.skipped += 1
        elif cfg.tiling.mode == "adaptive":   # new prompts may need new tiles: the plan decides
            to_plan.append(e)
        elif emb_done is not None and emb_done.get("source") == src:
            to_reduce.append(e)
        elif reprompt and (recorded.get(e.slide_id) or {}).get("status") in (FAILED, NO_TISSUE):
            was = {k: v if isinstance(v, str) else None for k, v in recorded[e.slide_id].items()}   # NaN: none
            summary.rows.append(status_row(e.as_dict(), was["status"], was["error"], was.get("reason"))
                                | {"recorded": True})
        elif reprompt:
            summary.rows.append(status_row(e.as_dict(), FAILED, f"slide {e.slide_id!r}: no stored embeddings for "
                                           f"this tiling and model ({model_key}); run `zeus run` on it first",
                                           "no_embeddings"))
        else:
            to_plan.append(e)
    log.info("%d slides: %d complete, %d to reduce from stored embeddings, %d to read and encode",
             len(entries), summary.skipped, len(to_reduce), len(to_plan))
    prompts = {"class_matrix": class_matrix, "class_names": prompt_set.class_names,
               "tumour_index": prompt_set.tumour_index, "logit_scale": logit_scale}
    phases["what_is_stored"] = round(time.perf_counter() - t1, 3)
    t1 = time.perf_counter()
    CohortRun(cfg, shape, store, prompts, keys_of, sources, summary, progress).run(to_plan, to_reduce)
    phases["slides"] = round(time.perf_counter() - t1, 3)
    return _finish(cfg, store, summary, prompt_set, phases, t0)


def _finish(cfg, store, summary: RunSummary, prompt_set, phases: dict, t0: float) -> RunSummary:
    summary.read_nodes.discard(None)
    summary.count()
    summary.phases = phases
    summary.seconds = time.perf_counter() - t0
    from ..results.cohort_tables import write_cohort_outputs
    write_cohort_outputs(store, summary, cfg, prompt_set)
    return summary


def absolute_paths(cfg):
    """Local relative paths made absolute, so the config stored with the results (run.json) still
    works for `zeus evaluate` / `zeus reprompt` from another directory."""
    from ..prompts import resolve_prompt_path
    cfg = cfg.model_copy(deep=True)
    for section, key in (("input", "manifest"), ("output", "root"), ("cache", "dir")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and "://" not in value:
            setattr(obj, key, os.path.abspath(os.path.expanduser(value)))
    if "://" not in cfg.prompts.file:
        cfg.prompts.file = os.path.abspath(resolve_prompt_path(cfg.prompts.file))
    return cfg
