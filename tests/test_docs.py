"""The documents stay true: every `zeus` command, subcommand and flag and every config key that
README.md and docs/*.md show exists (read from the CLI's argparse and config.JobConfig at test
time, so keys and flags added later count), docs/configuration.md is what the schema generates,
every errors.csv reason the code can write is explained, and relative links lead somewhere."""
from __future__ import annotations

import argparse
import re
import shlex
import types
import typing
from pathlib import Path

import yaml
from pydantic import BaseModel

from zeus_ray.cli import build_parser
from zeus_ray.config import JobConfig

ROOT = Path(__file__).resolve().parents[1]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# Pages other branches write at the same time as this one; drop this set once they are merged.
FILE_SUFFIXES = {"py", "md", "yaml", "yml", "json", "csv", "parquet", "png", "jpg", "tiff", "html", "txt", "npz"}

FENCE = re.compile(r"^```([\w-]*)\n(.*?)^```", re.S | re.M)
SPAN = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")
SET_PAIR = re.compile(r"--set[ =][\"']?([A-Za-z_][\w.]*)=")
KEY_SPAN = re.compile(r"^([a-z_]+(?:\.[a-z_]+)+)(?:\s*[=:].*)?$")


# --- what exists ----------------------------------------------------------------------------------

def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for a in p._actions:   # argparse keeps its subcommands here; there is no public accessor
        if isinstance(a, argparse._SubParsersAction):
            return dict(a.choices)
    return {}


def _options(p: argparse.ArgumentParser) -> set[str]:
    return {o for a in p._actions for o in a.option_strings}


def all_flags(p: argparse.ArgumentParser) -> set[str]:
    return _options(p).union(*(all_flags(s) for s in _subparsers(p).values()))


def key_problem(path: str) -> str | None:
    """None when `a.b.c` is a JobConfig key (anything below a dict-valued key counts), else why not."""
    model: type[BaseModel] = JobConfig
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part not in model.model_fields:
            return f"{'.'.join(parts[:i + 1])} is not a config key"
        ann = model.model_fields[part].annotation
        union = typing.get_origin(ann) in (typing.Union, types.UnionType)
        args = [a for a in (typing.get_args(ann) if union else (ann,)) if a is not type(None)]
        sub = next((a for a in args if isinstance(a, type) and issubclass(a, BaseModel)), None)
        if sub is not None:
            model = sub
            continue
        if any(a is dict or typing.get_origin(a) is dict for a in args):
            return None                      # e.g. input.storage_options.anon: free-form below
        return None if i == len(parts) - 1 else f"{'.'.join(parts[:i + 1])} takes a value, not keys"
    return f"{path} is a section; name one of its keys"


# --- what the documents show ------------------------------------------------------------------------

def command_lines(text: str) -> list[str]:
    """`zeus ...` lines of shell code blocks (continuations joined) and inline `zeus ...` spans."""
    lines = []
    for lang, body in FENCE.findall(text):
        if lang in ("", "bash", "sh", "shell", "console"):
            lines += [ln.strip().removeprefix("$ ") for ln in body.replace("\\\n", " ").splitlines()]
    lines += SPAN.findall(FENCE.sub("", text))
    return [ln for ln in lines if re.match(r"(zeus|python -m zeus_ray)\s", ln)]


def command_problem(line: str, parser: argparse.ArgumentParser) -> str | None:
    try:
        tokens = shlex.split(line, comments=True)
    except ValueError:
        tokens = line.split("#")[0].split()
    tokens = [t.strip("[]") for t in tokens]
    tokens = tokens[3:] if tokens[0] == "python" else tokens[1:]
    p, where = parser, "zeus"
    while tokens and tokens[0].startswith("-"):
        if tokens[0].split("=")[0] not in _options(p):
            return f"{where} has no option {tokens[0]}"
        tokens = tokens[1:]
    while tokens and _subparsers(p) and not tokens[0].startswith("-"):
        if tokens[0].endswith(":"):
            return None                       # program output such as `zeus doctor: N ok, ...`
        subs = _subparsers(p)
        if tokens[0] not in subs:
            if p is parser or tokens[0].islower():
                return f"{where} has no subcommand {tokens[0]!r}"
            break                             # a placeholder argument, e.g. `zeus models ID`
        p, where, tokens = subs[tokens[0]], f"{where} {tokens[0]}", tokens[1:]
    for t in tokens:
        if t.startswith("--") and t.split("=")[0] not in _options(p):
            return f"`{where}` has no option {t.split('=')[0]}"
    return None


def config_keys(text: str) -> list[str]:
    """Keys of `--set KEY=...` pairs, of YAML blocks that are job configs, and key-like inline spans."""
    sections = set(JobConfig.model_fields)
    keys = [k for k in SET_PAIR.findall(text) if not any(c.isupper() for c in k)]
    for lang, body in FENCE.findall(text):
        if lang in ("yaml", "yml"):
            tree = yaml.safe_load(body)
            if isinstance(tree, dict) and sections & set(tree):
                keys += list(_paths(tree))
    for span in SPAN.findall(FENCE.sub("", text)):
        m = KEY_SPAN.match(span.strip())
        if m and m.group(1).split(".")[0] in sections and m.group(1).rsplit(".", 1)[1] not in FILE_SUFFIXES:
            keys.append(m.group(1))
    return keys


def _paths(tree: dict, prefix: str = ""):
    for k, v in tree.items():
        if isinstance(v, dict) and v:
            yield from _paths(v, f"{prefix}{k}.")
        else:
            yield f"{prefix}{k}"


def doc_problems(text: str, parser: argparse.ArgumentParser) -> list[str]:
    problems = [p for p in (command_problem(ln, parser) for ln in command_lines(text)) if p]
    flags = all_flags(parser)
    problems += [f"no zeus command has the option {s.split()[0]}" for s in SPAN.findall(FENCE.sub("", text))
                 if re.match(r"--[a-z]", s) and s.split()[0].split("=")[0] not in flags]
    problems += [p for p in (key_problem(k) for k in config_keys(text)) if p]
    return problems


# --- the tests ------------------------------------------------------------------------------------------

def test_every_command_flag_and_config_key_in_the_docs_exists():
    parser = build_parser()
    found = {doc.relative_to(ROOT).as_posix(): doc_problems(doc.read_text(), parser) for doc in DOCS}
    assert not {k: v for k, v in found.items() if v}, found
    text = "\n".join(d.read_text() for d in DOCS)       # the check looked at something
    assert len(command_lines(text)) >= 20 and len(config_keys(text)) >= 50


def test_the_check_finds_what_does_not_exist():
    bad = """
```bash
zeus run cfg.yaml --set tiling.overlapp=0.5 --no-such-flag
zeus frobnicate x
zeus models fetch keep --too DIR
```
Use `zeus evaluate ROOT --annotaions X`, `--force-all`, `evaluation.tumor_terms` or `ray.address.host`.

```yaml
tiling:
  patch_sise: 224
```
"""
    problems = doc_problems(bad, build_parser())
    for needle in ("tiling.overlapp", "--no-such-flag", "'frobnicate'", "--too", "--annotaions", "--force-all",
                   "evaluation.tumor_terms", "ray.address takes a value", "tiling.patch_sise"):
        assert any(needle in p for p in problems), (needle, problems)
    good = "`zeus models fetch keep --to DIR`, `--set input.storage_options.anon=true`, `zeus doctor: 3 ok`"
    assert doc_problems(good, build_parser()) == []


def test_configuration_page_is_generated_from_the_schema():
    from zeus_ray.commands.config import MARKDOWN_COMMAND, config_markdown
    page = (ROOT / "docs" / "configuration.md").read_text()
    assert page == config_markdown(), f"docs/configuration.md is stale: run `{MARKDOWN_COMMAND}`"
    for section, field in JobConfig.model_fields.items():
        sub = field.annotation
        names = [f"{section}.{k}" for k in sub.model_fields] if isinstance(sub, type) and issubclass(sub, BaseModel) else [section]
        assert all(f"| `{n}` |" in page for n in names)


def test_every_errors_csv_reason_is_explained():
    from zeus_ray.slides.planning import NO_TILES, NO_TISSUE
    code = "\n".join(p.read_text() for p in (ROOT / "zeus_ray").rglob("*.py"))
    reasons = set(re.findall(r"reason=\"(\w+)\"", code)) | set(re.findall(r"\"reason\": \"(\w+)\"", code))
    reasons |= {NO_TISSUE, NO_TILES}
    assert {"missing", "no_mpp", "worker_lost", "error"} <= reasons      # the search itself works
    page = (ROOT / "docs" / "troubleshooting.md").read_text()
    table = page[page.index("## errors.csv reasons"):]
    assert not [r for r in sorted(reasons) if f"| `{r}` |" not in table], "explain these in docs/troubleshooting.md"


def _slug(heading: str) -> str:
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_relative_links_lead_somewhere():
    broken = []
    for doc in DOCS:
        for target in re.findall(r"\]\(([^)\s]+)\)", FENCE.sub("", doc.read_text())):
            if re.match(r"[a-z]+:", target):
                continue                      # https://, mailto:
            path, _, anchor = target.partition("#")
            dest = (doc.parent / path).resolve() if path else doc
            if not dest.exists():
                broken.append(f"{doc.name}: {target}")
            elif anchor and dest.suffix == ".md":
                slugs = {_slug(h) for h in re.findall(r"^#+ (.*)$", FENCE.sub("", dest.read_text()), re.M)}
                if anchor not in slugs:
                    broken.append(f"{doc.name}: {target} (no such heading)")
    assert not broken, broken
