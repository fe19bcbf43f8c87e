"""Deep-zoom tiles of a run's slides for the viewer: OpenSlide's DeepZoomGenerator over the slide
file (a bucket slide is fetched once into the run's slide cache, as the run does).

Tiles are 256 px without overlap and without `limit_bounds`, so the viewer's coordinates are the
slide's level-0 pixels: overlays drawn on the cell grid (origin 0,0) line up with them.
"""
from __future__ import annotations

import io
import threading
from collections import OrderedDict

from ..errors import ZeusError
from ..slides.access import open_slide_file

TILE_SIZE = 256
JPEG_QUALITY = 82


class TileError(ZeusError):
    """A tile that does not exist (level or address out of range): answered 404."""


class LRUCache:
    def __init__(self, size: int):
        self.size, self.items, self.lock = size, OrderedDict(), threading.Lock()

    def get(self, key):
        with self.lock:
            if key in self.items:
                self.items.move_to_end(key)
                return self.items[key]
        return None

    def put(self, key, value):
        with self.lock:
            self.items[key] = value
            self.items.move_to_end(key)
            while len(self.items) > self.size:
                self.items.popitem(last=False)
        return value


class DeepZoomTiles:
    """Open slides (a few, least recently used closed first) and recently served tiles."""

    def __init__(self, cache_cfg=None, storage_options: dict | None = None, slides: int = 8, tiles: int = 4096):
        self.cache_cfg, self.storage_options = cache_cfg, storage_options
        self._gens = LRUCache(slides)
        self._tiles = LRUCache(tiles)
        self._open_lock = threading.Lock()

    def generator(self, slide_id: str, uri: str):
        gen = self._gens.get(slide_id)
        if gen is None:
            with self._open_lock:   # one open per slide even when the viewer asks for many tiles at once
                gen = self._gens.get(slide_id)
                if gen is None:
                    from openslide.deepzoom import DeepZoomGenerator
                    slide, _ = open_slide_file(uri, slide_id, self.cache_cfg, self.storage_options)
                    gen = self._gens.put(slide_id, DeepZoomGenerator(slide, tile_size=TILE_SIZE, overlap=0,
                                                                     limit_bounds=False))
        return gen

    def dzi(self, slide_id: str, uri: str) -> str:
        return self.generator(slide_id, uri).get_dzi("jpeg")

    def info(self, slide_id: str, uri: str) -> dict:
        gen = self.generator(slide_id, uri)
        w, h = gen.level_dimensions[-1]
        return {"width": w, "height": h, "levels": gen.level_count, "tile_size": TILE_SIZE}

    def tile(self, slide_id: str, uri: str, level: int, col: int, row: int) -> bytes:
        key = (slide_id, level, col, row)
        data = self._tiles.get(key)
        if data is not None:
            return data
        gen = self.generator(slide_id, uri)
        if not 0 <= level < gen.level_count:
            raise TileError(f"slide {slide_id}: no deep-zoom level {level} (0..{gen.level_count - 1})")
        cols, rows = gen.level_tiles[level]
        if not (0 <= col < cols and 0 <= row < rows):
            raise TileError(f"slide {slide_id}: no tile {col}_{row} at level {level} ({cols} x {rows} tiles)")
        img = gen.get_tile(level, (col, row))
        buf = io.BytesIO()
        img.convert("RGB").save(buf, format="JPEG", quality=JPEG_QUALITY)
        return self._tiles.put(key, buf.getvalue())
