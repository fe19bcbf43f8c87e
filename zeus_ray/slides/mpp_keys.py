"""Per-slide storage keys when input.default_mpp is set: the fallback is part of the key of only
the slides that use it (metadata without a usable µm/px or objective power, no manifest `mpp`), so
adding or changing it recomputes those slides and no other.

Which slides use it is read from what is stored when possible (a complete tiles folder under
either key says it) and otherwise from the slide's metadata, opened here with the same rules as
planning (magnification.resolve_mpp)."""
from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor

from ..errors import SlideError
from ..storage.keys import Keys, slide_keys
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


def keys_by_slide(store: OutputStore, entries, cfg, tkey: str, model_key: str, pkey: str,
                  open_slides: bool = True) -> dict[str, Keys]:
    """slide_id → Keys. `open_slides=False` (re-prompting from stored embeddings): decide from what
    is stored only."""
    default = cfg.input.default_mpp

    def keys(e) -> Keys:
        own = slide_keys(store, e.slide_id, e.mpp, tkey, model_key, pkey)
        if default is None or e.mpp is not None:
            return own
        fallback = slide_keys(store, e.slide_id, e.mpp, tkey, model_key, pkey, default_mpp=default)
        if store.complete(own.tiles_dir) is not None:
            return own
        if store.complete(fallback.tiles_dir) is not None:
            return fallback
        return fallback if open_slides and uses_default_mpp(e, cfg) else own

    with ThreadPoolExecutor(8) as ex:   # bucket stats and slide opens overlap
        out = dict(zip((e.slide_id for e in entries), ex.map(keys, entries)))
    users = sorted(e.slide_id for e in entries if default is not None and e.mpp is None and out[e.slide_id]
                   != slide_keys(store, e.slide_id, e.mpp, tkey, model_key, pkey))
    if users:
        log.info("input.default_mpp %g µm/px: used by %d slide(s) without their own (%s)", default, len(users),
                 ", ".join(users[:5]) + (", …" if len(users) > 5 else ""))
    return out
