"""`zeus config [FILE] [--set k=v]`: validate a config and print the resolved values, or list
every key with its default; `zeus config --markdown` writes docs/configuration.md (the page is
generated from the pydantic schema, and tests/test_docs.py fails when it is stale)."""
from __future__ import annotations

import json
import re
import typing

import yaml
from pydantic import BaseModel

from ..config import JobConfig, config_reference, load_config
from .options import add_set_option

MARKDOWN_COMMAND = "python -m zeus_ray config --markdown > docs/configuration.md"
SECTION_TEXT = {   # one line per section, above its table
    "input": "Where the slides come from: a manifest or a glob, and how remote inputs are read.",
    "output": "Where results go and which optional files are written.",
    "tiling": "The tile grid: resolution, tile size, overlap, which tiles are kept, full or adaptive overlap.",
    "model": "The frozen image/text encoder.",
    "prompts": "The prompt ensemble.",
    "cache": "The local cache of remote slides (on every node).",
    "ray": "The Ray cluster and how the work is spread over it.",
    "evaluation": "Ground truth: which annotation classes are tumour, the metric grid, mask images.",
}


def register(sub) -> None:
    p = sub.add_parser("config", help="validate a job config (or list every key and its default)")
    p.add_argument("file", nargs="?", help="job config YAML; without it, list all keys")
    p.add_argument("--markdown", action="store_true",
                   help="print the configuration reference page (docs/configuration.md) instead")
    add_set_option(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    if args.markdown:
        print(config_markdown(), end="")
        return 0
    if args.file is None and not args.overrides:
        print(config_reference())
        return 0
    cfg = load_config(args.file, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False).rstrip())
    return 0


def _type_text(annotation) -> str:
    """`float | None`, `full | adaptive`, `list[str]`: the accepted values in a few words."""
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(str(a) for a in typing.get_args(annotation))
    text = annotation.__name__ if isinstance(annotation, type) else str(annotation)
    text = re.sub(r"typing\.|NoneType", lambda m: "None" if m.group() == "NoneType" else "", text)
    return text.replace("|", "\\|")


def _cell(text: str) -> str:
    """Table-cell text: pipes escaped, `<class>`-style placeholders shown, not read as HTML tags."""
    return text.replace("|", "\\|").replace("\n", " ").replace("<", "&lt;").replace(">", "&gt;")


def _default_text(value) -> str:
    return "`" + _cell(json.dumps(value, ensure_ascii=False)) + "`"


def _rows(model: type[BaseModel], prefix: str) -> list[str]:
    rows = []
    for name, f in model.model_fields.items():
        rows.append(f"| `{prefix}{name}` | {_type_text(f.annotation)} | {_default_text(f.get_default(call_default_factory=True))} "
                    f"| {_cell(f.description or '')} |")
    return rows


def config_markdown() -> str:
    """docs/configuration.md: every section and key of JobConfig with its type, default and description."""
    out = ["# Configuration reference", "",
           f"<!-- Generated from zeus_ray/config.py by `{MARKDOWN_COMMAND}`; do not edit by hand. -->", "",
           "A job config is YAML with the sections below; every key has a default, so a config names only what it "
           "changes. `--set SECTION.KEY=VALUE` (repeatable) overrides one key on the command line; the value is "
           "read as YAML (`--set ray.reader_resources='{cpu_pool: 0.01}'`). Unknown keys fail at once, naming the "
           "key and the file or `--set` it came from. `zeus config` lists the keys with their defaults, "
           "`zeus config FILE --set ...` prints the resolved config, and every run stores it in its `run.json`.", "",
           "```yaml", "input:", "  manifest: cohort.csv", "tiling:", "  magnification: 10", "model:", "  id: keep",
           "output:", "  root: s3://bucket/zeus", "```", ""]
    for section, field in JobConfig.model_fields.items():
        model = field.annotation
        if not (isinstance(model, type) and issubclass(model, BaseModel)):
            continue
        about = SECTION_TEXT.get(section) or " ".join((model.__doc__ or "").split())
        out += [f"## `{section}`", "", *([about, ""] if about else [])]
        out += ["| key | type | default | meaning |", "|---|---|---|---|", *_rows(model, f"{section}."), ""]
    top = [(n, f) for n, f in JobConfig.model_fields.items()
           if not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel))]
    if top:
        out += ["## Top-level keys", "", "| key | type | default | meaning |", "|---|---|---|---|"]
        out += [f"| `{n}` | {_type_text(f.annotation)} | {_default_text(f.get_default(call_default_factory=True))} "
                f"| {_cell(f.description or '')} |" for n, f in top]
        out.append("")
    return "\n".join(out)
