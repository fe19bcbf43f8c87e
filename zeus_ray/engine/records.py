"""What crosses the Ray boundary, typed: the items the pipeline's stages pass on (engine/stages.py)
and the small records the driver reads back (engine/cohort_run.py).

Ray Data carries each record as one pickled `rec` cell (an Arrow binary column): the records hold
numpy arrays and regions, which Arrow cannot type, and a cell we pickle ourselves costs no log line
about a fallback. Nothing here holds pixels or embeddings, except `ReadChunk` (split shape: a
reader's tiles on their way to an encoder actor, never to the driver).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass, field

import numpy as np

from ..storage.keys import OK

REC = "rec"   # the one column of every pipeline row


def pack(obj) -> bytes:
    return pickle.dumps(obj, protocol=5)


def unpack(cell) -> object:
    return pickle.loads(cell)


# --- pipeline items ------------------------------------------------------------------------------

@dataclass
class SlideTask:
    """A slide to plan: its manifest row, keys and source identity (+ the run's id: a slide
    worker counts its tries on the slide within one run)."""
    entry: dict
    keys: object            # storage.keys.Keys
    source: object
    run_id: str = ""


@dataclass
class Chunk:
    """One stored part's worth of tiles: regions of one slide's pass, each region decoded once."""
    slide_id: str
    uri: str
    grid: object            # slides.tiling.TileGrid
    pass_no: int
    emb_dir: str
    tiling_key: str
    model_key: str
    dtype: str
    direct_tiff: bool
    regions: list
    want_scores: bool       # adaptive mode: the record carries the tiles' class scores

    @property
    def n_tiles(self) -> int:
        return sum(r.n_tiles for r in self.regions)


@dataclass
class ReadChunk:
    """Split shape: a chunk's tiles as read by a reader task (ids, uint8 (n, P, P, 3) per region)."""
    chunk: Chunk
    pieces: list
    read_node: str
    timing: dict
    failure: dict | None = None   # work.failure's fields when the slide could not be read


# --- records for the driver ----------------------------------------------------------------------

@dataclass
class Planned:
    """A slide's plan: its status and how many chunks of which pass follow it in the stream. In
    adaptive mode `state` (maps.selection.PassState) holds what is stored and selected so far; in
    full mode the counts suffice."""
    slide_id: str
    status: str = OK
    message: str | None = None
    reason: str | None = None
    pass_no: int = 0
    n_chunks: int = 0
    n_kept: int = 0          # kept tiles (what full overlap encodes)
    n_stored: int = 0        # tiles already stored before this run's chunks
    n_passes: int = 0        # passes stored before this run's chunks
    grid: object = None
    state: object = None
    node: str | None = None
    timing: dict = field(default_factory=dict)


@dataclass
class Encoded:
    """A chunk written as a part (or failed): tile count, where, and in adaptive mode the tiles'
    positions and class scores for the next selection."""
    slide_id: str
    pass_no: int
    status: str = OK
    n: int = 0
    part: str | None = None
    tile_ids: np.ndarray | None = None
    scores: np.ndarray | None = None
    encode_node: str | None = None
    read_node: str | None = None
    message: str | None = None
    reason: str | None = None
    timing: dict = field(default_factory=dict)


@dataclass
class ReduceJob:
    """What a slide's reduce task needs (results/reduce.reduce_slide reads it as its job dict)."""
    entry: dict
    keys: object
    class_names: list
    tumour_index: int
    class_matrix: np.ndarray
    logit_scale: float
    evaluation: dict
    output: dict
    postprocess: str
    storage_options: dict | None
    embeddings_info: dict | None

    def as_job(self) -> dict:
        return {"entry": self.entry, "keys": self.keys, "class_names": self.class_names,
                "tumour_index": self.tumour_index, "class_matrix": self.class_matrix,
                "logit_scale": self.logit_scale, "evaluation": self.evaluation, "output": self.output,
                "postprocess": self.postprocess, "storage_options": self.storage_options,
                "tumour_class_name": self.class_names[self.tumour_index],
                "embeddings_info": self.embeddings_info}


@dataclass
class Reduced:
    """A slide's result row (the slides table's row), or its failed row. From a slide worker (fused
    shape: the whole slide in one call) it also says what was encoded for it: tiles per pass, the
    node, and in adaptive mode the full-overlap and stored tile counts."""
    slide_id: str
    row: dict
    timing: dict = field(default_factory=dict)
    pass_tiles: dict = field(default_factory=dict)
    node: str | None = None
    tiles_full: int = 0
    tiles_stored: int = 0
    skipped: bool = False          # complete before this run (its stored row)
    prompt_key: str | None = None  # the worker's run key (slide workers learn it with the model)
    fatal: str | None = None       # the worker could not build the encoder: the run stops with this line


def status_row(entry: dict, status: str, message: str | None, reason: str | None = None) -> dict:
    """The row of a slide without results: its status, the one-line error and its reason."""
    return {"slide_id": entry["slide_id"], "status": status, "error": message or None, "reason": reason,
            "n_tiles": 0, "dataset": entry.get("dataset"), "center": entry.get("center"), "tumour_area_mm2": None}
