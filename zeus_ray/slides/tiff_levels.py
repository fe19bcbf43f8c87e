"""Region reads straight from a slide's TIFF tiles (tifffile + imagecodecs) where that gives
OpenSlide's pixels: Aperio SVS and generic tiled TIFF levels stored as one tiled page each.

Why: OpenSlide's read_region costs about 33 ns per decoded pixel on the 20x benchmark slides; the
same JPEG tiles decoded here cost about 4 ns (benchmarks/RESULTS.md, "Region reads"). On a GPU node
reading decides a cohort's speed.

Same pixels: the same codecs (libjpeg-turbo, OpenJPEG) decode the same tile bytes; tests compare
both readers bit for bit on real SVS files (RGB JPEG with shared tables, JPEG 2000, YCbCr JPEG).
One difference by design: at a level whose downsample is not an integer, OpenSlide resamples the
region to the fractional origin location / downsample, while this reads from the integer level
pixel that region planning chose (region_reader.plan_regions computes the tile offsets from it).

Everything else keeps OpenSlide: other vendors (overlapping, sparse or offset tiles: Ventana,
Philips, Leica, Hamamatsu, MIRAX, DICOM), several pages of a level's size, odd sample layouts.
"""
from __future__ import annotations

import itertools
from collections import OrderedDict

import numpy as np

from ..errors import SlideError

VENDORS = {"aperio", "generic-tiff"}
CACHE_BYTES = 32 << 20   # decoded tiles kept per worker: neighbouring regions share border tiles


class _TileCache:
    def __init__(self, budget: int):
        self.budget, self.used, self.items = budget, 0, OrderedDict()

    def get(self, key):
        arr = self.items.get(key)
        if arr is not None:
            self.items.move_to_end(key)
        return arr

    def put(self, key, arr: np.ndarray) -> None:
        self.items[key] = arr
        self.used += arr.nbytes
        while self.used > self.budget and len(self.items) > 1:
            self.used -= self.items.popitem(last=False)[1].nbytes


_CACHE = _TileCache(CACHE_BYTES)
_IDS = itertools.count()   # cache keys: never reused, unlike id() of a closed reader


def _direct_page(page) -> bool:
    """A page whose tiles decode to 8-bit RGB(A) without help from OpenSlide."""
    return (page.is_tiled and page.tiledepth == 1 and page.imagedepth == 1 and page.bitspersample == 8
            and page.samplesperpixel in (3, 4) and page.planarconfig == 1 and page.dtype == np.uint8)


class TiffLevels:
    """The slide's levels that can be read directly: level → tifffile page."""

    def __init__(self, tif, pages: dict):
        self.tif, self.pages, self.key = tif, pages, next(_IDS)

    @classmethod
    def open(cls, path: str, slide) -> TiffLevels | None:
        """For an open OpenSlide `slide` of the local file `path`: the direct reader, or None when
        no level qualifies (the caller keeps OpenSlide)."""
        if slide.properties.get("openslide.vendor") not in VENDORS:
            return None
        import tifffile
        try:
            tif = tifffile.TiffFile(path)
        except Exception:  # noqa: BLE001 - OpenSlide opened it; let OpenSlide read it
            return None
        pages = {}
        try:
            for level, size in enumerate(slide.level_dimensions):
                same = [p for p in tif.pages if p.is_tiled and (p.imagewidth, p.imagelength) == tuple(size)]
                if len(same) == 1 and _direct_page(same[0]):
                    pages[level] = same[0]
        except Exception:  # noqa: BLE001
            pages = {}
        if not pages:
            tif.close()
            return None
        return cls(tif, pages)

    def close(self) -> None:
        self.tif.close()

    def has(self, level: int) -> bool:
        return level in self.pages

    def read(self, level: int, x: int, y: int, w: int, h: int, slide_id: str = "", fill: int = 255) -> np.ndarray:
        """RGB uint8 (h, w, 3) of level pixels [x, x + w) × [y, y + h); `fill` (white) outside the
        image (where OpenSlide returns transparent pixels, which region reads composite over white;
        0 gives them as PIL's convert('RGB') does: black)."""
        page = self.pages[level]
        tw, th, iw, ih = page.tilewidth, page.tilelength, page.imagewidth, page.imagelength
        out = np.full((h, w, 3), fill, np.uint8)
        x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + w, iw), min(y + h, ih)
        if x1 <= x0 or y1 <= y0:
            return out
        per_row = -(-iw // tw)
        for ty in range(y0 // th, (y1 - 1) // th + 1):
            for tx in range(x0 // tw, (x1 - 1) // tw + 1):
                tile = self._tile(page, ty * per_row + tx, slide_id)
                if tile is None:   # a tile the file does not store: left as outside the image
                    continue
                ax, ay = tx * tw, ty * th
                sx0, sy0, sx1, sy1 = max(x0, ax), max(y0, ay), min(x1, ax + tw), min(y1, ay + th)
                out[sy0 - y:sy1 - y, sx0 - x:sx1 - x] = tile[sy0 - ay:sy1 - ay, sx0 - ax:sx1 - ax, :3]
        return out

    def _tile(self, page, index: int, slide_id: str) -> np.ndarray | None:
        key = (self.key, page.index, index)
        tile = _CACHE.get(key)
        if tile is not None:
            return tile
        offset, count = page.dataoffsets[index], page.databytecounts[index]
        if not count:
            return None
        try:
            fh = self.tif.filehandle
            fh.seek(offset)
            data = fh.read(count)
            seg, _, _ = page.decode(data, index, jpegtables=page.jpegtables)
            tile = seg.reshape(seg.shape[-3:])
        except Exception as e:  # noqa: BLE001 - any codec or I/O failure: the slide's pixels are damaged
            raise SlideError(slide_id, f"tile data is corrupt: {type(e).__name__}: {e} "
                                       "(re-export or re-scan the slide)", reason="unreadable") from None
        _CACHE.put(key, tile)
        return tile
