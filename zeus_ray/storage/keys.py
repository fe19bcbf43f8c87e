"""Keys that name stored outputs, and the slide status values (one place for both).

- tiling key: everything that decides which tiles exist and where (target µm/px, patch, stride,
  tissue parameters, the tissue threshold, the selection mode and its settings) and the version of
  the code that computes them (`TILING_VERSION`); one folder per key under a slide.
- model key (encoder id + weights fingerprint) and prompt key (hash of the resolved ensemble and
  the model key) come from the encoder and prompts modules.
- A slide's per-slide key adds its µm/px override (an override moves every tile), and
  input.default_mpp only for the slides that use it (slides/mpp_keys.py), so adding or changing
  that fallback never recomputes a slide with its own µm/px.

Layout under the output root (store.OutputStore):
  slides/<slide_id>/tiles/<key>/              tiles.parquet, tissue mask, preview
  slides/<slide_id>/embeddings/<key>/<model>/ pass-PP-TTTTTTTTT.parquet parts (engine/parts.py)
  slides/<slide_id>/results/<key>/<prompt>/   similarities, maps, mask, viewer outputs, metrics
"""
from __future__ import annotations

from dataclasses import dataclass

from .store import OutputStore, safe_component, stable_hash

# Bump when geometry, tissue segmentation or the stored layout changes what a key's outputs hold:
# every stored tile, embedding and result under an older version is then recomputed.
TILING_VERSION = 2

OK, FAILED, NO_TISSUE = "ok", "failed", "no_tissue"
ERROR_STATUSES = (FAILED, NO_TISSUE)


@dataclass(frozen=True)
class Keys:
    tiling_key: str      # per-slide tiling key (the slide's content fingerprint is in its tiles marker)
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
    if t.mode == "adaptive":   # its embeddings are a subset: never mixed with full-overlap ones
        key["adaptive"] = [t.adaptive_margin, t.adaptive_dilation, t.adaptive_disagreement, t.adaptive_coarse_first]
    return stable_hash(key, 12)


def run_key(prompt_key: str, cfg) -> str:
    """The key of a run's results and cohort folder: the prompt key, plus the post-processing when
    one is on (its masks and metrics differ, so they never share a folder with the plain ones)."""
    return prompt_key if cfg.postprocess == "none" else f"{prompt_key}-{cfg.postprocess}"


def slide_keys(store: OutputStore, slide_id: str, mpp_override, tkey: str, model_key: str, pkey: str,
               default_mpp: float | None = None) -> Keys:
    """`default_mpp`: the input.default_mpp this slide's tiles use (None for a slide with its own µm/px)."""
    skey = stable_hash([tkey, mpp_override] if default_mpp is None else
                       [tkey, mpp_override, {"default_mpp": default_mpp}], 12)
    return Keys(skey, model_key, pkey, store.slide_dir(slide_id, "tiles", skey),
                store.slide_dir(slide_id, "embeddings", skey, safe_component(model_key)),
                store.slide_dir(slide_id, "results", skey, pkey))


def source_identity(uri: str, storage_options: dict | None = None) -> str:
    """Cheap identity of a slide file (size + mtime or ETag), checked before reusing outputs so
    that a replaced slide is processed again. Unreachable slides get an identity that never
    matches, so they are retried."""
    from .remote import filesystem   # the input.storage_options rules of every input read
    try:
        fs, path = filesystem(uri, storage_options)
        info = fs.info(path)
    except Exception:  # noqa: BLE001 - any failure: "unknown", retried by the run
        return "unavailable"
    ident = {k: info.get(k) for k in ("size", "ETag", "etag", "mtime", "LastModified", "md5Hash") if info.get(k)}
    return stable_hash(ident, 16)
