"""`zeus doctor`, the model checks: weights located (folder, bucket or hub cache; never loaded),
the hub token of a gated repo (never printed), the tokenizer."""
from __future__ import annotations

import os
from pathlib import Path

from ..encoders.weights import hub_offline
from .lines import FAIL, OK, WARN, Context, Line, first_line


def hub_token() -> str | None:
    """Where a Hugging Face token comes from, or None; the token itself is never returned. The
    environment is read at call time (huggingface_hub reads HF_HOME once, at import)."""
    if (os.environ.get("HF_TOKEN") or os.environ.get("HUGGING_FACE_HUB_TOKEN") or "").strip():
        return "HF_TOKEN"
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    path = Path(os.environ.get("HF_TOKEN_PATH") or os.path.join(home, "token")).expanduser()
    try:
        return f"the token file {path} (`hf auth login`)" if path.read_text().strip() else None
    except OSError:
        return None


def _login_hint(mf) -> str:
    return (f"accept the terms at https://huggingface.co/{mf.hub_repo} and run `hf auth login` (or set HF_TOKEN) "
            f"on every node, or copy the weights once with `zeus models fetch {mf.model_id} --to DIR_OR_BUCKET` "
            f"and set model.weights")


def _probe_hub(mf) -> Line:
    """The model is not cached here and may be downloaded: ask the hub about its weights file."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    fetch = f"`zeus models fetch {mf.model_id} --to DIR_OR_BUCKET` where there is internet, then set model.weights"
    name = mf.required["weights"][0]
    try:
        meta = get_hf_file_metadata(hf_hub_url(mf.hub_repo, name), timeout=5)
    except GatedRepoError:
        return FAIL, f"weights: hub repo {mf.hub_repo} refuses this token (gated): {_login_hint(mf)}"
    except RepositoryNotFoundError:
        return FAIL, f"weights: hub repo {mf.hub_repo} not found or not accessible with your token; {_login_hint(mf)}"
    except Exception as e:  # noqa: BLE001 - no network, proxy, entry not found
        return FAIL, (f"weights: hub repo {mf.hub_repo} is not in this machine's hub cache and the hub cannot be "
                      f"reached ({first_line(e)[:160]}); use {fetch}")
    size = f"{meta.size / 1e9:.2f} GB " if meta.size else ""
    return WARN, (f"weights: hub repo {mf.hub_repo} is not cached here; {name} ({size}reachable from this "
                  f"machine) is downloaded on every node at start, which fails on nodes without internet; "
                  f"or use {fetch}")


def check_weights(ctx: Context) -> list[Line]:
    from ..encoders.fetch import model_files
    from ..encoders.weights import hub_cache_dir, hub_cached_files, locate_weights

    m = ctx.cfg.model
    if m.id.startswith("random:"):
        if m.weights:
            return [(FAIL, f"weights: model.id={m.id} has built-in random weights; unset model.weights")]
        return [(OK, f"weights: {m.id} has built-in random weights (its masks carry no meaning)")]
    mf = model_files(m.id)
    lines: list[Line] = []
    if m.weights:
        desc, ctx.weight_roles = locate_weights(mf.model_id, m.weights, mf.required, mf.optional, mf.how_to)
        return [(OK, f"weights: {desc}")]
    if mf.hub_repo is None:
        return [(FAIL, f"weights: model {m.id!r} has no hub repo; give --set model.weights=/path/to/dir-or-file")]
    found, missing = hub_cached_files(mf.hub_repo, mf.required, mf.optional)
    token = hub_token()
    if not missing:
        ctx.weight_roles = set(found)
        where = f"{mf.hub_repo} in this machine's hub cache ({hub_cache_dir()})"
        if ctx.cluster_address():
            lines.append((WARN, f"weights: {where}; every Ray node needs them too: share the cache, or use "
                                f"`zeus models fetch {mf.model_id} --to DIR_OR_BUCKET` and model.weights"))
        else:
            lines.append((OK, f"weights: {where}"))
    elif hub_offline():
        wanted = ", ".join(" or ".join(mf.required[r]) for r in missing)
        lines.append((FAIL, f"weights: {wanted} of hub repo {mf.hub_repo} not in the hub cache ({hub_cache_dir()}) "
                            f"and HF_HUB_OFFLINE=1; {mf.how_to}"))
    elif mf.gated and token is None:
        lines.append((FAIL, f"weights: hub repo {mf.hub_repo} is not cached here and is gated: downloading it "
                            f"needs a Hugging Face token (see the next line)"))
    else:
        lines.append(_probe_hub(mf))
    if mf.gated:   # a gated repo's files are checked against the hub even when cached, unless offline
        if hub_offline() and not missing:
            lines.append((OK, "hub token: not needed (HF_HUB_OFFLINE=1 and the weights are cached)"))
        elif token is None:
            lines.append((FAIL, f"hub token: none found (HF_TOKEN unset, no token file) for gated repo "
                                f"{mf.hub_repo}: {_login_hint(mf)}"))
        else:
            lines.append((OK, f"hub token: present, from {token}"))
    return lines


def check_tokenizer(ctx: Context) -> list[Line]:
    m = ctx.cfg.model
    if m.id.startswith("random:"):
        return [(OK, "tokenizer: built-in (hashed words)")]
    if m.id == "conch" and not m.tokenizer and "tokenizer" in (ctx.weight_roles or ()):
        return [(OK, "tokenizer: CONCH BPE file beside the weights (zeus models fetch)")]
    if m.id == "conch":
        from ..encoders.fetch import conch_tokenizer_file
        file = conch_tokenizer_file(m.tokenizer)   # WeightsError names the file that is missing or wrong
        if file is None:
            return [(FAIL, "tokenizer: CONCH's BPE file (conch_byte_level_bpe_uncased.json) ships with the "
                           "official CONCH code, not the weights: give --set model.tokenizer=/path/to/"
                           "conch_byte_level_bpe_uncased.json (or install the official CONCH package)")]
        return [(OK, f"tokenizer: CONCH BPE file {file}")]
    if m.tokenizer:
        path = Path(m.tokenizer).expanduser()
        if not path.exists():
            return [(FAIL, f"tokenizer: model.tokenizer={m.tokenizer} does not exist; point it to the tokenizer "
                           f"file or folder of {m.id}")]
        return [(OK, f"tokenizer: {path}")]
    if m.id == "quiltnet" or m.id.startswith("open_clip:"):
        return [(OK, "tokenizer: open_clip's, from its package")]
    roles = ctx.weight_roles
    if roles is None:
        return [(WARN, "tokenizer: comes with the weights, which are not available yet (see above)")]
    # KEEP: vocab.txt or tokenizer.json; CLIP BPE (plip, hf-clip): vocab.json + merges.txt or tokenizer.json
    if "tokenizer" in roles or "vocab" in roles and (m.id == "keep" or "merges" in roles):
        return [(OK, "tokenizer: files found beside the weights")]
    return [(FAIL, f"tokenizer: no vocab.txt/vocab.json or tokenizer.json beside the weights of {m.id}; copy the "
                   f"repo's tokenizer files there or give --set model.tokenizer=/path/to/dir")]
