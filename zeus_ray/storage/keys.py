"""Keys that name stored outputs, and the slide status values (one place for both).

- tiling key: everything that decides which tiles exist and where (target µm/px, patch, stride,
  tissue parameters, the tissue threshold, the selection mode and its settings) and the version of
  the code that computes them (`TILING_VERSION`); one folder per key under a slide.
- model key (encoder id + weights fingerprint) and prompt key (hash of the resolved ensemble and
  the model key) come from the encoder and prompts modules.
- A slide's per-slide key adds its µm/px override (an override moves every tile) and the identity
  of its file (`source_identity`): a replaced slide file gets new tiles, embeddings and results
  folders, so nothing computed from the old file is ever read for the new one.
- input.default_mpp is in the key of only the slides that use it (slides/slide_keys.py), so adding or
  changing that fallback never recomputes a slide with its own µm/px.

Layout under the output root (store.OutputStore):
  slides/<slide_id>/tiles/<key>/              tiles.parquet, tissue mask, preview
  slides/<slide_id>/embeddings/<key>/<model>/ pass-PP-TTTTTTTTT.parquet parts (storage/parts.py)
  slides/<slide_id>/results/<key>/<prompt>/   similarities, maps, mask, viewer outputs, metrics
"""
from __future__ import annotations

import time
import uuid
from dataclasses import dataclass

from .store import MARKER, OutputStore, safe_component, stable_hash

# Bump when geometry, tissue segmentation or the stored layout changes what a key's outputs hold:
# every stored tile, embedding and result under an older version is then recomputed.
TILING_VERSION = 2

OK, FAILED, NO_TISSUE = "ok", "failed", "no_tissue"
ERROR_STATUSES = (FAILED, NO_TISSUE)


@dataclass(frozen=True)
class Keys:
    tiling_key: str      # per-slide key: cohort tiling key + µm/px override + the slide file's identity
    model_key: str
    prompt_key: str
    tiles_dir: str
    emb_dir: str
    res_dir: str


def tiling_key(cfg) -> str:
    """The cohort-wide part of the tiling key (config.JobConfig)."""
    t = cfg.tiling
    key = {"v": TILING_VERSION, "mpp": t.mpp, "patch": t.patch_size, "stride": t.stride,
           "min_tissue": t.min_tissue_fraction, "tissue": cfg.tissue.model_dump()}
    for k, default in (("anchor", "slide"), ("selection", "fraction"), ("padding", "white")):
        if getattr(t, k) != default:   # at the defaults left out: existing keys stay valid
            key[k] = getattr(t, k)
    if t.mode == "adaptive":   # its embeddings are a subset: never mixed with full-overlap ones
        key["adaptive"] = [t.adaptive_margin, t.adaptive_dilation, t.adaptive_disagreement, t.adaptive_coarse_first]
    return stable_hash(key, 12)


def run_key(prompt_key: str, cfg) -> str:
    """The key of a run's results and cohort folder: the prompt key, plus the post-processing when
    one is on (its masks and metrics differ, so they never share a folder with the plain ones)."""
    key = prompt_key
    if cfg.model.conch_tokenization != "conch" and cfg.model.id.strip() == "conch":   # other text embeddings
        key = f"{key}-{cfg.model.conch_tokenization}"
    return key if cfg.postprocess == "none" else f"{key}-{cfg.postprocess}"


def slide_keys(store: OutputStore, slide_id: str, mpp_override, tkey: str, model_key: str, pkey: str,
               source: str | None, default_mpp: float | None = None) -> Keys:
    """A slide's output folders. `source` is its file's identity (`source_identity`), None only for
    a slide whose outputs nobody stored (stored_keys); `default_mpp` the input.default_mpp its tiles
    use (None for a slide with its own µm/px)."""
    skey = stable_hash([tkey, mpp_override, source] if default_mpp is None else
                       [tkey, mpp_override, source, {"default_mpp": default_mpp}], 12)
    return Keys(skey, model_key, pkey, store.slide_dir(slide_id, "tiles", skey),
                store.slide_dir(slide_id, "embeddings", skey, safe_component(model_key)),
                store.slide_dir(slide_id, "results", skey, pkey))


def with_model(store: OutputStore, slide_id: str, keys: Keys, model_key: str, pkey: str) -> Keys:
    """The same slide's keys (same tiles) for a model and prompt key learnt later: a slide worker
    completes the keys the driver made before any model was loaded."""
    return Keys(keys.tiling_key, model_key, pkey, keys.tiles_dir,
                store.slide_dir(slide_id, "embeddings", keys.tiling_key, safe_component(model_key)),
                store.slide_dir(slide_id, "results", keys.tiling_key, pkey))


def embeddings_marker(keys: Keys, slide_id: str, source: str | None, info: dict) -> dict:
    """What an embeddings unit's marker holds: `source` and `committed_at` let `stored_keys` find
    the newest one of a slide without opening the slide."""
    return {"slide_id": slide_id, "tiling_key": keys.tiling_key, "model_key": keys.model_key,
            "source": source, "committed_at": time.time(), **info}


def stored_keys(store: OutputStore, slide_id: str, mpp_override, tkey: str, model_key: str,
                pkey: str, default_mpp: float | None = None) -> tuple[Keys, str | None] | None:
    """(keys, source) of the newest complete embeddings of a slide for this tiling and model,
    whatever file they were computed from (re-prompts and ablations read no slide); None if none."""
    found = []
    for marker in store.fs.glob(store.slide_dir(slide_id, "embeddings", "*", safe_component(model_key), MARKER)):
        info = store.complete(marker.rsplit("/", 1)[0]) or {}
        for d in {None, default_mpp}:   # the slide's own µm/px, or input.default_mpp
            keys = slide_keys(store, slide_id, mpp_override, tkey, model_key, pkey, info.get("source"), d)
            if f"{keys.emb_dir}/{MARKER}" == marker:   # this tiling and override (the key is a hash)
                found.append((info.get("committed_at") or 0.0, keys, info.get("source")))
    return max(found, key=lambda f: f[0])[1:] if found else None


def source_identity(uri: str, storage_options: dict | None = None) -> str:
    """Cheap identity of a slide file (size + mtime or ETag), part of its output keys, so that a
    replaced slide is processed again. An unreachable slide gets an identity that never matches
    (a fresh one per call): nothing is reused for it, and it is retried by every run."""
    return source_info(uri, storage_options)[0]


def source_info(uri: str, storage_options: dict | None = None) -> tuple[str, int]:
    """(source_identity, file size in bytes; 0 when unknown) from one stat."""
    from . import remote   # the input.storage_options rules of every input read
    try:
        fs, path = remote.filesystem(uri, storage_options)
        info = fs.info(path)
    except Exception:  # noqa: BLE001 - any failure: "unknown", retried by the run
        return f"unavailable-{uuid.uuid4().hex[:12]}", 0
    ident = {k: info.get(k) for k in ("size", "ETag", "etag", "mtime", "LastModified", "md5Hash") if info.get(k)}
    return stable_hash(ident, 16), int(info.get("size") or 0)
