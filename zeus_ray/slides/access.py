"""Slide access: local paths, remote slides localised into a bounded on-disk cache, OpenSlide
handles with clear per-slide errors.

OpenSlide needs a local path, so a remote slide (s3://, gs://, http(s)://, any fsspec protocol) is
fetched once into `CacheConfig.dir`. An entry is a folder named after a hash of the URI and the
remote object's identity (ETag/size/mtime), so a changed object is fetched again. Downloads go to
a temporary folder in the cache and are renamed into place (a partial download is never visible);
a per-entry file lock makes concurrent processes download a slide once; least recently used
entries are evicted when the cache grows past `max_gb`.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from pathlib import Path

from filelock import FileLock, Timeout
from PIL import UnidentifiedImageError

from ..config import CacheConfig
from ..storage.remote import LOCAL_PROTOCOLS, filesystem, local_path, redact
from ..storage.remote import cause as error_cause, protocol as uri_protocol, secrets as secret_values
from ..errors import SlideError

log = logging.getLogger(__name__)

_TMP_PREFIX = ".tmp-"
_MiB = 1 << 20
_SUPPORTED = ("supported: SVS, tiled TIFF, NDPI, MRXS, SCN, VMS, BIF, DICOM, ...; "
              "convert it to a tiled pyramidal TIFF, e.g. with `vips tiffsave in out.tif --tile --pyramid`")


def _identity(info: dict) -> dict:
    """The parts of fsspec's info that change when the object changes."""
    keys = ("ETag", "etag", "size", "LastModified", "last_modified", "mtime", "updated",
            "generation", "md5Hash", "VersionId", "version_id")
    return {k: str(info[k]) for k in keys if info.get(k) is not None}


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _entry_target(entry: Path) -> str:
    """The path handed to OpenSlide for a cache entry: its one file, or the folder (DICOM)."""
    files = [p for p in entry.iterdir() if not p.name.startswith(".")]
    return str(files[0]) if len(files) == 1 and files[0].is_file() else str(entry)


def _evict(cache_dir: Path, max_bytes: int, keep: Path) -> None:
    """Delete least recently used entries (by folder mtime, touched on use) until the cache is
    under `max_bytes`. Never the entry just fetched; never an entry another process holds."""
    with FileLock(str(cache_dir / ".evict.lock")):
        entries = [p for p in cache_dir.iterdir() if p.is_dir() and not p.name.startswith(".")]
        sizes = {p: _dir_size(p) for p in entries}
        total = sum(sizes.values())
        for entry in sorted(entries, key=lambda p: p.stat().st_mtime_ns):
            if total <= max_bytes:
                break
            if entry == keep:
                continue
            lock = FileLock(str(cache_dir / f"{entry.name}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue
            try:
                shutil.rmtree(entry, ignore_errors=True)
                total -= sizes[entry]
                log.info("slide cache: evicted %s (%.1f MB)", entry.name, sizes[entry] / 1e6)
            finally:
                lock.release()
        if total > max_bytes:
            log.warning("slide cache %s holds %.2f GB, over its %.2f GB limit (the slide in use is "
                        "larger than the limit: raise cache.max_gb)", cache_dir, total / 1e9, max_bytes / 1e9)


def localise(uri: str, cache_cfg: CacheConfig | None = None, slide_id: str | None = None,
             storage_options: dict | None = None) -> str:
    """Return a local path for `uri`: local paths as they are (checked to exist), remote ones
    fetched once into the cache (with fsspec `storage_options`, the config's
    input.storage_options). Raises SlideError (reason `missing` or `remote`)."""
    sid = slide_id if slide_id is not None else uri
    protocol = uri_protocol(uri)
    if protocol in LOCAL_PROTOCOLS:
        path = local_path(uri)
        if not os.path.exists(path):
            raise SlideError(sid, f"file not found: {path} (check the uri in the manifest)", reason="missing")
        return path

    safe_uri = redact(uri)
    cfg = cache_cfg or CacheConfig()
    try:
        fs, rpath = filesystem(uri, storage_options)
    except TypeError as e:   # an option the backend does not take: name it, never its value
        raise SlideError(sid, f"cannot open {safe_uri}: input.storage_options not accepted by the "
                         f"{protocol} backend ({redact(str(e).splitlines()[0], secret_values(storage_options))})",
                         reason="remote") from None
    except ImportError as e:  # fsspec knows the protocol; its backend package is missing
        raise SlideError(sid, f"cannot open {safe_uri}: {str(e).splitlines()[0]}", reason="remote") from None
    except ValueError:
        raise SlideError(sid, f"cannot open {safe_uri}: unknown protocol {protocol!r} (use a local path, "
                         "s3://, gs://, http(s):// or another fsspec protocol)", reason="remote") from None
    try:
        fs.invalidate_cache(rpath)
        info = fs.info(rpath)
    except Exception as e:  # noqa: BLE001 - any backend error becomes one clear line
        raise SlideError(sid, f"cannot fetch {safe_uri}: {redact(error_cause(e, protocol), secret_values(storage_options))}",
                         reason="remote") from None
    is_dir = info.get("type") == "directory"
    ident = _identity(info)
    key = hashlib.sha256(json.dumps([uri, ident], sort_keys=True).encode()).hexdigest()[:32]

    cache_dir = Path(os.path.expanduser(cfg.dir))
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SlideError(sid, f"cannot create the slide cache {cache_dir} for {safe_uri}: {e.strerror or e} "
                         "(set cache.dir to a writable folder)", reason="cache") from None
    entry = cache_dir / key
    with FileLock(str(cache_dir / f"{key}.lock")):
        if entry.is_dir() and not is_dir and "size" in ident:
            # Guard against a damaged entry (e.g. truncated by hand): sizes must match.
            target = _entry_target(entry)
            if not os.path.isfile(target) or os.path.getsize(target) != int(info["size"]):
                log.warning("slide cache: entry for %s has the wrong size; fetching again", safe_uri)
                shutil.rmtree(entry, ignore_errors=True)
        if not entry.is_dir():
            # We hold the entry lock, so any temporary folder for this key is a leftover of a
            # process that died mid-download: remove it, never use it.
            for stale in cache_dir.glob(f"{_TMP_PREFIX}{key}-*"):
                shutil.rmtree(stale, ignore_errors=True)
            tmp = cache_dir / f"{_TMP_PREFIX}{key}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
            tmp.mkdir()
            t0 = time.monotonic()
            try:
                if is_dir:  # e.g. a DICOM WSI series: OpenSlide needs all its files side by side
                    fs.get(rpath.rstrip("/") + "/", str(tmp) + "/", recursive=True)
                else:
                    name = os.path.basename(rpath.rstrip("/")) or "slide"
                    fs.get_file(rpath, str(tmp / name))
                    got = os.path.getsize(tmp / name)
                    if "size" in ident and got != int(info["size"]):
                        raise OSError(f"incomplete download: {got} of {info['size']} bytes")
                os.replace(tmp, entry)
            except Exception as e:  # noqa: BLE001
                shutil.rmtree(tmp, ignore_errors=True)
                if isinstance(e, OSError) and str(getattr(e, "filename", "") or "").startswith(str(cache_dir)):
                    raise SlideError(sid, f"cannot write {safe_uri} into the slide cache {cache_dir}: "
                                     f"{e.strerror or e} (free some space or set cache.dir)", reason="cache") from None
                raise SlideError(sid, f"cannot fetch {safe_uri}: {redact(error_cause(e, protocol), secret_values(storage_options))}",
                                 reason="remote") from None
            log.info("slide cache: fetched %s (%.1f MB, %.1f s)", safe_uri,
                     _dir_size(entry) / 1e6, time.monotonic() - t0)
        now = time.time_ns()   # LRU: touch on use, with the fine clock (the kernel's file clock is coarse)
        os.utime(entry, ns=(now, now))
    _evict(cache_dir, int(cfg.max_gb * 1e9), keep=entry)
    return _entry_target(entry)


def _dicom_file(folder: str, sid: str) -> str:
    """OpenSlide opens a DICOM WSI through any one file of its series (the rest must sit beside it)."""
    files = sorted(p for p in Path(folder).iterdir() if p.is_file() and p.suffix.lower() == ".dcm")
    if not files:
        raise SlideError(sid, f"{folder} is a folder without .dcm files; give a slide file, or a folder "
                         "holding one DICOM WSI series", reason="unsupported")
    return str(files[0])


def open_slide(uri: str, slide_id: str, cache_cfg: CacheConfig | None = None,
               storage_options: dict | None = None):
    """Localise `uri` and open it with OpenSlide. Raises SlideError with reason `missing`,
    `remote`, `unsupported` or `unreadable`."""
    return open_slide_file(uri, slide_id, cache_cfg, storage_options)[0]


def open_slide_file(uri: str, slide_id: str, cache_cfg: CacheConfig | None = None,
                    storage_options: dict | None = None):
    """open_slide, and the local file OpenSlide opened (for tiff_levels' direct tile reads)."""
    import openslide   # here, not at the top: manifest and evaluation code import this module
    path = localise(uri, cache_cfg, slide_id, storage_options)
    if os.path.isdir(path):
        path = _dicom_file(path, slide_id)
    data = os.path.splitext(path)[0]
    if path.lower().endswith(".mrxs") and uri_protocol(uri) in LOCAL_PROTOCOLS and not os.path.isdir(data):
        raise SlideError(slide_id, f"{redact(uri)}: an MRXS slide needs its data folder {os.path.basename(data)}/ "
                         "(Slidedat.ini, Data*.dat) beside the .mrxs file, and it is missing; copy the folder "
                         "with the slide", reason="missing")
    try:
        return openslide.OpenSlide(path), path
    except openslide.OpenSlideUnsupportedFormatError:
        raise SlideError(slide_id, f"{redact(uri)} is not a slide OpenSlide can read ({_SUPPORTED})",
                         reason="unsupported") from None
    except openslide.OpenSlideError as e:
        raise SlideError(slide_id, f"{redact(uri)} cannot be opened: {e}", reason="unreadable") from None
    except OSError as e:
        raise SlideError(slide_id, f"{redact(uri)} cannot be opened: {e.strerror or e}",
                         reason="unreadable") from None


@contextlib.contextmanager
def slide_read_errors(slide_id: str):
    """Turn decoding failures while reading regions into SlideError(reason="unreadable").
    A slide can open fine and only fail when a damaged tile is decoded."""
    import openslide
    try:
        yield
    except openslide.OpenSlideError as e:
        raise SlideError(slide_id, f"tile data is corrupt: {e} (re-export or re-scan the slide)",
                         reason="unreadable") from None
    except (UnidentifiedImageError, OSError) as e:
        raise SlideError(slide_id, f"tile data is corrupt: {type(e).__name__}: {e} "
                         "(re-export or re-scan the slide)", reason="unreadable") from None


_FP_CHUNK = 256 << 10   # bytes hashed at each end of a file: headers, tile offsets, first and last tiles


def _file_fingerprint(path: Path, h) -> None:
    size = path.stat().st_size
    h.update(str(size).encode() + b"\0")
    with open(path, "rb") as f:
        h.update(f.read(_FP_CHUNK))
        if size > 2 * _FP_CHUNK:
            f.seek(size - _FP_CHUNK)
            h.update(f.read(_FP_CHUNK))
        elif size > _FP_CHUNK:
            h.update(f.read())


def fingerprint(path: str) -> str:
    """Cheap content fingerprint of a local slide: size and sha256 of its first and last 256 KiB (a
    multi-GB slide is not hashed whole; planning reads ~1 ms of it). A folder (DICOM series)
    combines its files'."""
    p = Path(path)
    h = hashlib.sha256()
    if p.is_dir():
        for f in sorted(x for x in p.rglob("*") if x.is_file()):
            h.update(str(f.relative_to(p)).encode() + b"\0")
            _file_fingerprint(f, h)
    else:
        _file_fingerprint(p, h)
    return h.hexdigest()[:32]
