"""Cohort manifest: CSV/Parquet with `slide_id, uri` (+ optional `annotation_uri, dataset,
center, mpp`), or a glob over a folder or bucket. Relative URIs resolve against the manifest's
folder so that a cohort folder can be moved or uploaded as a whole."""
from __future__ import annotations

import math
import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path

import fsspec
import pandas as pd

from .config import InputConfig
from .errors import ConfigError, ZeusError
from .store import check_slide_id

REQUIRED = ("slide_id", "uri")
OPTIONAL = ("annotation_uri", "dataset", "center", "mpp")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".vms", ".vmu", ".scn", ".mrxs", ".svslide", ".bif", ".dcm")


@dataclass(frozen=True)
class SlideEntry:
    slide_id: str
    uri: str
    annotation_uri: str | None = None
    dataset: str | None = None
    center: str | None = None
    mpp: float | None = None

    def as_dict(self) -> dict:
        return asdict(self)


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _resolve(uri: str | None, base: str) -> str | None:
    if uri is None or _is_remote(uri) or uri.startswith("file://") or Path(uri).is_absolute():
        return uri
    return posixpath.join(base, uri) if _is_remote(base) else str(Path(base) / uri)


def _clean(value):
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return None
    text = str(value).strip()
    return text or None


def read_manifest(uri: str) -> list[SlideEntry]:
    try:
        with fsspec.open(uri, "rb") as f:
            df = pd.read_parquet(f) if uri.endswith(".parquet") else pd.read_csv(f, dtype=str)
    except FileNotFoundError:
        raise ConfigError(f"input.manifest {uri}: file not found") from None
    except Exception as e:  # parser errors: name the file, one line
        raise ConfigError(f"input.manifest {uri}: cannot parse ({type(e).__name__}: {str(e).splitlines()[0]})") from None
    missing = [c for c in REQUIRED if c not in df.columns]
    if missing:
        raise ConfigError(f"input.manifest {uri}: missing column(s) {missing}; needs slide_id, uri "
                          f"and optionally {', '.join(OPTIONAL)}")
    unknown = [c for c in df.columns if c not in REQUIRED + OPTIONAL]
    if unknown:
        raise ConfigError(f"input.manifest {uri}: unknown column(s) {unknown}; allowed: {', '.join(REQUIRED + OPTIONAL)}")
    base = posixpath.dirname(uri) if _is_remote(uri) else str(Path(uri).resolve().parent)
    entries, seen = [], set()
    for i, row in enumerate(df.to_dict("records"), start=2):
        sid, u = _clean(row.get("slide_id")), _clean(row.get("uri"))
        if not sid or not u:
            raise ConfigError(f"input.manifest {uri}: line {i} has an empty slide_id or uri")
        try:
            check_slide_id(sid)
        except ZeusError as e:
            raise ConfigError(f"input.manifest {uri}: line {i}: {e}") from None
        if sid in seen:
            raise ConfigError(f"input.manifest {uri}: slide_id {sid!r} appears twice (line {i})")
        seen.add(sid)
        mpp = _clean(row.get("mpp"))
        try:
            mpp = float(mpp) if mpp is not None else None
            if mpp is not None and not mpp > 0:
                raise ValueError
        except ValueError:
            raise ConfigError(f"input.manifest {uri}: line {i}: mpp {row.get('mpp')!r} must be a positive number (µm/px)") from None
        entries.append(SlideEntry(sid, _resolve(u, base), _resolve(_clean(row.get("annotation_uri")), base),
                                  _clean(row.get("dataset")), _clean(row.get("center")), mpp))
    if not entries:
        raise ConfigError(f"input.manifest {uri}: no slides listed")
    return entries


def glob_slides(pattern: str) -> list[SlideEntry]:
    fs, _, paths = fsspec.get_fs_token_paths(pattern)
    proto = pattern.split("://", 1)[0] + "://" if _is_remote(pattern) else ""
    found = sorted(p for p in paths if p.lower().endswith(SLIDE_SUFFIXES))
    if not found:
        raise ConfigError(f"input.glob {pattern}: matched no slide files ({', '.join(SLIDE_SUFFIXES)})")
    entries, seen = [], set()
    for p in found:
        sid = posixpath.splitext(posixpath.basename(p))[0]
        if sid in seen:
            raise ConfigError(f"input.glob {pattern}: two slides share the id {sid!r}; use a manifest")
        seen.add(sid)
        entries.append(SlideEntry(check_slide_id(sid), proto + p if proto else p))
    return entries


def load_cohort(cfg: InputConfig) -> list[SlideEntry]:
    if cfg.manifest:
        return read_manifest(cfg.manifest)
    if cfg.glob:
        return glob_slides(cfg.glob)
    raise ConfigError("input: set input.manifest (CSV/Parquet) or input.glob (e.g. s3://bucket/slides/*.svs)")
