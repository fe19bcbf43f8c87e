"""Output layout, keys and atomic per-slide commits.

Layout under the output root (local path or bucket URI):
  <root>/slides/<slide_id>/tiles/<tiling_key>/...            tiles.parquet, tissue mask, thumbnail
  <root>/slides/<slide_id>/embeddings/<tiling_key>/<model_key>/...
  <root>/slides/<slide_id>/results/<prompt_key>/...         similarities, maps, mask, metrics
Slide ids become folder names, so they are validated: no separators, no '..', no control chars.
"""
from __future__ import annotations

import hashlib
import json
import re

from .errors import ZeusError

_SAFE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+\-=@ ]{0,199}$")


def check_slide_id(slide_id: str) -> str:
    """Return the id if it is safe as one path component, else raise (it could escape the root)."""
    if not isinstance(slide_id, str) or not _SAFE_ID.match(slide_id) or ".." in slide_id:
        raise ZeusError(
            f"slide id {slide_id!r} is not a safe folder name: use letters, digits and . _ - + = @ "
            "(no '/', '\\', '..' or leading dot), at most 200 characters")
    return slide_id


def stable_hash(obj, n: int = 16) -> str:
    """Short hex digest of a JSON-serialisable object (sorted keys), for tiling/prompt keys."""
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:n]
