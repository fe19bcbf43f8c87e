"""The cohort job on Ray Data: manifest → plan (CPU) → read regions (CPU) → encode (actor pool)
→ per-slide reduce (one task per slide) → cohort tables. Stages: ray_stages.py.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import time
from dataclasses import dataclass, field


from .config import JobConfig
from .errors import ZeusError
from .manifest import SlideEntry, load_cohort
from .prompts import load_prompt_set, prompt_key as make_prompt_key
from .ray_stages import FAILED, NO_TISSUE, OK, encode_dataset, plan_stage, stream_slides, text_stage
from .slide_reduce import Keys, reduce_slide
from .store import OutputStore, safe_component, stable_hash

log = logging.getLogger(__name__)


@dataclass
class RunSummary:
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    no_tissue: int = 0
    tiles_encoded: int = 0
    seconds: float = 0.0
    rows: list = field(default_factory=list)
    root: str = ""
    prompt_key: str = ""
    read_nodes: set = field(default_factory=set)     # Ray node ids that read tiles
    encode_nodes: set = field(default_factory=set)   # and that encoded them
    tiles_full: int = 0       # adaptive mode: tiles full overlap would have encoded for these slides
    tiles_stored: int = 0     # adaptive mode: tiles encoded so far for these slides (this run and before)
    passes: list = field(default_factory=list)   # adaptive mode: (tiles, seconds) of each pass this run

    def line(self) -> str:
        rate = self.tiles_encoded / self.seconds if self.seconds else 0.0
        adaptive = (f"; adaptive overlap: {self.tiles_stored} of {self.tiles_full} full-overlap tiles encoded "
                    f"({100 * self.tiles_stored / self.tiles_full:.1f} %) in {len(self.passes)} passes this run"
                    if self.tiles_full else "")
        return (f"zeus run: {self.ok} slides ok ({self.skipped} already complete), {self.no_tissue} without tissue, "
                f"{self.failed} failed; {self.tiles_encoded} tiles encoded in {self.seconds:.1f} s "
                f"({rate:.1f} tiles/s){adaptive}; results in {self.root}")


def tiling_key(cfg: JobConfig) -> str:
    t = cfg.tiling
    key = {"mpp": t.mpp, "patch": t.patch_size, "stride": t.stride, "min_tissue": t.min_tissue_fraction,
           "tissue": cfg.tissue.model_dump()}
    if t.mode == "adaptive":   # its embeddings are a subset: never mixed with full-overlap ones
        key["adaptive"] = [t.adaptive_margin, t.adaptive_dilation, t.adaptive_disagreement, t.adaptive_coarse_first]
    return stable_hash(key, 12)


_PASS_ENV = ("AWS_", "GOOGLE_", "GCS_", "AZURE_", "HF_", "FSSPEC_", "ZEUS_")


def slide_keys(store: OutputStore, e: SlideEntry, tkey: str, model_key: str, pkey: str) -> Keys:
    skey = stable_hash([tkey, e.mpp], 12)   # an mpp override moves every tile
    return Keys(skey, model_key, pkey, store.slide_dir(e.slide_id, "tiles", skey),
                store.slide_dir(e.slide_id, "embeddings", skey, safe_component(model_key)),
                store.slide_dir(e.slide_id, "results", skey, pkey))


def init_ray(cfg: JobConfig):
    import ray
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if ray.is_initialized():
        return False
    if address:
        ray.init(address=address, log_to_driver=True)
    else:
        # Workers see the driver's import path and its cloud/hub settings (endpoint, region,
        # credentials, HF cache); the local cluster has no dashboard, so they are not exposed.
        env = {k: v for k, v in os.environ.items() if k.startswith(_PASS_ENV)}
        env["PYTHONPATH"] = os.pathsep.join(p for p in sys.path if p)
        ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False,
                 runtime_env={"env_vars": env})
    return True


def run_cohort(cfg: JobConfig, *, progress: bool = True, reprompt: bool = False) -> RunSummary:
    """Segment the cohort. With `reprompt`, only stored embeddings are used: no slide is opened
    and no image encoded; a slide without stored embeddings for this tiling and model is
    reported as failed with a hint to run `zeus run` first."""
    import ray

    t0 = time.perf_counter()
    cfg = _absolute_paths(cfg)
    entries = load_cohort(cfg.input)
    prompt_set = load_prompt_set(cfg.prompts.file)
    store = OutputStore(cfg.output.root)
    started = init_ray(cfg)
    try:
        return _run(cfg, entries, prompt_set, store, t0, progress, reprompt)
    finally:
        if started:
            ray.shutdown()


def _run(cfg, entries, prompt_set, store, t0, progress, reprompt=False) -> RunSummary:
    import ray
    import ray.data

    class_matrix, model_key, logit_scale, _ = ray.get(ray.remote(text_stage).options(num_cpus=1).remote(cfg.model, prompt_set))
    pkey = make_prompt_key(prompt_set, model_key)
    tkey = tiling_key(cfg)
    summary = RunSummary(root=store.root_uri, prompt_key=pkey)
    keys_of, source_ids = {}, {}
    # A re-prompt trusts the stored embeddings and does not even stat the slide (in adaptive mode
    # new prompts may need new tiles, so there it checks the slide like a run).
    stored_only = reprompt and cfg.tiling.mode == "full"
    for e in entries:
        keys_of[e.slide_id] = slide_keys(store, e, tkey, model_key, pkey)
        source_ids[e.slide_id] = None if stored_only else source_identity(e.uri)
    by_id = {e.slide_id: e for e in entries}
    to_encode, to_reduce = [], []
    for e in entries:
        k = keys_of[e.slide_id]
        emb_done = store.complete(k.emb_dir)
        if stored_only:   # reuse the source identity recorded with the embeddings
            source_ids[e.slide_id] = (emb_done or {}).get("source")
        src = source_ids[e.slide_id]
        done = store.complete(k.res_dir)
        if done is not None and done.get("source") == src:
            summary.rows.append(done)
            summary.skipped += 1
        elif cfg.tiling.mode == "adaptive":   # new prompts may need new tiles: the pass driver decides
            to_encode.append(e)
        elif emb_done is not None and emb_done.get("source") == src:
            to_reduce.append(e)
        elif reprompt:
            summary.rows.append(_status(e, FAILED, f"slide {e.slide_id!r}: no stored embeddings for this tiling "
                                        f"and model ({model_key}); run `zeus run` on it first"))
        else:
            to_encode.append(e)
    log.info("%d slides: %d complete, %d to reduce from cached embeddings, %d to read and encode",
             len(entries), summary.skipped, len(to_reduce), len(to_encode))

    cm_ref = ray.put(class_matrix)
    reduce_remote = ray.remote(_reduce_task).options(num_cpus=0.25, max_retries=3)
    common = (store.root_uri, prompt_set.class_names, prompt_set.tumour_index, cm_ref, logit_scale,
              cfg.output.embedding_dtype, cfg.evaluation.model_dump())
    pending = {reduce_remote.remote(_with_source(by_id[e.slide_id], source_ids), keys_of[e.slide_id], *common,
                                    None, None): e.slide_id for e in to_reduce}

    def on_status(sid, kind, message):
        summary.rows.append(_status(by_id[sid], kind, message))
        if progress:
            log.info("slide %s: %s", sid, kind)

    def on_complete(sid, ids, emb):   # emb None: adaptive mode, the reduce reads the stored passes
        pending[reduce_remote.remote(_with_source(by_id[sid], source_ids), keys_of[sid], *common,
                                     None if emb is None else ray.put(emb), ids, emb is None)] = sid
        if progress:
            log.info("slide %s encoded (%d/%d slides, %d tiles so far)", sid, len(pending) - len(to_reduce),
                     len(to_encode), summary.tiles_encoded)

    if to_encode and cfg.tiling.mode == "adaptive":
        from .adaptive_run import run_adaptive_passes
        run_adaptive_passes(cfg, store, to_encode, keys_of, source_ids, class_matrix, summary, on_status,
                            on_complete)
    elif to_encode:
        ray.data.DataContext.get_current().enable_progress_bars = progress
        ds = ray.data.from_items([{"entry": pickle.dumps(e.as_dict())} for e in to_encode],
                                 override_num_blocks=len(to_encode))
        ds = ds.map_batches(plan_stage, batch_size=1, num_cpus=1, memory=1024 * 2**20,
                            resources=cfg.ray.reader_resources or None,
                            fn_kwargs={"cfg": cfg, "store_root": store.root_uri, "source_ids": source_ids,
                                       "tiles_dirs": {e.slide_id: keys_of[e.slide_id].tiles_dir for e in to_encode}})
        stream_slides(encode_dataset(cfg, ds), summary, on_status, on_complete)

    for ref, sid in pending.items():
        try:
            summary.rows.append(ray.get(ref))
        except Exception as e:  # a reduce that failed: that slide only
            cause = e.cause if hasattr(e, "cause") and e.cause is not None else e
            msg = str(cause) if isinstance(cause, ZeusError) else f"slide {sid!r}: reduce failed: {type(cause).__name__}: {cause}"
            summary.rows.append(_status(by_id[sid], FAILED, msg.splitlines()[0]))
    summary.ok = sum(1 for r in summary.rows if r["status"] == OK)
    summary.failed = sum(1 for r in summary.rows if r["status"] == FAILED)
    summary.no_tissue = sum(1 for r in summary.rows if r["status"] == NO_TISSUE)
    summary.seconds = time.perf_counter() - t0
    from .cohort import write_cohort_outputs
    write_cohort_outputs(store, summary, cfg, prompt_set)
    return summary


def _absolute_paths(cfg: JobConfig) -> JobConfig:
    """Local relative paths made absolute, so the config stored with the results (run.json) still
    works for `zeus evaluate` / `zeus reprompt` from another directory."""
    from .prompts import resolve_prompt_path
    cfg = cfg.model_copy(deep=True)
    for section, key in (("input", "manifest"), ("output", "root"), ("cache", "dir")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and "://" not in value:
            setattr(obj, key, os.path.abspath(os.path.expanduser(value)))
    if "://" not in cfg.prompts.file:
        cfg.prompts.file = os.path.abspath(resolve_prompt_path(cfg.prompts.file))
    return cfg


def _reduce_task(entry, keys, store_root, class_names, tumour_index, class_matrix, logit_scale,
                 emb_dtype, evaluation, embeddings, tile_ids, from_passes=False):
    return reduce_slide(OutputStore(store_root), entry, keys, class_names, tumour_index, class_matrix,
                        logit_scale, embeddings, tile_ids, emb_dtype, evaluation, from_passes)


def _with_source(entry: SlideEntry, source_ids: dict) -> dict:
    return entry.as_dict() | {"source": source_ids[entry.slide_id]}


def source_identity(uri: str) -> str:
    """Cheap identity of a slide file (size + mtime or ETag), checked before reusing outputs so
    that a replaced slide is processed again. Unreachable slides get an identity that never
    matches, so they are retried."""
    import fsspec
    try:
        fs, path = fsspec.core.url_to_fs(uri)
        info = fs.info(path)
    except Exception:
        return "unavailable"
    ident = {k: info.get(k) for k in ("size", "ETag", "etag", "mtime", "LastModified", "md5Hash") if info.get(k)}
    return stable_hash(ident, 16)


def _status(entry: SlideEntry, status: str, message: str) -> dict:
    return {"slide_id": entry.slide_id, "status": status, "error": message or None, "n_tiles": 0,
            "dataset": entry.dataset, "center": entry.center, "tumour_area_mm2": None}
