"""Safe, strict loading of model weights.

Weights are read only from safetensors or `torch.load(weights_only=True)` (never arbitrary
pickles), and a state dict must match the architecture exactly: every expected key present, no
unexpected key silently dropped, every shape equal. Keys that a release deliberately omits or
adds are passed by the caller by name (prefixes), so each exception is visible in code.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import torch
from torch import nn

from ..errors import WeightsError

_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_MAX_LISTED = 10


def _sniff(path: Path) -> str | None:
    """'safetensors', 'torch' or None from the first bytes (for files with an unusual suffix)."""
    with open(path, "rb") as f:
        head = f.read(16)
    if head[:4] == b"PK\x03\x04" or head[:1] == b"\x80":  # torch zip archive / legacy pickle
        return "torch"
    if len(head) >= 9 and head[8:9] == b"{":  # u64 header length, then a JSON header
        return "safetensors"
    return None


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a checkpoint (.safetensors, or .bin/.pt/.pth/.ckpt saved by torch.save) onto the CPU.

    A `{"state_dict": {...}}` wrapper is unwrapped and a leading `module.` (DataParallel) is
    stripped, as the official CONCH loader does. Anything else raises WeightsError naming the file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {path} does not exist; check model.weights")
    kind = ("safetensors" if path.suffix == ".safetensors" else
            "torch" if path.suffix in _TORCH_SUFFIXES else _sniff(path))
    if kind is None:
        raise WeightsError(f"weights file {path} is neither safetensors nor a torch checkpoint "
                           f"(.safetensors, .bin, .pt, .pth); point model.weights to the model file")
    try:
        if kind == "safetensors":
            from safetensors.torch import load_file
            obj = load_file(str(path), device="cpu")
        else:
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # corrupt/truncated files or pickles with non-tensor objects
        msg = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise WeightsError(f"weights file {path} could not be read as {kind} ({msg[:200]}); "
                           f"re-download it or check that it is the official release") from None
    if isinstance(obj, Mapping) and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    if not isinstance(obj, Mapping):
        raise WeightsError(f"weights file {path} holds a {type(obj).__name__}, not a state dict "
                           f"(name → tensor); point model.weights to the model's weights file")
    bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if bad:
        raise WeightsError(f"weights file {path}: entries that are not tensors: "
                           f"{', '.join(map(str, bad[:_MAX_LISTED]))}; it is not a plain state dict")
    if obj and all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return dict(obj)


class LoadReport(NamedTuple):
    absent_allowed: list[str]      # expected keys that were absent but allowed (left as initialised)
    ignored_unexpected: list[str]  # checkpoint keys deliberately ignored
    renamed: dict[str, str]        # checkpoint name → model name, for keys that were renamed


def _listing(names: Iterable[str]) -> str:
    names = list(names)
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", … ({len(names) - _MAX_LISTED} more)" if len(names) > _MAX_LISTED else "")


def regex_renamer(*rules: tuple[str, str]) -> Callable[[str], str]:
    """A rename function applying `re.sub(pattern, replacement, name)` for each rule in turn."""
    compiled = [(re.compile(p), r) for p, r in rules]

    def rename(name: str) -> str:
        for pattern, repl in compiled:
            name = pattern.sub(repl, name)
        return name
    return rename


def strict_load(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, model_name: str,
                allowed_missing_prefixes: Iterable[str] = (),
                ignored_unexpected_prefixes: Iterable[str] = (),
                renames: Mapping[str, str] | Callable[[str], str] | None = None,
                source: str | None = None, assign: bool = False) -> LoadReport:
    """Load `state_dict` into `module`, or raise WeightsError listing (up to 10 of) the missing
    keys, unexpected keys and shape mismatches by name.

    `allowed_missing_prefixes`: model keys a release may leave out (they keep their initial value).
    `ignored_unexpected_prefixes`: checkpoint keys a release may carry that the model does not use.
    `renames`: checkpoint name → model name (a mapping of exact names, or a function), applied first.
    `source` (the file) is named in the error. `assign=True` replaces the module's tensors (for
    models built on the meta device). Returns what was tolerated, for logging.
    """
    allowed_missing = tuple(allowed_missing_prefixes)
    ignored = tuple(ignored_unexpected_prefixes)
    rename = (renames.get if isinstance(renames, Mapping) else renames) if renames is not None else None

    sd: dict[str, torch.Tensor] = {}
    renamed: dict[str, str] = {}
    for key, tensor in state_dict.items():
        new = (rename(key) or key) if rename is not None else key
        if new != key:
            renamed[key] = new
        if new in sd:
            raise WeightsError(f"{model_name}: checkpoint{' ' + source if source else ''} has two "
                               f"entries for {new!r} after renaming; it is not a valid release")
        sd[new] = tensor

    expected = module.state_dict(keep_vars=True)
    missing = [k for k in expected if k not in sd]
    absent_allowed = [k for k in missing if k.startswith(allowed_missing)]
    missing = [k for k in missing if not k.startswith(allowed_missing)]
    extra = [k for k in sd if k not in expected]
    ignored_keys = [k for k in extra if k.startswith(ignored)]
    unexpected = [k for k in extra if not k.startswith(ignored)]
    mismatched = [f"{k} (checkpoint {list(sd[k].shape)}, model {list(expected[k].shape)})"
                  for k in expected if k in sd and tuple(sd[k].shape) != tuple(expected[k].shape)]

    if missing or unexpected or mismatched:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing key(s): {_listing(missing)}")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected key(s): {_listing(unexpected)}")
        if mismatched:
            parts.append(f"{len(mismatched)} shape mismatch(es): {_listing(mismatched)}")
        where = f" {source}" if source else ""
        raise WeightsError(f"{model_name}: checkpoint{where} does not match the architecture: "
                           + "; ".join(parts) + f"; use the official {model_name} weights file")

    module.load_state_dict({k: v for k, v in sd.items() if k in expected}, strict=False, assign=assign)
    return LoadReport(absent_allowed, ignored_keys, renamed)


def build_loaded(build: Callable[[], nn.Module], load: Callable[..., LoadReport],
                 state_dict: Mapping[str, torch.Tensor], *, source: str | None = None,
                 buffers: Callable[[nn.Module], None] | None = None) -> nn.Module:
    """`build()` with the weights of `state_dict` (strictly, through `load`), never filled with
    random values first: random initialisation is most of a model's build time and every value is
    then overwritten (benchmarks/bench_model_build.py: KEEP 4.3 → 0.2 s, CONCH 2.0 → 0.3 s).

    The module is built on the meta device and takes the checkpoint's tensors, converted to the
    module's own dtypes (a float16 file still gives float32 weights, as copying into an initialised
    model does). Parameters a release may omit (`load`'s allowed-missing keys, unused by encoding)
    become zeros. `buffers(model)` recomputes the non-persistent buffers, which no checkpoint
    carries. If any tensor is still on the meta device after that, the model is built and loaded
    the ordinary way (random init, then copy)."""
    with torch.device("meta"):
        model = build()
    dtypes = {k: v.dtype for k, v in model.state_dict(keep_vars=True).items()}
    report = load(model, state_dict, source=source, assign=True)
    omitted = set(report.absent_allowed)
    for prefix, mod in model.named_modules():
        for tensors in (mod._parameters, mod._buffers):
            for name, t in tensors.items():
                key = f"{prefix}.{name}" if prefix else name
                if t is None or key not in dtypes:   # non-persistent buffers: `buffers` below
                    continue
                if t.is_meta:
                    if key not in omitted:
                        continue
                    new = torch.zeros(t.shape, dtype=dtypes[key])
                elif t.dtype != dtypes[key]:
                    new = t.detach().to(dtypes[key])
                else:
                    continue
                tensors[name] = nn.Parameter(new, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else new
    if buffers is not None:
        buffers(model)
    if any(t.is_meta for t in [*model.parameters(), *model.buffers()]):
        model = build()
        load(model, state_dict, source=source)
    return model
