"""Prompt ensembles as data: the YAML schema, its validation, class embeddings (the paper's Eq. 1)
and the prompt key.

A prompt file lists ordered classes, each with classnames; shared templates hold the placeholder
`CLASSNAME`, and a class may add its own templates. Every classname of a class is combined with
every template it sees (shared, then its own). The class order is the column order of the
similarity tables and the label order of the argmax; `tumour_class` says which class the binary
tumour mask is made of.
"""
from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import fsspec
import numpy as np
import yaml
from pydantic import BaseModel, ConfigDict, Field, PrivateAttr, StringConstraints, ValidationError, field_validator

from .errors import PromptError
from .storage.store import stable_hash

PLACEHOLDER = "CLASSNAME"
# Bumped when the meaning of the key payload changes, so old results are never reused wrongly.
PROMPT_KEY_VERSION = 1
# Relative prompt paths that do not exist in the working directory are looked up here, so that
# the default `prompts/ai4skin-leiomyoma.yaml` works from any directory in a source checkout.
BUILTIN_DIR = Path(__file__).resolve().parents[1] / "prompts"

Text = Annotated[str, StringConstraints(strip_whitespace=True, min_length=1, strict=True)]


def _check_templates(templates: list[str], if_empty: str) -> list[str]:
    if not templates:
        raise ValueError(f"is empty: {if_empty}")
    for t in templates:
        if PLACEHOLDER not in t:
            raise ValueError(f"template {t!r} lacks the placeholder {PLACEHOLDER} (it is replaced by each classname)")
    _check_unique(templates, "template")
    return templates


def _check_unique(items: list[str], what: str) -> None:
    seen = set()
    for x in items:
        if x in seen:
            raise ValueError(f"duplicate {what} {x!r}: list each once")
        seen.add(x)


class PromptClass(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text = Field(description="class label: similarity column, GeoJSON classification name")
    classnames: list[Text] = Field(description="phrases substituted for CLASSNAME")
    templates: list[Text] | None = Field(None, description="templates used by this class only, after the shared ones")

    @field_validator("classnames")
    @classmethod
    def _classnames(cls, v: list[str]) -> list[str]:
        if not v:
            raise ValueError("is empty: list at least one classname")
        _check_unique(v, "classname")
        return v

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str] | None) -> list[str] | None:
        # An explicit empty list is most likely a mistake; omit the key for "shared templates only".
        return None if v is None else _check_templates(
            v, f"omit the key to use only the shared templates, or list templates containing {PLACEHOLDER}")


class PromptSet(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    name: Text
    description: str = ""
    source: str | None = Field(None, description="where the ensemble comes from (paper, ours, ...)")
    notes: str | None = None
    templates: list[Text] = Field(description=f"shared by all classes; each contains {PLACEHOLDER}")
    classes: list[PromptClass] = Field(description="ordered: similarity columns and argmax labels")
    tumour_class: Text = Field(description="name of the class that forms the binary tumour mask")

    _path: str = PrivateAttr("")

    @field_validator("templates")
    @classmethod
    def _templates(cls, v: list[str]) -> list[str]:
        return _check_templates(v, f"list at least one template containing {PLACEHOLDER}")

    @field_validator("classes")
    @classmethod
    def _classes(cls, v: list[PromptClass], info) -> list[PromptClass]:
        if len(v) < 2:
            raise ValueError(f"has {len(v)} class(es): argmax segmentation needs at least 2 (e.g. tumour and normal)")
        _check_unique([c.name for c in v], "class name")
        owner: dict[str, str] = {}
        for c in v:
            for n in c.classnames:
                if n in owner:
                    raise ValueError(f"classname {n!r} appears in classes {owner[n]!r} and {c.name!r}: keep it in one")
                owner[n] = c.name
        shared = set(info.data.get("templates") or [])
        for c in v:
            for t in c.templates or []:
                if t in shared:
                    raise ValueError(f"class {c.name!r} repeats the shared template {t!r}: drop it from the class")
        return v

    @field_validator("tumour_class")
    @classmethod
    def _tumour(cls, v: str, info) -> str:
        classes = info.data.get("classes")
        if classes is not None and v not in [c.name for c in classes]:
            raise ValueError(f"{v!r} is not one of the classes {[c.name for c in classes]}")
        return v

    @property
    def path(self) -> str:
        """The file this set was loaded from ('' when built in code)."""
        return self._path

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    @property
    def tumour_index(self) -> int:
        return self.class_names.index(self.tumour_class)

    def templates_for(self, cls: PromptClass) -> list[str]:
        return list(self.templates) + list(cls.templates or [])

    def prompts(self) -> list[tuple[str, list[str]]]:
        """[(class name, prompts)] in class order; each classname × each of the class's templates."""
        return [(c.name, [t.replace(PLACEHOLDER, n) for n in c.classnames for t in self.templates_for(c)])
                for c in self.classes]

    def key_payload(self) -> dict[str, Any]:
        """What the prompt key identifies: class order and names, the resolved prompts of each
        class in order, and the tumour class. `name`, `description`, `source` and `notes` are
        documentation and do not change results, so they are left out; moving a template between
        the shared and per-class lists without changing any class's prompts keeps the key."""
        return {"v": PROMPT_KEY_VERSION,
                "classes": [{"name": n, "prompts": p} for n, p in self.prompts()],
                "tumour_class": self.tumour_class}


def _where(loc: tuple, data: Any) -> str:
    """('classes', 1, 'classnames', 3) → "classes[1] ('tumor').classnames[3]"."""
    out, node = "", data
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
            name = None
            if isinstance(node, list) and part < len(node):
                node = node[part]
                name = node.get("name") if isinstance(node, dict) else None
            if isinstance(name, str):
                out += f" ({name!r})"
        else:
            out += ("." if out else "") + str(part)
            node = node.get(part) if isinstance(node, dict) else None
    return out or "(top level)"


def _format(err: ValidationError, source: str, data: Any) -> str:
    parts = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (valid keys: see prompts/README.md)"
        elif e["type"] == "missing":
            msg = "required key is missing"
        parts.append(f"{_where(e['loc'], data)}: {msg}")
    return f"prompt file {source}: " + "; ".join(parts)


def parse_prompt_set(data: Any, source: str = "<prompts>") -> PromptSet:
    """Validate already-parsed YAML; `source` names the file in error messages."""
    if not isinstance(data, dict):
        kind = "empty" if data is None else f"a {type(data).__name__}"
        raise PromptError(f"prompt file {source}: the top level must be a mapping (name, templates, classes, "
                          f"tumour_class), found {kind}")
    try:
        ps = PromptSet.model_validate(data)
    except ValidationError as e:
        raise PromptError(_format(e, source, data)) from None
    ps._path = source
    return ps


def resolve_prompt_path(path: str | Path) -> str:
    """A relative path missing from the working directory falls back to the built-in prompts/."""
    p = str(path)
    if "://" in p or Path(p).is_absolute() or Path(p).exists():
        return p
    for cand in (BUILTIN_DIR / p, BUILTIN_DIR / Path(p).name, BUILTIN_DIR / f"{p}.yaml"):
        if cand.is_file():
            return str(cand)
    return p


def load_prompt_set(path: str | Path) -> PromptSet:
    """Read and validate a prompt YAML (local path or fsspec URI, e.g. s3://bucket/p.yaml)."""
    src = resolve_prompt_path(path)
    try:
        with fsspec.open(src, "r", encoding="utf-8") as f:
            text = f.read()
    except (OSError, ValueError) as e:
        raise PromptError(f"prompt file {path}: cannot read ({getattr(e, 'strerror', None) or e}); "
                          f"give a path to a YAML file such as prompts/ai4skin-leiomyoma.yaml") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise PromptError(f"prompt file {src}: not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_prompt_set(data, src)


def class_embeddings(encoder, prompt_set: PromptSet) -> np.ndarray:
    """Eq. 1: w_c = normalise(mean_i normalise(f_T(prompt_ci))). float32 (C, D).

    All prompts go to the encoder in one call (it batches internally); the normalise-mean-
    normalise is done in float64 so the result does not depend on the prompt order beyond
    float32 rounding of the output."""
    groups = prompt_set.prompts()
    flat = [p for _, ps in groups for p in ps]
    emb = np.asarray(encoder.encode_texts(flat), dtype=np.float64)
    if emb.ndim != 2 or emb.shape[0] != len(flat):
        raise PromptError(f"prompt set {prompt_set.path or prompt_set.name}: encoder returned shape {emb.shape} "
                          f"for {len(flat)} prompts (expected ({len(flat)}, D))")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if not np.all(np.isfinite(norms)) or np.any(norms == 0):
        raise PromptError(f"prompt set {prompt_set.path or prompt_set.name}: the encoder gave a zero or "
                          "non-finite text embedding; check the model weights and dtype")
    emb /= norms
    out, start = [], 0
    for _, ps in groups:
        out.append(emb[start:start + len(ps)].mean(axis=0))
        start += len(ps)
    w = np.stack(out)
    w /= np.linalg.norm(w, axis=1, keepdims=True)
    return w.astype(np.float32)


def prompt_key(prompt_set: PromptSet, model_key: str) -> str:
    """Hash of the resolved ensemble (see `PromptSet.key_payload`) and the encoder's model key."""
    return stable_hash({"prompts": prompt_set.key_payload(), "model_key": model_key})


def text_cosines(class_emb: np.ndarray) -> np.ndarray:
    """(C, C) cosine between class embeddings (rows are unit vectors)."""
    e = np.asarray(class_emb, dtype=np.float64)
    return e @ e.T
