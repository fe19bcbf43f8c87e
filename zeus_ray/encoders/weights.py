"""Where model weights come from: a local directory or file, a bucket URI, or the Hugging Face hub.

A model asks for files by role (e.g. "weights" → model.safetensors or pytorch_model.bin, "config"
→ config.json), each with candidate names in order of preference. `resolve_weights` returns local
paths for them, or raises one WeightsError line that says where it looked and how to provide the
files. Nothing here executes downloaded code: these are data files only.
"""
from __future__ import annotations

import hashlib
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import WeightsError

Candidates = Mapping[str, Sequence[str]]   # role → acceptable file names, preferred first

_BUCKET_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_HASH_MEMO: dict[tuple[str, int, int], str] = {}


@dataclass(frozen=True)
class ResolvedWeights:
    files: dict[str, Path]   # role → local path (absent optional roles are left out)
    source: str              # what was used, for logs and error messages

    def __getitem__(self, role: str) -> Path:
        return self.files[role]

    def get(self, role: str) -> Path | None:
        return self.files.get(role)


def weights_cache_dir() -> Path:
    """Local cache for weights fetched from buckets (ZEUS_WEIGHTS_CACHE, else ~/.cache/zeus_ray/weights)."""
    return Path(os.environ.get("ZEUS_WEIGHTS_CACHE") or Path.home() / ".cache" / "zeus_ray" / "weights")


def _offline() -> bool:
    # Read at call time (huggingface_hub reads its constant once, at import).
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def resolve_weights(model_id: str, weights: str | None, hub_repo: str | None,
                    required: Candidates, optional: Candidates | None = None,
                    how_to: str = "") -> ResolvedWeights:
    """Local paths for the `required` (and any present `optional`) roles.

    `weights` is the user's model.weights: a local directory, a local file (it fills the "weights"
    role; the other roles are looked for beside it) or a bucket URI (file or prefix, fetched once
    into `weights_cache_dir()`). Without it the files come from `hub_repo` via huggingface_hub
    (token from HF_TOKEN or `hf auth login`; HF_HUB_OFFLINE=1 uses the local cache only).
    """
    optional = optional or {}
    if weights:
        if _BUCKET_RE.match(weights) and not weights.startswith("file://"):
            return _from_bucket(model_id, weights, required, optional, how_to)
        return _from_local(model_id, Path(weights.removeprefix("file://")).expanduser(), required, optional, how_to)
    if not hub_repo:
        raise WeightsError(f"model {model_id!r}: no weights source; give --set model.weights=/path/to/dir-or-file"
                           + (f" ({how_to})" if how_to else ""))
    return _from_hub(model_id, hub_repo, required, optional, how_to)


def _pick(names: Sequence[str], exists) -> str | None:
    return next((n for n in names if exists(n)), None)


def _missing_error(model_id: str, where: str, roles: Candidates, missing: list[str], how_to: str) -> WeightsError:
    wanted = "; ".join(f"{r}: {' or '.join(roles[r])}" for r in missing)
    return WeightsError(f"model {model_id!r}: model files not found: looked for {wanted} in {where}"
                        + (f"; {how_to}" if how_to else ""))


def _from_local(model_id: str, path: Path, required: Candidates, optional: Candidates, how_to: str) -> ResolvedWeights:
    if not path.exists():
        raise WeightsError(f"model {model_id!r}: model.weights={str(path)!r} does not exist; "
                           f"give an existing directory or weights file")
    files: dict[str, Path] = {}
    folder = path if path.is_dir() else path.parent
    if path.is_file():
        files["weights"] = path
    for role, names in {**required, **optional}.items():
        if role in files:
            continue
        name = _pick(names, lambda n: (folder / n).is_file())
        if name:
            files[role] = folder / name
    missing = [r for r in required if r not in files]
    if missing:
        raise _missing_error(model_id, str(folder), required, missing, how_to)
    return ResolvedWeights(files, str(path))


def _from_bucket(model_id: str, uri: str, required: Candidates, optional: Candidates, how_to: str) -> ResolvedWeights:
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
        is_file = fs.isfile(root)
        if not is_file and not fs.isdir(root):
            raise WeightsError(f"model {model_id!r}: model.weights={uri!r} does not exist in the bucket; "
                               f"give the URI of the weights file or of the folder that holds it")
    except WeightsError:
        raise
    except Exception as e:  # credentials, endpoint, unknown protocol
        raise WeightsError(f"model {model_id!r}: cannot reach model.weights={uri!r} "
                           f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                           f"check the URI and the bucket credentials") from None
    folder = root.rsplit("/", 1)[0] if is_file else root.rstrip("/")
    remote: dict[str, str] = {}
    if is_file:
        remote["weights"] = root
    for role, names in {**required, **optional}.items():
        if role not in remote:
            name = _pick(names, lambda n: fs.isfile(f"{folder}/{n}"))
            if name:
                remote[role] = f"{folder}/{name}"
    missing = [r for r in required if r not in remote]
    if missing:
        raise _missing_error(model_id, uri if not is_file else uri.rsplit("/", 1)[0], required, missing, how_to)
    cache = weights_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    files = {role: _fetch(fs, rpath, cache) for role, rpath in remote.items()}
    return ResolvedWeights(files, uri)


def _fetch(fs, rpath: str, cache: Path) -> Path:
    """Copy one bucket object into the cache once; a cached file of the same size is reused.
    Written under a temporary name then renamed, so concurrent workers never see half a file."""
    local = cache / rpath.rsplit("/", 1)[-1]
    size = fs.size(rpath)
    if local.is_file() and local.stat().st_size == size:
        return local
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        fs.get_file(rpath, str(tmp))
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return local


def _from_hub(model_id: str, repo: str, required: Candidates, optional: Candidates, how_to: str) -> ResolvedWeights:
    from huggingface_hub import constants, hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    offline = _offline()
    unreachable = False
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    files: dict[str, Path] = {}
    missing: list[str] = []
    for role, names in {**required, **optional}.items():
        for name in names:
            try:
                files[role] = Path(hf_hub_download(repo, name, cache_dir=cache_dir, local_files_only=offline))
                break
            except GatedRepoError:
                raise WeightsError(f"model {model_id!r}: hub repo {repo} is gated: accept its terms at "
                                   f"https://huggingface.co/{repo} and log in (`hf auth login` or HF_TOKEN), "
                                   f"or give --set model.weights=/path") from None
            except RepositoryNotFoundError:
                raise WeightsError(f"model {model_id!r}: hub repo {repo} not found or not accessible with "
                                   f"your token; check the id, log in (`hf auth login` or HF_TOKEN), "
                                   f"or give --set model.weights=/path") from None
            except LocalEntryNotFoundError:   # not in the cache, and offline or the hub is unreachable
                if not offline:   # no network: don't wait for retries on every other file
                    offline = unreachable = True
                continue
            except EntryNotFoundError:        # the hub says the repo has no such file
                continue
            except (HfHubHTTPError, OSError) as e:
                raise WeightsError(f"model {model_id!r}: downloading {name} from hub repo {repo} failed "
                                   f"({type(e).__name__}); retry, set HF_HUB_OFFLINE=1 to use the cache, "
                                   f"or give --set model.weights=/path") from None
        else:
            if role in required:
                missing.append(role)
    if missing:
        where = (f"the Hugging Face cache ({cache_dir or constants.HF_HUB_CACHE}) for hub repo {repo}"
                 + (" (the hub was unreachable)" if unreachable else " with HF_HUB_OFFLINE=1" if offline
                    else " and on the hub"))
        raise _missing_error(model_id, where, required, missing, how_to)
    return ResolvedWeights(files, f"hf://{repo}")


def file_sha256(path: Path) -> str:
    """Full sha256 of a file. Hub cache blobs of LFS files are named by their sha256 already, so
    those are not re-read; other results are memoised per (path, size, mtime)."""
    real = Path(os.path.realpath(path))
    if real.parent.name == "blobs" and re.fullmatch(r"[0-9a-f]{64}", real.name):
        return real.name
    st = real.stat()
    key = (str(real), st.st_size, st.st_mtime_ns)
    if key not in _HASH_MEMO:
        h = hashlib.sha256()
        with open(real, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 23), b""):
                h.update(chunk)
        _HASH_MEMO[key] = h.hexdigest()
    return _HASH_MEMO[key]


def weights_fingerprint(paths: Sequence[Path], length: int = 12) -> str:
    """Short sha256 over the content of the weights file(s), for model_key."""
    if len(paths) == 1:
        return file_sha256(paths[0])[:length]
    h = hashlib.sha256()
    for p in paths:
        h.update(file_sha256(p).encode())
    return h.hexdigest()[:length]
