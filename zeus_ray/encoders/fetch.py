"""`zeus models fetch`: copy what a model needs (weights, configs, tokenizer files) from the hub,
the hub cache, or a folder/bucket into a folder or bucket that every node can read, with a
manifest (`zeus_weights.json`: file names, sizes, sha256, source, date).

`model.weights` pointing at that folder is then enough on machines without internet, and the
manifest is checked on every load (weights.resolve_weights). Only data files are copied; nothing
downloaded is executed.
"""
from __future__ import annotations

import datetime
import json
import os
import re
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import ConfigError, WeightsError
from .weights import (BUCKET_RE, MANIFEST_FORMAT, MANIFEST_NAME, Candidates, file_sha256, parse_manifest,
                      resolve_weights)

# The name the official CONCH package gives its BPE file (registry messages use it too).


@dataclass(frozen=True)
class ModelFiles:
    """What a model id loads: the hub repo (None: model.weights only), files by role, and how a
    user provides them."""
    model_id: str
    hub_repo: str | None
    required: Candidates
    optional: Candidates
    gated: bool
    how_to: str


def model_files(model_id: str) -> ModelFiles:
    """The file roles of a registered id or a generic family, as their loaders ask for them."""
    from .clip_models import HF_CLIP_FILES, HF_CLIP_OPTIONAL, OPEN_CLIP_WEIGHTS
    from .registry import CONCH_TOKENIZER_NAMES, HOW_TO_LOCAL, KEEP_TOKENIZER_FILES, MODELS, how_to_fetch

    mid = model_id.strip()
    open_clip_optional = {"config": ("open_clip_config.json",),
                          **{k: v for k, v in HF_CLIP_OPTIONAL.items() if k != "preprocessor"}}
    if mid in MODELS:
        spec = MODELS[mid].spec
        required, optional = {"weights": ("model.safetensors", "pytorch_model.bin")}, {}
        if mid == "conch":
            required, optional = spec.extra["files"], {"tokenizer": CONCH_TOKENIZER_NAMES}
        elif mid == "keep":
            required, optional = spec.extra["files"], KEEP_TOKENIZER_FILES
        elif mid == "plip":
            required, optional = HF_CLIP_FILES, HF_CLIP_OPTIONAL
        elif mid == "quiltnet":
            required, optional = {"weights": OPEN_CLIP_WEIGHTS, "config": ("open_clip_config.json",)}, open_clip_optional
        return ModelFiles(mid, spec.weights_source, required, optional, spec.gated, how_to_fetch(spec))
    if mid.startswith("hf-clip:") and len(mid) > len("hf-clip:"):
        return ModelFiles(mid, mid.removeprefix("hf-clip:"), HF_CLIP_FILES, HF_CLIP_OPTIONAL, False, HOW_TO_LOCAL)
    if mid.startswith("open_clip:hf-hub:") and len(mid) > len("open_clip:hf-hub:"):
        return ModelFiles(mid, mid.removeprefix("open_clip:hf-hub:"),
                          {"weights": OPEN_CLIP_WEIGHTS, "config": ("open_clip_config.json",)},
                          open_clip_optional, False, HOW_TO_LOCAL)
    if mid.startswith("open_clip:") and len(mid) > len("open_clip:"):
        return ModelFiles(mid, None, {"weights": OPEN_CLIP_WEIGHTS}, open_clip_optional, False, HOW_TO_LOCAL)
    if mid.startswith("random:"):
        raise ConfigError(f"model {mid!r} has built-in random weights: there is nothing to fetch")
    raise ConfigError(f"model id {mid!r} is not registered; use one of {', '.join(MODELS)}, open_clip:<name>, "
                      f"open_clip:hf-hub:<repo> or hf-clip:<hub id> (`zeus models` lists them)")


def conch_tokenizer_file(given: str | None) -> Path | None:
    """CONCH's BPE file: `given` (file, or a folder holding one *bpe*.json), else the installed
    official package; None when neither exists. The file's special tokens are checked."""
    from ..config import ModelConfig
    from .conch import ConchTokenizer, find_tokenizer_file
    from .registry import conch_tokenizer_path

    where = conch_tokenizer_path(ModelConfig(id="conch", tokenizer=given))
    if where is None:
        return None
    file = find_tokenizer_file(where)
    ConchTokenizer(file, expected_pad_id=None)   # one WeightsError line when it is not CONCH's
    return file


def _tokenizer_files(mf: ModelFiles, given: str | None, have: dict[str, Path]) -> dict[str, Path]:
    """Tokenizer files to add: CONCH's BPE file (given or found), or for other models the
    tokenizer files of a given folder/file."""
    if mf.model_id == "conch":
        if "tokenizer" in have and not given:
            return {}
        file = conch_tokenizer_file(given)
        return {"tokenizer": file} if file else {}
    if not given:
        return {}
    path = Path(given).expanduser()
    if path.is_file():
        role = next((r for r, names in mf.optional.items() if path.name in names), "tokenizer")
        return {role: path}
    if not path.is_dir():
        raise WeightsError(f"--tokenizer {given}: no such file or folder")
    picks = {role: next((path / n for n in names if (path / n).is_file()), None) for role, names in mf.optional.items()}
    found = {role: p for role, p in picks.items() if p is not None}
    if not found:
        raise WeightsError(f"--tokenizer {given}: no tokenizer files of model {mf.model_id!r} in it "
                           f"(looked for {', '.join(n for v in mf.optional.values() for n in v)})")
    return found


def _revision(path: Path) -> str | None:
    """The commit of a hub-cache file (…/snapshots/<commit>/name), for the manifest."""
    parts = path.parts
    return parts[-2] if len(parts) >= 3 and parts[-3] == "snapshots" else None


class _Dest:
    """A local folder or a bucket prefix; files land whole (temporary name + rename, or one PUT)."""

    def __init__(self, uri: str):
        import fsspec
        self.uri = uri.rstrip("/")
        self.remote = bool(BUCKET_RE.match(uri)) and not uri.startswith("file://")
        if self.remote:
            self.fs, self.root = fsspec.core.url_to_fs(self.uri)
        else:
            self.root = str(Path(self.uri.removeprefix("file://")).expanduser())
            try:
                Path(self.root).mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise WeightsError(f"--to {uri}: cannot create the folder ({e.strerror or e})") from None

    def _path(self, name: str) -> str:
        return f"{self.root}/{name}"

    def read(self, name: str) -> bytes | None:
        if self.remote:
            return self.fs.cat_file(self._path(name)) if self.fs.isfile(self._path(name)) else None
        p = Path(self._path(name))
        return p.read_bytes() if p.is_file() else None

    def put(self, local: Path, name: str) -> None:
        if self.remote:
            self.fs.put_file(str(local), self._path(name))
            return
        tmp = Path(self.root) / f".{name}.{uuid.uuid4().hex[:8]}.part"
        try:
            shutil.copyfile(local, tmp)
            os.replace(tmp, self._path(name))
        finally:
            tmp.unlink(missing_ok=True)

    def put_bytes(self, data: bytes, name: str) -> None:
        if self.remote:
            self.fs.pipe_file(self._path(name), data)
            return
        tmp = Path(self.root) / f".{name}.{uuid.uuid4().hex[:8]}.part"
        tmp.write_bytes(data)
        os.replace(tmp, self._path(name))

    def has_same(self, name: str, size: int, sha256: str, previous: dict | None) -> bool:
        """The file is already there with this content (local: hashed; bucket: per the previous
        manifest and the object size)."""
        if self.remote:
            entry = (previous or {}).get("files", {}).get(name)
            return bool(entry and entry["sha256"] == sha256 and self.fs.isfile(self._path(name))
                        and self.fs.size(self._path(name)) == size)
        p = Path(self._path(name))
        return p.is_file() and p.stat().st_size == size and file_sha256(p) == sha256


def _redact(uri: str) -> str:
    return re.sub(r"(://)[^/@\s]+@", r"\1***@", uri)


def fetch_model(model_id: str, dest: str, *, source: str | None = None, tokenizer: str | None = None,
                echo: Callable[[str], None] = print) -> dict:
    """Copy the files of `model_id` from `source` (folder, file or bucket; default: the hub or its
    cache, HF_HUB_OFFLINE honoured) into `dest` (folder or bucket) and write the manifest last.
    Returns the manifest. A re-run copies only what changed."""
    mf = model_files(model_id)
    if source is None and mf.hub_repo is None:
        raise ConfigError(f"model {mf.model_id!r} has no hub repo: give the files with --weights SRC")
    resolved = resolve_weights(mf.model_id, source, mf.hub_repo, mf.required, mf.optional, mf.how_to)
    files = dict(resolved.files)
    files.update(_tokenizer_files(mf, tokenizer, files))

    out = _Dest(dest)
    old = out.read(MANIFEST_NAME)
    previous = parse_manifest(old, f"{out.uri}/{MANIFEST_NAME}") if old is not None else None
    if previous and previous.get("model_id") not in (None, mf.model_id):
        raise WeightsError(f"--to {out.uri} already holds model {previous['model_id']!r} ({MANIFEST_NAME}); "
                           f"fetch each model into its own folder")
    entries: dict[str, dict] = {}
    for role, path in files.items():
        if path.name in entries or path.name == MANIFEST_NAME:
            raise WeightsError(f"model {mf.model_id!r}: two files named {path.name} ({role}); rename one")
        size, sha = path.stat().st_size, file_sha256(path)
        if out.has_same(path.name, size, sha, previous):
            echo(f"  {path.name:32s} {size / 1e6:10.1f} MB  already there")
        else:
            out.put(path, path.name)
            echo(f"  {path.name:32s} {size / 1e6:10.1f} MB  copied")
        entries[path.name] = {"role": role, "size": size, "sha256": sha}
    revision = _revision(files["weights"]) if source is None else None
    manifest = {
        "format": MANIFEST_FORMAT, "model_id": mf.model_id,
        "source": _redact(source) if source else f"hf://{mf.hub_repo}" + (f"@{revision}" if revision else ""),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": entries,
    }
    out.put_bytes(json.dumps(manifest, indent=1, sort_keys=True).encode(), MANIFEST_NAME)   # last: marks it complete
    return manifest
