"""Output layout, keys and atomic per-slide commits.

Layout under the output root (local path or bucket URI; the keys are storage/keys.py's, every file
is listed in docs/outputs.md):
  <root>/slides/<slide_id>/tiles/<tiling_key>/                       tiles.parquet, tissue mask, thumbnail
  <root>/slides/<slide_id>/embeddings/<tiling_key>/<model_key>/      embedding parts (storage/parts.py)
  <root>/slides/<slide_id>/results/<tiling_key>/<prompt_key>/        similarities, maps, mask, metrics
  <root>/cohort/<prompt_key>/                                        slides/errors tables, Table 1/2, report
Slide ids become folder names, so they are validated: no separators, no '..', no control chars.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from pathlib import Path

from ..errors import ZeusError

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-=@ ]{0,199}$")


def check_slide_id(slide_id: str) -> str:
    """Return the id if it is safe as one path component, else raise (it could escape the root)."""
    if not isinstance(slide_id, str) or not _SAFE_ID.match(slide_id) or ".." in slide_id:
        raise ZeusError(
            f"slide id {slide_id!r} is not a safe folder name: use letters, digits, spaces and . _ - + = @ "
            "(no '/', '\\', '..' or leading dot or space), at most 200 characters")
    return slide_id


def stable_hash(obj, n: int = 16) -> str:
    """Short hex digest of a JSON-serialisable object (sorted keys), for tiling/prompt keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]


def safe_component(text: str, n: int = 8) -> str:
    """A key such as 'open_clip:hf-hub:org/model@ab12' as one folder name: readable + hash."""
    clean = re.sub(r"[^A-Za-z0-9._\-]+", "_", text).strip("._")[:60]
    return f"{clean}-{hashlib.sha256(text.encode()).hexdigest()[:n]}"


MARKER = "_COMPLETE.json"


class OutputStore:
    """Output root on local disk or in a bucket (any fsspec URI).

    A unit of output (a slide's tiles, embeddings, or results under one key) is a folder that
    counts as complete only once its marker file exists; the marker is written last. Every file is
    written whole: locally to a temporary name then renamed, in a bucket by a single PUT. So an
    interrupted run leaves units either complete or without a marker, and a re-run redoes only
    those."""

    def __init__(self, root, storage_options: dict | None = None):
        """`root`: a local path or URI (or another OutputStore, as passed to Ray workers);
        `storage_options`: the config's output.storage_options (flat, or per protocol)."""
        if isinstance(root, OutputStore):
            root, storage_options = root.root_uri, root.storage_options
        root = os.fspath(root)
        from .remote import filesystem
        self.root_uri = root
        self.storage_options = dict(storage_options or {})
        self.fs, self.root = filesystem(root, self.storage_options)
        self.local = "file" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))
        if self.local:
            self.root = str(Path(self.root).expanduser().resolve())

    def __reduce__(self):   # to Ray workers: the root and its options, not an open client
        return OutputStore, (self.root_uri, self.storage_options)

    def _failed(self, what: str, path: str, err: BaseException) -> ZeusError:
        """One line naming the URI and the cause, credentials scrubbed."""
        from .remote import cause, protocol, redact, secrets
        why = redact(cause(err, protocol(self.root_uri)), secrets(self.storage_options))
        return ZeusError(f"cannot {what} {self.uri(path)}: {why}")

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def uri(self, path: str) -> str:
        if self.local:
            return path
        proto = self.fs.protocol[0] if isinstance(self.fs.protocol, tuple) else self.fs.protocol
        return f"{proto}://{path}"

    def cohort_dir(self, run_key: str) -> str:
        """Where a run's cohort tables, run.json and report live."""
        return self.path("cohort", run_key)

    def slide_dir(self, slide_id: str, *parts: str) -> str:
        return self.path("slides", check_slide_id(slide_id), *parts)

    def write_bytes(self, path: str, data: bytes) -> None:
        try:
            if self.local:
                Path(path).parent.mkdir(parents=True, exist_ok=True)
                tmp = f"{path}.tmp-{uuid.uuid4().hex[:8]}"
                with open(tmp, "wb") as f:
                    f.write(data)
                os.replace(tmp, path)
            else:
                self.fs.pipe_file(path, data)
        except Exception as e:  # noqa: BLE001 - any backend error: one line naming the URI
            raise self._failed("write", path, e) from None

    def read_bytes(self, path: str) -> bytes:
        """Raises FileNotFoundError for a missing file, ZeusError (one line) for any other failure."""
        try:
            return self.fs.cat_file(path)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._failed("read", path, e) from None

    def write_json(self, path: str, obj) -> None:
        self.write_bytes(path, json.dumps(obj, indent=1, sort_keys=True, default=str).encode())

    def read_json(self, path: str):
        return json.loads(self.read_bytes(path))

    def write_parquet(self, path: str, table) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        self.write_bytes(path, sink.getvalue().to_pybytes())

    def read_parquet(self, path: str, columns: list[str] | None = None):
        import pyarrow.parquet as pq
        if self.local:   # memory-mapped: no copy through a Python file object
            return pq.read_table(path, columns=columns, memory_map=True)
        try:
            with self.fs.open(path, "rb") as f:
                return pq.read_table(f, columns=columns)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._failed("read", path, e) from None

    def exists(self, path: str) -> bool:
        try:
            return self.fs.exists(path)
        except Exception as e:  # noqa: BLE001
            raise self._failed("reach", path, e) from None

    def _call(self, what: str, path: str, fn, *args, **kw):
        try:
            return fn(*args, **kw)
        except FileNotFoundError:
            raise
        except Exception as e:  # noqa: BLE001
            raise self._failed(what, path, e) from None

    def glob(self, pattern: str) -> list[str]:
        return self._call("list", pattern, self.fs.glob, pattern)

    def ls(self, path: str) -> list[str]:
        return self._call("list", path, self.fs.ls, path, detail=False)

    def info(self, path: str) -> dict:
        return self._call("read", path, self.fs.info, path)

    def rm(self, path: str, recursive: bool = False) -> None:
        return self._call("remove", path, self.fs.rm, path, recursive=recursive)

    def check_reachable(self) -> None:
        """Fail fast, with one line, when the output root's endpoint or credentials do not work
        (s3fs answers an unreachable endpoint with an exception, a missing bucket with False)."""
        self.exists(self.root)

    def upload_dir(self, local_dir: str | Path, dest: str) -> list[str]:
        """Copy every file of a local folder into `dest` (each file written whole)."""
        written = []
        for f in sorted(Path(local_dir).rglob("*")):
            if f.is_file():
                target = f"{dest}/{f.relative_to(local_dir).as_posix()}"
                self.write_bytes(target, f.read_bytes())
                written.append(target)
        return written

    def complete(self, unit_dir: str) -> dict | None:
        """The marker of a complete unit, or None."""
        try:
            return self.read_json(f"{unit_dir}/{MARKER}")
        except (FileNotFoundError, ValueError):   # absent, or cut short: not complete
            return None

    def commit(self, unit_dir: str, info: dict) -> None:
        self.write_json(f"{unit_dir}/{MARKER}", info)
