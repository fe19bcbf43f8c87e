"""Cohort manifest: CSV/Parquet with `slide_id, uri` (+ optional `annotation_uri, dataset,
center, mpp`), or a glob over a folder or bucket. Relative URIs resolve against the manifest's
folder so that a cohort folder can be moved or uploaded as a whole. Remote reads use the config's
`input.storage_options` (e.g. `{anon: true}` for a public bucket) through `storage.remote.filesystem`,
as the slide and annotation reads do."""
from __future__ import annotations

import io
import math
import posixpath
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd

from ..config import InputConfig
from ..errors import ConfigError, ZeusError
from ..storage import remote
from ..storage.store import check_slide_id

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


def _remote_error(what: str, uri: str, e: Exception, storage_options: dict | None) -> ConfigError:
    """One line naming the input and why the backend refused, without credentials."""
    opts = storage_options or {}
    anon = opts.get("anon") or (opts.get(remote.protocol(uri)) or {}).get("anon")
    refused = isinstance(e, PermissionError) or "credential" in type(e).__name__.lower()
    return ConfigError(f"{what} {remote.redact(uri)}: {remote.redact(remote.cause(e, remote.protocol(uri)), remote.secrets(storage_options))}"
                       + (" (a public bucket needs input.storage_options {anon: true})" if refused and not anon else ""))


def read_manifest(uri: str, storage_options: dict | None = None) -> list[SlideEntry]:
    try:
        fs, path = remote.filesystem(uri, storage_options)
        with fs.open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ConfigError(f"input.manifest {remote.redact(uri)}: file not found") from None
    except Exception as e:  # noqa: BLE001 - access, network: one line, no credentials
        raise _remote_error("input.manifest", uri, e, storage_options) from None
    try:
        df = pd.read_parquet(io.BytesIO(data)) if uri.endswith(".parquet") else pd.read_csv(io.BytesIO(data), dtype=str)
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


def glob_slides(pattern: str, storage_options: dict | None = None) -> list[SlideEntry]:
    try:
        fs, path = remote.filesystem(pattern, storage_options)
        paths = fs.glob(path)
    except Exception as e:  # noqa: BLE001 - access, network: one line, no credentials
        raise _remote_error("input.glob", pattern, e, storage_options) from None
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
        return read_manifest(cfg.manifest, cfg.storage_options)
    if cfg.glob:
        return glob_slides(cfg.glob, cfg.storage_options)
    raise ConfigError("input: set input.manifest (CSV/Parquet) or input.glob (e.g. s3://bucket/slides/*.svs)")
