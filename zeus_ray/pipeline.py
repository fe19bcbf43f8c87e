"""The cohort job on Ray Data: manifest → plan (CPU) → read regions (CPU) → encode (actor pool)
→ per-slide reduce (one task per slide) → cohort tables.

Rows flow as dicts of numpy arrays. Every row names its slide and carries `n_tiles`, the slide's
tile count, so the driver knows when a slide is complete without any shuffle; a slide that fails
or has no tissue becomes a single status row that passes through the later stages untouched.
"""
from __future__ import annotations

import logging
import os
import pickle
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from .config import JobConfig, ModelConfig
from .errors import SlideError, ZeusError
from .manifest import SlideEntry, load_cohort
from .prompts import load_prompt_set, prompt_key as make_prompt_key
from .slide_reduce import Keys, reduce_slide
from .store import OutputStore, safe_component, stable_hash

log = logging.getLogger(__name__)

OK, FAILED, NO_TISSUE = "ok", "failed", "no_tissue"


# ----------------------------------------------------------------------------------------------
# Stage functions (run inside Ray workers)

def _status_row(slide_id: str, kind: str, message: str, patch: int, with_image: bool) -> dict:
    row = {"slide_id": np.array([slide_id]), "tile_id": np.array([-1], np.int64),
           "n_tiles": np.array([0], np.int64), "kind": np.array([kind]), "message": np.array([message])}
    if with_image:
        row["image"] = np.zeros((1, patch, patch, 3), np.uint8)
        row["read_node"] = np.array([_node_id()])
    return row


def _node_id() -> str:
    import ray
    return ray.get_runtime_context().get_node_id()


def plan_stage(batch: dict, cfg: JobConfig, store_root: str, tiles_dirs: dict, source_ids: dict) -> dict:
    """One slide in, its regions out (or one status row). A complete tiles folder is reused."""
    from .region_reader import plan_regions
    from .tiles_stage import mpp_label, plan_slide, write_tiles_outputs
    from .tiling import GRID_METADATA_KEY, TileGrid

    entry = pickle.loads(batch["entry"][0])
    sid = entry["slide_id"]
    store = OutputStore(store_root)
    tiles_dir = tiles_dirs[sid]
    try:
        done = store.complete(tiles_dir)
        if done is not None and done.get("source") == source_ids[sid]:
            tiles = store.read_parquet(f"{tiles_dir}/tiles.parquet")
            grid, status = TileGrid.from_json(tiles.schema.metadata[GRID_METADATA_KEY]), done["status"]
        else:
            plan = plan_slide(entry["uri"], sid, cfg, mpp_override=entry.get("mpp"))
            tiles, grid, status = plan.tiles, plan.grid, plan.status
            with tempfile.TemporaryDirectory() as tmp:
                write_tiles_outputs(plan, tmp)
                Image.fromarray(plan.display).save(f"{tmp}/display_{mpp_label(plan.display_mpp)}mpp.png")
                store.upload_dir(tmp, tiles_dir)
            store.commit(tiles_dir, {"slide_id": sid, "tiling_key": plan.tiling_key, "status": status,
                                     "n_tiles": plan.n_tiles, "source": source_ids[sid]})
        if tiles.num_rows == 0:
            why = "no tissue found" if status == "no_tissue" else "tissue found, but no tile reaches tiling.min_tissue_fraction"
            return _status_row(sid, NO_TISSUE, f"slide {sid!r}: {why} (zero tiles)", 0, False)
        regions = plan_regions(tiles, grid, cfg.tiling.region_tiles, slide_id=sid)
    except ZeusError as e:
        return _status_row(sid, FAILED, str(e), 0, False)
    except Exception as e:  # one bad slide never stops the cohort
        log.exception("planning %s failed", sid)
        return _status_row(sid, FAILED, f"slide {sid!r}: {type(e).__name__}: {e}", 0, False)
    n = len(regions)
    return {"slide_id": np.array([sid] * n), "tile_id": np.zeros(n, np.int64),
            "n_tiles": np.full(n, tiles.num_rows, np.int64), "kind": np.array(["region"] * n),
            "message": np.array([""] * n),
            "payload": np.array([pickle.dumps((entry["uri"], grid, r)) for r in regions], dtype=object)}


_HANDLES: dict = {}


def read_stage(batch: dict, cfg: JobConfig) -> dict:
    """One region in (read once at the chosen level), its tiles out."""
    from .region_reader import read_region_tiles
    from .slide_access import open_slide

    sid, kind = str(batch["slide_id"][0]), str(batch["kind"][0])
    patch = cfg.tiling.patch_size
    if kind != "region":
        return _status_row(sid, kind, str(batch["message"][0]), patch, True)
    uri, grid, region = pickle.loads(batch["payload"][0])
    try:
        slide = _HANDLES.get(uri)
        if slide is None:
            if len(_HANDLES) > 16:   # bounded handle cache per worker
                _HANDLES.pop(next(iter(_HANDLES))).close()
            slide = _HANDLES[uri] = open_slide(uri, sid, cfg.cache)
        tile_ids, images = read_region_tiles(slide, grid, region)
    except ZeusError as e:
        return _status_row(sid, FAILED, str(e), patch, True)
    n = len(tile_ids)
    return {"slide_id": np.array([sid] * n), "tile_id": np.asarray(tile_ids, np.int64),
            "n_tiles": np.full(n, batch["n_tiles"][0], np.int64), "kind": np.array(["tile"] * n),
            "message": np.array([""] * n), "image": images, "read_node": np.array([_node_id()] * n)}


class EncodeStage:
    """Holds the frozen encoder; one actor per GPU (or CPU actors)."""

    def __init__(self, model_cfg: ModelConfig):
        from .encoders.registry import load_encoder
        self.encoder = load_encoder(model_cfg)

    def __call__(self, batch: dict) -> dict:
        tiles = batch["kind"] == "tile"
        dim = self.encoder.spec.embed_dim
        emb = np.zeros((len(tiles), dim), np.float32)
        if tiles.any():
            emb[tiles] = self.encoder.encode_images(batch["image"][tiles])
        keep = ("slide_id", "tile_id", "n_tiles", "kind", "message", "read_node")
        return {k: batch[k] for k in keep} | {"embedding": emb, "encode_node": np.array([_node_id()] * len(tiles))}


def text_stage(model_cfg: ModelConfig, prompt_set) -> tuple:
    """Class matrix (C, D) per the paper's Eq. 1, the model key and the logit scale."""
    from .encoders.registry import load_encoder
    from .prompts import class_embeddings
    enc = load_encoder(model_cfg)
    return class_embeddings(enc, prompt_set), enc.model_key, float(enc.logit_scale), enc.spec.embed_dim


# ----------------------------------------------------------------------------------------------
# Driver

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

    def line(self) -> str:
        rate = self.tiles_encoded / self.seconds if self.seconds else 0.0
        return (f"zeus run: {self.ok} slides ok ({self.skipped} already complete), {self.no_tissue} without tissue, "
                f"{self.failed} failed; {self.tiles_encoded} tiles encoded in {self.seconds:.1f} s "
                f"({rate:.1f} tiles/s); results in {self.root}")


def tiling_key(cfg: JobConfig) -> str:
    t = cfg.tiling
    return stable_hash({"mpp": t.mpp, "patch": t.patch_size, "stride": t.stride,
                        "min_tissue": t.min_tissue_fraction, "tissue": cfg.tissue.model_dump()}, 12)


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


def _pool_settings(cfg: JobConfig):
    """Encoder pool and reader slots from the cluster. GPU encoders when GPUs exist, or when the
    config asks for CUDA (an autoscaling cluster may have its GPU group at zero when the job
    starts: the pool's requests make the autoscaler add GPU nodes)."""
    import ray
    res = ray.cluster_resources()
    gpus = int(res.get("GPU", 0))
    cpus = res.get("CPU", 1)
    use_gpu = cfg.model.device.startswith("cuda") or (cfg.model.device == "auto" and gpus > 0)
    n_enc = cfg.ray.num_encoders or max(1, gpus)
    if use_gpu:   # one actor per GPU; every CPU left reads
        enc_args = {"num_gpus": 1}
        batch = cfg.model.batch_size or 64
        n_read = cfg.ray.num_readers or max(1, int(cpus) - n_enc)
    else:         # CPU encoders take most cores (torch threads); reading needs little next to them
        biggest_node = max((n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"]), default=1)
        enc_args = {"num_cpus": cfg.ray.encoder_cpus or max(1, min(int((cpus - 1) // n_enc), int(biggest_node)))}
        batch = cfg.model.batch_size or 16
        n_read = cfg.ray.num_readers or max(1, int(cpus - enc_args["num_cpus"] * n_enc))
    return n_enc, enc_args, batch, n_read


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
    for e in entries:
        keys_of[e.slide_id] = slide_keys(store, e, tkey, model_key, pkey)
        # A re-prompt trusts the stored embeddings and does not even stat the slide.
        source_ids[e.slide_id] = None if reprompt else source_identity(e.uri)
    by_id = {e.slide_id: e for e in entries}
    to_encode, to_reduce = [], []
    for e in entries:
        k = keys_of[e.slide_id]
        emb_done = store.complete(k.emb_dir)
        if reprompt:   # reuse the source identity recorded with the embeddings
            source_ids[e.slide_id] = (emb_done or {}).get("source")
        src = source_ids[e.slide_id]
        done = store.complete(k.res_dir)
        if done is not None and done.get("source") == src:
            summary.rows.append(done)
            summary.skipped += 1
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

    if to_encode:
        n_enc, enc_args, batch, n_read = _pool_settings(cfg)
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = progress
        ds = ray.data.from_items([{"entry": pickle.dumps(e.as_dict())} for e in to_encode],
                                 override_num_blocks=len(to_encode))
        read_res = cfg.ray.reader_resources or None
        ds = ds.map_batches(plan_stage, batch_size=1, num_cpus=1, memory=1024 * 2**20, resources=read_res,
                            fn_kwargs={"cfg": cfg, "store_root": store.root_uri, "source_ids": source_ids,
                                       "tiles_dirs": {e.slide_id: keys_of[e.slide_id].tiles_dir for e in to_encode}})
        ds = ds.map_batches(read_stage, batch_size=1, num_cpus=1, fn_kwargs={"cfg": cfg},
                            resources=read_res, compute=ray.data.TaskPoolStrategy(size=n_read))
        ds = ds.map_batches(EncodeStage, batch_size=batch, fn_constructor_kwargs={"model_cfg": cfg.model},
                            compute=ray.data.ActorPoolStrategy(size=n_enc),  # actors restart (Ray Data default)
                            resources=cfg.ray.encoder_resources or None, **enc_args)
        buffers: dict[str, list] = defaultdict(list)
        counts: dict[str, int] = defaultdict(int)
        finished: set[str] = set()
        for b in ds.iter_batches(batch_size=None, batch_format="numpy"):
            summary.read_nodes.update(np.unique(b["read_node"]).tolist())
            summary.encode_nodes.update(np.unique(b["encode_node"]).tolist())
            for sid in np.unique(b["slide_id"]):
                sel = b["slide_id"] == sid
                sid = str(sid)
                if sid in finished:
                    continue
                kinds = b["kind"][sel]
                if (kinds != "tile").any():   # failed or empty slide: record it once, drop its tiles
                    first = np.flatnonzero(kinds != "tile")[0]
                    finished.add(sid)
                    buffers.pop(sid, None)
                    summary.rows.append(_status(by_id[sid], str(kinds[first]), str(b["message"][sel][first])))
                    if progress:
                        log.info("slide %s: %s (%d/%d slides)", sid, kinds[first], len(finished), len(to_encode))
                    continue
                buffers[sid].append((b["tile_id"][sel], b["embedding"][sel]))
                counts[sid] += int(sel.sum())
                summary.tiles_encoded += int(sel.sum())
                if counts[sid] == int(b["n_tiles"][sel][0]):
                    parts = buffers.pop(sid)
                    finished.add(sid)
                    ids = np.concatenate([p[0] for p in parts])
                    emb = np.concatenate([p[1] for p in parts])
                    pending[reduce_remote.remote(_with_source(by_id[sid], source_ids), keys_of[sid], *common,
                                                 ray.put(emb), ids)] = sid
                    if progress:
                        log.info("slide %s encoded (%d/%d slides, %d tiles so far)", sid, len(finished),
                                 len(to_encode), summary.tiles_encoded)

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
                 emb_dtype, evaluation, embeddings, tile_ids):
    return reduce_slide(OutputStore(store_root), entry, keys, class_names, tumour_index, class_matrix,
                        logit_scale, embeddings, tile_ids, emb_dtype, evaluation)


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
