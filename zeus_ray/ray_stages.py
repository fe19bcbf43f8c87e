"""Ray Data stages of the cohort job (they run inside Ray workers) and the stream helpers that
chain them: regions → read (CPU tasks) → encode (actor pool) → per-slide gathering in the driver.

Rows flow as dicts of numpy arrays. Every row names its slide and carries `n_tiles`, the number
of tiles the driver waits for, so it knows when a slide is complete without any shuffle; a slide
that fails or has no tissue becomes a single status row that passes the later stages untouched.
"""
from __future__ import annotations

import logging
import pickle
import tempfile
from collections import defaultdict

import numpy as np
from PIL import Image

from .config import JobConfig, ModelConfig
from .errors import ZeusError
from .store import OutputStore

log = logging.getLogger(__name__)

OK, FAILED, NO_TISSUE = "ok", "failed", "no_tissue"
READ_MEMORY = 1024 * 2**20   # bytes per region-read worker (measured peak ~850 MiB with its imports)


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


def ensure_tiles(store: OutputStore, entry: dict, cfg: JobConfig, tiles_dir: str, source) -> tuple:
    """The slide's tiles table, grid and status: a complete tiles folder of the same slide file is
    reused, otherwise the slide is planned and its tiles outputs committed. Raises ZeusError."""
    from .tiles_stage import mpp_label, plan_slide, write_tiles_outputs
    from .tiling import GRID_METADATA_KEY, TileGrid

    sid = entry["slide_id"]
    done = store.complete(tiles_dir)
    if done is not None and done.get("source") == source:
        tiles = store.read_parquet(f"{tiles_dir}/tiles.parquet")
        return tiles, TileGrid.from_json(tiles.schema.metadata[GRID_METADATA_KEY]), done["status"]
    plan = plan_slide(entry["uri"], sid, cfg, mpp_override=entry.get("mpp"))
    with tempfile.TemporaryDirectory() as tmp:
        write_tiles_outputs(plan, tmp)
        Image.fromarray(plan.display).save(f"{tmp}/display_{mpp_label(plan.display_mpp)}mpp.png")
        store.upload_dir(tmp, tiles_dir)
    store.commit(tiles_dir, {"slide_id": sid, "tiling_key": plan.tiling_key, "status": plan.status,
                             "n_tiles": plan.n_tiles, "source": source})
    return plan.tiles, plan.grid, plan.status


def no_tiles_message(sid: str, status: str) -> str:
    why = "no tissue found" if status == "no_tissue" else "tissue found, but no tile reaches tiling.min_tissue_fraction"
    return f"slide {sid!r}: {why} (zero tiles)"


def region_rows(sid: str, uri: str, grid, tiles, region_tiles: int) -> dict:
    """One row per region covering `tiles` (a tiles table, or a subset of one); `n_tiles` is the
    number of tiles the driver waits for before the slide (or its pass) is complete."""
    from .region_reader import plan_regions
    regions = plan_regions(tiles, grid, region_tiles, slide_id=sid)
    n = len(regions)
    return {"slide_id": np.array([sid] * n), "tile_id": np.zeros(n, np.int64),
            "n_tiles": np.full(n, tiles.num_rows, np.int64), "kind": np.array(["region"] * n),
            "message": np.array([""] * n),
            "payload": np.array([pickle.dumps((uri, grid, r)) for r in regions], dtype=object)}


def guarded(sid: str, fn, *args):
    """Run fn(*args) for one slide; its failure becomes a status row, never a failed job."""
    try:
        return fn(*args)
    except ZeusError as e:
        return _status_row(sid, FAILED, str(e), 0, False)
    except Exception as e:  # one bad slide never stops the cohort
        log.exception("slide %s failed", sid)
        return _status_row(sid, FAILED, f"slide {sid!r}: {type(e).__name__}: {e}", 0, False)


def plan_stage(batch: dict, cfg: JobConfig, store_root: str, tiles_dirs: dict, source_ids: dict) -> dict:
    """One slide in, its regions out (or one status row)."""
    entry = pickle.loads(batch["entry"][0])
    sid = entry["slide_id"]

    def plan():
        tiles, grid, status = ensure_tiles(OutputStore(store_root), entry, cfg, tiles_dirs[sid], source_ids[sid])
        if tiles.num_rows == 0:
            return _status_row(sid, NO_TISSUE, no_tiles_message(sid, status), 0, False)
        return region_rows(sid, entry["uri"], grid, tiles, cfg.tiling.region_tiles)
    return guarded(sid, plan)


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


def encode_dataset(cfg: JobConfig, ds):
    """Append the read (CPU tasks) and encode (actor pool) stages to a dataset of region rows."""
    import ray.data
    n_enc, enc_args, batch, n_read = pool_settings(cfg)
    # The memory request is what a read worker holds (imports, RGBA region ≤ 4096² px, tiles); it also
    # keeps Ray Data from fusing the reads into the encoder actors (it fuses a task stage into the
    # next actor stage when their remote args are equal), so reads run beside the encoders.
    ds = ds.map_batches(read_stage, batch_size=1, num_cpus=1, memory=READ_MEMORY, fn_kwargs={"cfg": cfg},
                        resources=cfg.ray.reader_resources or None, compute=ray.data.TaskPoolStrategy(size=n_read))
    return ds.map_batches(EncodeStage, batch_size=batch, fn_constructor_kwargs={"model_cfg": cfg.model},
                          compute=ray.data.ActorPoolStrategy(size=n_enc),  # actors restart (Ray Data default)
                          resources=cfg.ray.encoder_resources or None, **enc_args)


def stream_slides(ds, summary, on_status, on_complete) -> None:
    """Consume the encoded stream: per slide, gather (tile_ids, embeddings) until its `n_tiles`
    have arrived, then call on_complete(sid, ids, emb); a status row calls on_status(sid, kind,
    message) once and drops the slide's other rows."""
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
            if (kinds != "tile").any():
                first = np.flatnonzero(kinds != "tile")[0]
                finished.add(sid)
                buffers.pop(sid, None)
                on_status(sid, str(kinds[first]), str(b["message"][sel][first]))
                continue
            buffers[sid].append((b["tile_id"][sel], b["embedding"][sel]))
            counts[sid] += int(sel.sum())
            summary.tiles_encoded += int(sel.sum())
            if counts[sid] == int(b["n_tiles"][sel][0]):
                parts = buffers.pop(sid)
                finished.add(sid)
                on_complete(sid, np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts]))


def pool_settings(cfg: JobConfig):
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


