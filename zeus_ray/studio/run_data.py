"""The finished run a studio is opened on: its config, prompt set, slide table and where each
slide's stored outputs are. Read-only: the studio never writes into the run's own folders.

Every slide id the browser sends is looked up here (`StudioRun.slide`), so a request can only
reach the slides and files of this run."""
from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..config import load_config
from ..errors import ZeusError
from ..prompts import PromptSet, load_prompt_set, parse_prompt_set
from ..results.evaluate import resolve_prompt_key
from ..storage.keys import Keys
from ..storage.store import OutputStore, safe_component

log = logging.getLogger(__name__)

SORTABLE = ("slide_id", "status", "dice", "precision", "recall", "tumour_area_mm2", "dataset", "center", "n_tiles")
ROW_COLUMNS = SORTABLE + ("error", "iou", "tissue_area_mm2")


class UnknownSlide(ZeusError):
    """A slide id that is not one of the run's slides (answered 404)."""


@dataclass(frozen=True)
class SlideRef:
    slide_id: str
    uri: str | None               # the slide file (manifest), None when the manifest no longer lists it
    annotation_uri: str | None
    keys: Keys | None             # None for a slide without stored results
    row: dict


class StudioRun:
    """The run under `root` with prompt key `prompt_key` (default: the newest run there);
    `overrides` (model.* only) say where this machine finds the run's model weights."""

    def __init__(self, root: str, prompt_key: str | None = None, overrides: list[str] | None = None):
        self.store = OutputStore(root)
        self.prompt_key = resolve_prompt_key(self.store, prompt_key)
        self.cohort_dir = self.store.path("cohort", self.prompt_key)
        self.info = self.store.read_json(f"{self.cohort_dir}/run.json")
        self.cfg = load_config(None, overrides or [], base=self.info["config"])
        self.storage_options = dict(self.cfg.input.storage_options or {})
        self.table = _slide_table(self.store.read_parquet(f"{self.cohort_dir}/slides.parquet").to_pandas())
        self.prompt_set = self._prompt_set()
        self.model_key = _first(self.table.get("model_key"))
        self._refs = self._slide_refs()

    def _prompt_set(self) -> PromptSet:
        """The run's prompt file; the studio still opens (without the prompt panel's defaults)
        if the file moved since the run."""
        try:
            return load_prompt_set(self.cfg.prompts.file)
        except ZeusError as e:
            log.warning("run %s: %s; the prompt panel starts from the run's class names only", self.prompt_key, e)
            classes = self.info.get("classes") or ["normal", "tumor"]
            return parse_prompt_set({"name": "run", "templates": ["CLASSNAME"], "tumour_class": self.info.get(
                "tumour_class", classes[-1]), "classes": [{"name": c, "classnames": [c]} for c in classes]})

    def _slide_refs(self) -> dict[str, SlideRef]:
        entries = {}
        try:
            from ..cohort_input.manifest import load_cohort
            entries = {e.slide_id: e for e in load_cohort(self.cfg.input)}
        except ZeusError as e:   # the slides' own files are needed for the viewer only
            log.warning("run %s: the cohort's manifest cannot be read (%s); the slide viewer is off", self.prompt_key, e)
        refs = {}
        for row in self.table.to_dict("records"):
            sid = row["slide_id"]
            e = entries.get(sid)
            keys = None
            if row.get("status") == "ok" and row.get("model_key") and row.get("tiling_key"):
                keys = _slide_keys(self.store, sid, row["tiling_key"], row["model_key"], self.prompt_key)
            refs[sid] = SlideRef(sid, e.uri if e else None, e.annotation_uri if e else None, keys, _clean(row))
        return refs

    def slide(self, slide_id: str) -> SlideRef:
        ref = self._refs.get(slide_id) if isinstance(slide_id, str) else None
        if ref is None:
            raise UnknownSlide(f"slide {slide_id!r} is not in run {self.prompt_key}; pick one from the cohort page")
        return ref

    @property
    def slide_ids(self) -> list[str]:
        return list(self._refs)

    def summary(self) -> dict:
        t = self.table
        return {"root": self.store.root_uri, "prompt_key": self.prompt_key, "model": self.cfg.model.id,
                "model_key": self.model_key, "classes": self.prompt_set.class_names,
                "tumour_class": self.prompt_set.tumour_class, "n_slides": len(t),
                "statuses": sorted(t["status"].dropna().unique().tolist()),
                "datasets": sorted(t["dataset"].dropna().unique().tolist()),
                "centers": sorted(t["center"].dropna().unique().tolist()),
                "postprocess": self.cfg.postprocess, "summary": self.info.get("summary")}


def _slide_keys(store: OutputStore, sid: str, skey: str, model_key: str, pkey: str) -> Keys:
    """The slide's folders from the keys its result row records (as storage.keys.slide_keys)."""
    return Keys(skey, model_key, pkey, store.slide_dir(sid, "tiles", skey),
                store.slide_dir(sid, "embeddings", skey, safe_component(model_key)),
                store.slide_dir(sid, "results", skey, pkey))


def _first(col) -> str | None:
    if col is None:
        return None
    vals = col.dropna()
    return str(vals.iloc[0]) if len(vals) else None


def _slide_table(df: pd.DataFrame) -> pd.DataFrame:
    for c in ROW_COLUMNS:
        if c not in df:
            df[c] = np.nan
    for c in ("dataset", "center", "status", "error"):
        df[c] = df[c].astype("object").where(df[c].notna(), None)
    return df.reset_index(drop=True)


def _clean(row: dict) -> dict:
    """JSON-safe values (NaN → None, numpy scalars → Python)."""
    out = {}
    for k, v in row.items():
        if isinstance(v, (np.generic,)):
            v = v.item()
        if isinstance(v, float) and math.isnan(v):
            v = None
        out[k] = v
    return out


def query_slides(df: pd.DataFrame, *, status: str | None = None, dataset: str | None = None,
                 center: str | None = None, search: str | None = None, sort: str = "slide_id",
                 descending: bool = False, page: int = 0, per_page: int = 50) -> dict:
    """One page of the slide table, filtered and sorted (missing values last either way)."""
    if sort not in SORTABLE:
        raise ValueError(f"sort={sort!r}: sort by one of {', '.join(SORTABLE)}")
    per_page = max(1, min(int(per_page), 500))
    m = np.ones(len(df), bool)
    for col, val in (("status", status), ("dataset", dataset), ("center", center)):
        if val:
            m &= (df[col] == val).to_numpy()
    if search:
        m &= df["slide_id"].str.contains(search, case=False, regex=False).to_numpy()
    sel = df[m].sort_values(sort, ascending=not descending, na_position="last", kind="stable")
    page = max(0, int(page))
    rows = sel.iloc[page * per_page:(page + 1) * per_page]
    return {"total": int(len(sel)), "page": page, "per_page": per_page,
            "rows": [_clean({c: r[c] for c in ROW_COLUMNS}) for r in rows.to_dict("records")]}
