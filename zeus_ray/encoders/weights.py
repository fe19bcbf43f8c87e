"""Where model weights come from: a local directory or file, a bucket URI, or the Hugging Face hub.

A model asks for files by role (e.g. "weights" → model.safetensors or pytorch_model.bin, "config"
→ config.json), each with candidate names in order of preference. `resolve_weights` returns local
paths for them, or raises one WeightsError line that says where it looked and how to provide the
files. Nothing here executes downloaded code: these are data files only.

A folder or bucket prefix written by `zeus models fetch` holds a manifest, `zeus_weights.json`
(file names, sizes, sha256). When it is there, every file a model uses must be listed in it and
match its sha256, so one copy on shared storage is checked on every node that loads it.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from ..errors import WeightsError

Candidates = Mapping[str, Sequence[str]]   # role → acceptable file names, preferred first

BUCKET_RE = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_HASH_MEMO: dict[tuple[str, int, int], str] = {}
MANIFEST_NAME = "zeus_weights.json"
MANIFEST_FORMAT = "zeus_weights/1"


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


def hub_cache_dir() -> str:
    """The Hugging Face hub cache, from the environment at call time (huggingface_hub reads its
    constants once, at import): HF_HUB_CACHE, else HF_HOME/hub, else the library's default."""
    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return str(Path(os.environ["HF_HOME"]).expanduser() / "hub")
    from huggingface_hub import constants
    return constants.HF_HUB_CACHE


def hub_offline() -> bool:
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
        if BUCKET_RE.match(weights) and not weights.startswith("file://"):
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


def _local_files(model_id: str, path: Path, required: Candidates, optional: Candidates,
                 how_to: str) -> tuple[dict[str, Path], Path]:
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
    return files, folder


def _from_local(model_id: str, path: Path, required: Candidates, optional: Candidates, how_to: str) -> ResolvedWeights:
    files, folder = _local_files(model_id, path, required, optional, how_to)
    if (folder / MANIFEST_NAME).is_file():
        manifest = parse_manifest((folder / MANIFEST_NAME).read_bytes(), str(folder / MANIFEST_NAME))
        for p in files.values():
            check_file(model_id, p, str(p), manifest, str(folder / MANIFEST_NAME))
    return ResolvedWeights(files, str(path))


def _bucket_files(model_id: str, uri: str, required: Candidates, optional: Candidates, how_to: str):
    """(fs, folder, role → object path) for a bucket file or prefix; nothing is downloaded."""
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(uri)
        fs.invalidate_cache(root.rstrip("/"))   # fsspec instances and listings are cached per process
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
    return fs, folder, remote


def _bucket_manifest(fs, folder: str, proto: str) -> dict | None:
    path = f"{folder}/{MANIFEST_NAME}"
    return parse_manifest(fs.cat_file(path), f"{proto}://{path}") if fs.isfile(path) else None


def _from_bucket(model_id: str, uri: str, required: Candidates, optional: Candidates, how_to: str) -> ResolvedWeights:
    fs, folder, remote = _bucket_files(model_id, uri, required, optional, how_to)
    proto = uri.split("://", 1)[0]
    manifest = _bucket_manifest(fs, folder, proto)
    cache = weights_cache_dir() / hashlib.sha256(uri.encode()).hexdigest()[:16]
    cache.mkdir(parents=True, exist_ok=True)
    files: dict[str, Path] = {}
    for role, rpath in remote.items():
        name = rpath.rsplit("/", 1)[-1]
        expected = _manifest_entry(model_id, manifest, name, f"{proto}://{rpath}", f"{proto}://{folder}/{MANIFEST_NAME}")
        files[role] = _fetch(fs, rpath, cache, expected["sha256"] if expected else None)
        if manifest is not None:
            check_file(model_id, files[role], f"{proto}://{rpath}", manifest, f"{proto}://{folder}/{MANIFEST_NAME}")
    return ResolvedWeights(files, uri)


def _fetch(fs, rpath: str, cache: Path, sha256: str | None = None) -> Path:
    """Copy one bucket object into the cache once. A cached file is reused when its size matches
    (and its sha256, when the manifest gives one; else it is fetched again). Written under a
    temporary name then renamed, so concurrent workers never see half a file."""
    local = cache / rpath.rsplit("/", 1)[-1]
    size = fs.size(rpath)
    if local.is_file() and local.stat().st_size == size and (sha256 is None or file_sha256(local) == sha256):
        return local
    tmp = local.with_name(f".{local.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        fs.get_file(rpath, str(tmp))
        os.replace(tmp, local)
    finally:
        tmp.unlink(missing_ok=True)
    return local


def _from_hub(model_id: str, repo: str, required: Candidates, optional: Candidates, how_to: str) -> ResolvedWeights:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (EntryNotFoundError, GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError)

    offline = hub_offline()
    unreachable = False
    cache_dir = hub_cache_dir()
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
        where = (f"the Hugging Face cache ({cache_dir}) for hub repo {repo}"
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


# ---------------------------------------------------------------- the zeus_weights.json manifest

def parse_manifest(data: bytes, where: str) -> dict:
    """The manifest written by `zeus models fetch`, checked for the fields verification needs."""
    try:
        manifest = json.loads(data)
        files = manifest["files"]
        ok = isinstance(files, dict) and all(
            isinstance(e, dict) and isinstance(e.get("size"), int)
            and re.fullmatch(r"[0-9a-f]{64}", str(e.get("sha256", ""))) for e in files.values())
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise WeightsError(f"{where} is not a valid weights manifest (JSON with files: name → size, sha256); "
                           f"write it again with `zeus models fetch MODEL --to FOLDER`, or delete it")
    return manifest


def _manifest_entry(model_id: str, manifest: dict | None, name: str, display: str, where: str) -> dict | None:
    if manifest is None:
        return None
    entry = manifest["files"].get(name)
    if entry is None:
        raise WeightsError(f"model {model_id!r}: {display} is not listed in {where}, so it cannot be checked; "
                           f"fetch the model again with `zeus models fetch {model_id} --to FOLDER` "
                           f"(or remove the file or the manifest)")
    return entry


def check_file(model_id: str, path: Path, display: str, manifest: dict, where: str) -> None:
    """Raise one WeightsError line unless `path` has the sha256 the manifest lists for its name."""
    entry = _manifest_entry(model_id, manifest, Path(path).name, display, where)
    found = file_sha256(path)
    if found != entry["sha256"]:
        raise WeightsError(f"model {model_id!r}: {display} does not match {where}: sha256 expected "
                           f"{entry['sha256']}, found {found} (corrupt or replaced); fetch it again with "
                           f"`zeus models fetch {model_id} --to FOLDER`")


def locate_weights(model_id: str, weights: str, required: Candidates, optional: Candidates | None = None,
                   how_to: str = "") -> tuple[str, set[str]]:
    """Check, without downloading or hashing, that model.weights (local or bucket) holds the
    required files and that their sizes match the manifest when there is one. Returns a short
    description and the roles found (optional ones included)."""
    optional = optional or {}
    if BUCKET_RE.match(weights) and not weights.startswith("file://"):
        fs, folder, remote = _bucket_files(model_id, weights, required, optional, how_to)
        proto = weights.split("://", 1)[0]
        manifest = _bucket_manifest(fs, folder, proto)
        sizes = {f"{proto}://{p}": fs.size(p) for p in remote.values()}
        roles = set(remote)
        where = f"{proto}://{folder}/{MANIFEST_NAME}"
    else:
        files, folder = _local_files(model_id, Path(weights.removeprefix("file://")).expanduser(),
                                     required, optional, how_to)
        man = folder / MANIFEST_NAME
        manifest = parse_manifest(man.read_bytes(), str(man)) if man.is_file() else None
        sizes = {str(p): p.stat().st_size for p in files.values()}
        roles = set(files)
        where = str(man)
    for display, size in sizes.items():
        entry = _manifest_entry(model_id, manifest, display.rsplit("/", 1)[-1], display, where)
        if entry is not None and entry["size"] != size:
            raise WeightsError(f"model {model_id!r}: {display} has {size} bytes, {where} lists {entry['size']} "
                               f"(incomplete or replaced); fetch it again with `zeus models fetch {model_id} --to FOLDER`")
    total = sum(sizes.values()) / 1e9
    check = (f"sizes match {MANIFEST_NAME} (sha256 checked on load)" if manifest is not None
             else f"no {MANIFEST_NAME}: not checked by hash (write one with `zeus models fetch`)")
    return f"{len(sizes)} file(s), {total:.2f} GB in {weights}; {check}", roles


def hub_cached_files(repo: str, required: Candidates, optional: Candidates | None = None
                     ) -> tuple[dict[str, Path], list[str]]:
    """Files of `repo` already in the local hub cache (no network): role → path, and the
    required roles that are not cached."""
    from huggingface_hub import try_to_load_from_cache

    cache = hub_cache_dir()
    found: dict[str, Path] = {}
    for role, names in {**required, **(optional or {})}.items():
        for name in names:
            hit = try_to_load_from_cache(repo, name, cache_dir=cache)
            if isinstance(hit, str):
                found[role] = Path(hit)
                break
    return found, [r for r in required if r not in found]
