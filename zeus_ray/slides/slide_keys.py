"""The cohort's per-slide storage keys (storage/keys.slide_keys): each holds the slide file's
identity, so a replaced file is planned and encoded anew, and input.default_mpp is part of the key
of only the slides that use it (metadata without a usable µm/px or objective power, no manifest `mpp`), so
adding or changing it recomputes those slides and no other.

Which slides use it is read from what is stored when possible (a complete tiles folder under
either key says it) and otherwise from the slide's metadata, opened here with the same rules as
planning (magnification.resolve_mpp)."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from ..errors import SlideError
from ..storage.keys import Keys, slide_keys, source_info, stored_keys
from ..storage.store import OutputStore
from .access import open_slide
from .magnification import resolve_mpp

log = logging.getLogger(__name__)


def uses_default_mpp(entry, cfg) -> bool:
    """Whether planning this slide would take input.default_mpp. A slide that cannot be opened
    fails in planning with its own reason, whatever its key: False."""
    if entry.mpp is not None or cfg.input.default_mpp is None:
        return False
    try:
        slide = open_slide(entry.uri, entry.slide_id, cfg.cache, cfg.input.storage_options)
    except Exception:  # noqa: BLE001 - planning reports it, with its reason
        return False
    try:
        return resolve_mpp(slide, entry.slide_id, None, cfg.input.default_mpp, warn=False)[1] == "input.default_mpp"
    except SlideError:
        return False
    finally:
        slide.close()


def cohort_keys(store: OutputStore, entries, cfg, tkey: str, model_key: str, pkey: str,
                stored_only: bool = False, sizes: dict | None = None) -> tuple[dict, dict[str, Keys]]:
    """({slide id: source identity}, {slide id: Keys}) of the cohort's slides (manifest entries).

    Each slide file is stat'ed (its identity is in its keys: a replaced file is planned and encoded
    anew); with input.default_mpp the fallback is in the key of the slides that use it only. With
    `stored_only` (re-prompts, ablations) no slide is touched: the newest stored embeddings are used
    (source None and fresh keys where nothing is stored). `sizes`, when given, gets each slide's
    file size from the same stat (slide id → bytes, 0 when unknown)."""
    default = cfg.input.default_mpp
    options = getattr(cfg.input, "storage_options", None)

    def one(e):
        if stored_only:
            found = stored_keys(store, e.slide_id, e.mpp, tkey, model_key, pkey, default)
            if found is not None:
                return found[1], found[0]
            return None, slide_keys(store, e.slide_id, e.mpp, tkey, model_key, pkey, None)
        src, size = source_info(e.uri, options)
        if sizes is not None:
            sizes[e.slide_id] = size
        own = slide_keys(store, e.slide_id, e.mpp, tkey, model_key, pkey, src)
        if default is None or e.mpp is not None or store.complete(own.tiles_dir) is not None:
            return src, own
        fallback = slide_keys(store, e.slide_id, e.mpp, tkey, model_key, pkey, src, default_mpp=default)
        if store.complete(fallback.tiles_dir) is not None or uses_default_mpp(e, cfg):
            return src, fallback
        return src, own

    with ThreadPoolExecutor(16) as ex:   # bucket stats and slide opens overlap
        done = list(ex.map(one, entries))
    sources = {e.slide_id: d[0] for e, d in zip(entries, done)}
    keys = {e.slide_id: d[1] for e, d in zip(entries, done)}
    users = sorted(e.slide_id for e in entries if default is not None and e.mpp is None and sources[e.slide_id]
                   and keys[e.slide_id].tiling_key != slide_keys(store, e.slide_id, e.mpp, tkey, model_key, pkey,
                                                                 sources[e.slide_id]).tiling_key)
    if users:
        log.info("input.default_mpp %g µm/px: used by %d slide(s) without their own (%s)", default, len(users),
                 ", ".join(users[:5]) + (", …" if len(users) > 5 else ""))
    return sources, keys
