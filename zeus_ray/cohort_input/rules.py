"""Naming rules of `zeus manifest`: which annotation file names belong to a slide, slide ids that
are safe folder names (duplicates told apart), the `--dataset-from` / `--center-from` rules and
`--storage-option` parsing.

Pairing (manifest_builder._pair): an annotation named `<stem>.<ext>`, `<file name>.<ext>` (e.g.
`a.svs.geojson`) or `<slide_id>.<ext>` matches exactly; failing that, `<stem><sep><word>.<ext>`
(CONVENTIONS, any case: `a_mask.tif`, `a.annotations.geojson`, `a-gt.png`). An exact match beats a
convention match for the same slide; two files at the same level, or one file fitting several
slides (not told apart by a mirrored relative folder), are reported and left unpaired."""
from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from dataclasses import dataclass

import yaml

from ..errors import ZeusError
from ..storage.store import check_slide_id

# What annotations.read_annotation reads: GeoJSON, ASAP/ImageScope XML, mask images.
ANNOTATION_EXTS = (".geojson", ".json", ".xml", ".png", ".tif", ".tiff")
SEPARATORS = ("_", "-", ".", " ")
WORDS = ("mask", "masks", "annotation", "annotations", "anno", "label", "labels", "gt", "tumor", "tumour")
CONVENTIONS = tuple(s + w for s in SEPARATORS for w in WORDS)
RULE_SYNTAX = "parent, part:N, regex:PATTERN or value:TEXT"


def strip_convention(base: str) -> str | None:
    """The slide stem an annotation name follows by convention ('a_mask' -> 'a'), else None."""
    low = base.lower()
    c = next((c for c in CONVENTIONS if low.endswith(c) and len(low) > len(c)), None)
    return base[: -len(c)] if c else None


def safe_slide_id(text: str) -> str:
    """`text` as an id `store.check_slide_id` accepts: refused characters and '..' become '_'."""
    s = re.sub(r"\.{2,}", "_", re.sub(r"[^A-Za-z0-9._+\-=@ ]+", "_", text))
    s = re.sub(r"^[^A-Za-z0-9]+", "", s)[:200].rstrip(" ")
    return check_slide_id(s or "slide-" + hashlib.sha256(text.encode()).hexdigest()[:8])


@dataclass(frozen=True)
class FieldRule:
    """How to fill `dataset` or `center`: parent | part:N | regex:PATTERN | value:TEXT."""
    spec: str
    kind: str
    arg: object = None
    group: str = ""

    def apply(self, rel: str, parents: list[str]) -> str | None:
        """The value for a slide at `rel` (path under its SOURCE) with full-path `parents`."""
        if self.kind == "value":
            return str(self.arg)
        if self.kind == "parent":
            return parents[-1] if parents else None
        if self.kind == "part":
            folders = rel.split("/")[:-1]
            n = int(self.arg)
            return folders[n] if -len(folders) <= n < len(folders) else None
        m = self.arg.search(rel)
        return (m.group(self.group) or None) if m else None


def parse_rule(spec: str, field_name: str) -> FieldRule:
    flag = f"--{field_name}-from {spec!r}"
    kind, _, arg = spec.partition(":")
    if spec == "parent":
        return FieldRule(spec, "parent")
    if kind == "value" and arg:
        return FieldRule(spec, "value", arg)
    if kind == "part":
        try:
            return FieldRule(spec, "part", int(arg))
        except ValueError:
            raise ZeusError(f"{flag}: N must be an integer (0 = the first folder under SOURCE, -1 = the "
                            "slide's parent)") from None
    if kind == "regex":
        try:
            rx = re.compile(arg)
        except re.error as e:
            raise ZeusError(f"{flag}: bad regular expression ({e})") from None
        if field_name not in rx.groupindex:
            raise ZeusError(f"{flag}: the regex needs a named group (?P<{field_name}>...), e.g. "
                            f"regex:(?P<{field_name}>[^/]+)/")
        return FieldRule(spec, "regex", rx, field_name)
    raise ZeusError(f"{flag}: use {RULE_SYNTAX}")


def field_rules(dataset_from: str | None, center_from: str | None) -> dict[str, FieldRule]:
    """A regex naming both groups fills both fields unless the other has its own rule."""
    rules = {}
    if dataset_from:
        rules["dataset"] = parse_rule(dataset_from, "dataset")
    if center_from:
        rules["center"] = parse_rule(center_from, "center")
    for one, other in (("dataset", "center"), ("center", "dataset")):
        r = rules.get(one)
        if r is not None and other not in rules and r.kind == "regex" and other in r.arg.groupindex:
            rules[other] = FieldRule(r.spec, "regex", r.arg, other)
    return rules


def assign_ids(slides: list) -> list[tuple[str, list[tuple[str, str]]]]:
    """Ids from stems. Equal ids get parent folders prefixed, nearest first, as far as it takes to
    tell them apart; then the file name with its extension (same folder); then a hash of the uri.
    `slides` have stem, name, uri, parents (folder names of the full path); sets their slide_id.
    Returns [(clashing id, [(new id, uri), ...]), ...]."""
    groups: dict[str, list] = defaultdict(list)
    for s in slides:
        groups[safe_slide_id(s.stem)].append(s)
    taken = {sid for sid, g in groups.items() if len(g) == 1}
    for sid in taken:
        groups[sid][0].slide_id = sid
    duplicates = []
    for sid in sorted(k for k, g in groups.items() if len(g) > 1):
        members = sorted(groups[sid], key=lambda s: s.uri)
        namings = [lambda m, d=d: "_".join(m.parents[-d:] + [m.stem])
                   for d in range(1, max(len(m.parents) for m in members) + 1)]
        namings += [lambda m: "_".join(m.parents[-1:] + [m.name]),
                    lambda m: f"{sid[:190]}-{hashlib.sha256(m.uri.encode()).hexdigest()[:8]}"]
        todo = list(members)
        for naming in namings:
            cands = [safe_slide_id(naming(m)) for m in todo]
            for m, c in zip(list(todo), cands):
                if cands.count(c) == 1 and c not in taken:
                    m.slide_id = c
                    taken.add(c)
                    todo.remove(m)
            if not todo:
                break
        duplicates.append((sid, [(m.slide_id, m.uri) for m in members]))
    return duplicates


def parse_storage_options(items: list[str] | None) -> dict:
    """`KEY=VALUE` pairs (values as YAML scalars: true, 3, text; dotted keys nest) for fsspec."""
    out: dict = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ZeusError(f"--storage-option {item.split('=')[0]!r}: use KEY=VALUE, e.g. anon=true "
                            "or client_kwargs.endpoint_url=http://host:9000")
        node = out
        *parents, leaf = key.strip().split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = yaml.safe_load(value) if value.strip() else ""
    return out
