"""`zeus manifest`: a cohort manifest from folders or bucket prefixes of slides and annotation files,
so nobody writes thousands of manifest lines by hand. The rules are in `zeus manifest --help`
(commands/manifest.py) and the README; naming and field rules live in manifest_rules.py.

Scanning: slides are files with an OpenSlide extension; a folder holding .dcm files is ONE DICOM
slide (uri = the folder, which slide_access opens through any file of the series); a .mrxs file is
the slide and its data folder <stem>/ is neither slide nor annotation. .tif/.tiff under an annotation
source that lies inside (or apart from) the slide source are masks; when both are the same folder a
.tif is a mask only if it is named <stem><sep><word> after another slide found there.
"""
from __future__ import annotations

import bisect
import csv
import io
import logging
import os
import posixpath
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path


from ..errors import ZeusError
from ..storage.store import MARKER
from .manifest import SLIDE_SUFFIXES
from .rules import ANNOTATION_EXTS, assign_ids, field_rules, safe_slide_id, strip_convention
from ..storage import remote

log = logging.getLogger(__name__)

COLUMNS = ("slide_id", "uri", "annotation_uri", "dataset", "center", "mpp")
_TIFF = (".tif", ".tiff")


# --- sources ------------------------------------------------------------------------------------------

@dataclass
class _Root:
    given: str
    flag: str
    fs: object
    path: str
    proto: str
    is_file: bool
    secrets: list[str] = field(default_factory=list)   # option values to scrub from messages

    def contains(self, proto: str, p: str) -> bool:
        return proto == self.proto and (p == self.path or p.startswith(self.path.rstrip("/") + "/"))

    def rel(self, p: str) -> str:
        return posixpath.basename(p) if self.is_file or p == self.path else p[len(self.path.rstrip("/")) + 1:]

    def uri(self, p: str) -> str:
        return p if self.proto == "file" else self.fs.unstrip_protocol(p)


def _open_root(uri: str, flag: str, options: dict) -> _Root:
    secrets = remote.secrets(options)
    where = f"{flag} {remote.redact(uri, secrets)}"
    try:
        fs, path = remote.filesystem(uri, options)   # as `zeus run` opens inputs (endpoint, options per protocol)
    except ImportError as e:
        raise ZeusError(f"{where}: {str(e).splitlines()[0]}") from None
    except (ValueError, TypeError) as e:
        raise ZeusError(remote.redact(f"{where}: cannot open ({type(e).__name__}: {str(e).splitlines()[0]}); use a "
                                "folder or a bucket prefix (s3://, gs://, ...) and valid --storage-option keys",
                                secrets)) from None
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    path = path.rstrip("/") or path
    try:
        fs.invalidate_cache()
        is_file = fs.isfile(path)
        exists = is_file or fs.isdir(path)
    except Exception as e:  # noqa: BLE001 - any backend error: one line, no credentials
        raise ZeusError(f"{where}: cannot list ({remote.redact(remote.cause(e, proto), secrets)})") from None
    if not exists:
        raise ZeusError(f"{where}: no such folder, bucket prefix or file")
    return _Root(uri, flag, fs, path, "file" if proto == "local" else proto, is_file, secrets)


ZEUS_OUTPUT_FILES = {MARKER, "similarities.parquet", "result.json"}


def _list(root: _Root) -> list[str]:
    if root.is_file:
        return [root.path]
    log.info("listing %s", remote.redact(root.given, root.secrets))
    try:
        found = root.fs.find(root.path, withdirs=False)
    except Exception as e:  # noqa: BLE001
        raise ZeusError(f"{root.flag} {remote.redact(root.given, root.secrets)}: cannot list "
                        f"({remote.redact(remote.cause(e, root.proto), root.secrets)})") from None
    # Hidden entries below the root: .DS_Store, macOS '._x.svs' forks, .snapshot folders.
    found = [p for p in found if not any(c.startswith(".") for c in root.rel(p).split("/"))]
    # zeus's own outputs (an output root inside the scanned folder): a result folder's viewer TIFFs
    # (mask.tiff, prob_*.tiff) are not slides. Such a folder holds the files zeus writes first and last.
    ours = {posixpath.dirname(p) for p in found if posixpath.basename(p) in ZEUS_OUTPUT_FILES}
    if ours:
        log.info("%d zeus output folders ignored", len(ours))
    return sorted(p for p in found if posixpath.dirname(p) not in ours)


def _ext(name: str, exts) -> str | None:
    low = name.lower()
    return next((e for e in sorted(exts, key=len, reverse=True) if low.endswith(e) and len(low) > len(e)), None)


def _deepest(roots: list[_Root], proto: str, p: str) -> int:
    """Length of the deepest root containing p, -1 when none."""
    return max((len(r.path) for r in roots if r.contains(proto, p)), default=-1)


def _under(sorted_paths: list[str], folder: str) -> list[str]:
    prefix = folder.rstrip("/") + "/"
    i = bisect.bisect_left(sorted_paths, prefix)
    out = []
    while i < len(sorted_paths) and sorted_paths[i].startswith(prefix):
        out.append(sorted_paths[i])
        i += 1
    return out


# --- slides, ids, pairing ------------------------------------------------------------------------------

@dataclass
class _Slide:
    root: _Root
    path: str          # fs path: the file, or the folder of a DICOM series
    kind: str          # file | dicom | mrxs
    slide_id: str = ""

    @property
    def uri(self) -> str:
        return self.root.uri(self.path)

    @property
    def name(self) -> str:
        return posixpath.basename(self.path)

    @property
    def stem(self) -> str:
        return self.name if self.kind == "dicom" else posixpath.splitext(self.name)[0]

    @property
    def rel(self) -> str:
        return self.root.rel(self.path) or self.name

    @property
    def rel_parent(self) -> str:
        return posixpath.dirname(self.rel)

    @property
    def parents(self) -> list[str]:
        return [c for c in posixpath.dirname(self.path).split("/") if c]


@dataclass
class ManifestBuild:
    """The manifest rows plus what the user must know about them (the summary)."""
    rows: list[dict]
    annotations_given: bool
    unpaired: list[str] = field(default_factory=list)       # slide ids without a candidate annotation
    orphans: list[str] = field(default_factory=list)        # annotation uris matching no slide
    ambiguous: list[str] = field(default_factory=list)      # one line each: slide or annotation
    superseded: list[str] = field(default_factory=list)     # convention matches beaten by an exact one
    duplicates: list[tuple[str, list[tuple[str, str]]]] = field(default_factory=list)
    renamed: list[tuple[str, str]] = field(default_factory=list)   # (stem, slide id)
    warnings: list[str] = field(default_factory=list)
    kinds: dict[str, int] = field(default_factory=dict)
    skipped: int = 0                                         # files of no slide/annotation type

    @property
    def paired(self) -> int:
        return sum(1 for r in self.rows if r["annotation_uri"])

    def summary(self, out: str, cap: int = 20) -> str:
        def block(title: str, items: list[str]) -> list[str]:
            lines = [f"{title}: {len(items)}"] + [f"  {x}" for x in items[:cap]]
            return lines + ([f"  … and {len(items) - cap} more"] if len(items) > cap else [])
        extra = ", ".join(f"{n} {k}" for k, n in sorted(self.kinds.items()))
        lines = [f"slides found: {len(self.rows)}" + (f" ({extra})" if extra else "")]
        if self.annotations_given:
            lines.append(f"paired with an annotation: {self.paired}")
            lines += block("unpaired slides", self.unpaired)
            lines += block("orphan annotations (no slide of that name)", self.orphans)
            if self.ambiguous:
                lines += block("ambiguous pairings (left empty: rename or move one file)", self.ambiguous)
            if self.superseded:
                lines += block("annotations not used (an exact name match wins)", self.superseded)
        else:
            lines.append("paired with an annotation: 0 (no --annotations given)")
        lines += block("duplicate slide names (ids disambiguated)",
                       [f"{stem}: " + ", ".join(f"{sid} ({uri})" for sid, uri in m) for stem, m in self.duplicates])
        if self.renamed:
            lines += block("ids changed to be safe folder names", [f"{a!r} -> {b}" for a, b in self.renamed])
        if self.warnings:
            lines += block("warnings", self.warnings)
        if self.skipped:
            lines.append(f"files of other types ignored: {self.skipped}")
        return "\n".join(lines + [f"manifest: {out}"])


def _find_slides(slide_roots, ann_roots, listings, build: ManifestBuild) -> tuple[list[_Slide], set]:
    slides: dict[tuple, _Slide] = {}
    consumed: set[tuple] = set()       # MRXS data files, DICOM members: neither slide nor annotation
    maybe_masks: list[_Slide] = []     # .tif in a folder that is both a slide and an annotation source
    for root in slide_roots:
        paths = listings[id(root)]
        for p in paths:
            key = (root.proto, p)
            if key in slides or key in consumed:
                continue
            name = posixpath.basename(p)
            ext = _ext(name, SLIDE_SUFFIXES)
            if ext is None:
                continue
            if ext == ".dcm":
                folder = posixpath.dirname(p)
                if (root.proto, folder) not in slides:
                    slides[(root.proto, folder)] = _Slide(root, folder, "dicom")
                consumed.add(key)
                continue
            if ext in _TIFF and ann_roots:
                a, s = _deepest(ann_roots, root.proto, p), _deepest(slide_roots, root.proto, p)
                if a > s:      # inside an annotation source nested in (or apart from) the slides
                    continue
                if a >= 0:
                    maybe_masks.append(_Slide(root, p, "file"))
                    continue
            slide = slides[key] = _Slide(root, p, "mrxs" if ext == ".mrxs" else "file")
            if slide.kind == "mrxs":
                data = posixpath.join(posixpath.dirname(p), slide.stem)
                members = _under(paths, data)
                consumed.update((root.proto, q) for q in members)
                if not members:
                    build.warnings.append(f"{slide.uri}: its MRXS data folder {slide.stem}/ (Slidedat.ini, "
                                          "Index.dat, Data*.dat) is missing; OpenSlide cannot open the slide")
                elif not any(posixpath.basename(q).lower() == "slidedat.ini" for q in members):
                    build.warnings.append(f"{slide.uri}: its data folder {slide.stem}/ has no Slidedat.ini")
    # Same folder for slides and annotations: a .tif named after another slide by convention is a mask.
    stems = {s.stem for s in slides.values()} | {m.stem for m in maybe_masks}
    for m in maybe_masks:
        if strip_convention(m.stem) not in stems:
            slides[(m.root.proto, m.path)] = m
    # Sorted order lists x.mrxs before x/..., so this only guards against a slide inside a data folder.
    found = [s for k, s in sorted(slides.items()) if k not in consumed]
    return found, consumed


def _pair(slides: list[_Slide], ann_roots, listings, taken: set, build: ManifestBuild) -> tuple[dict, set]:
    index: dict[str, list[_Slide]] = defaultdict(list)
    for s in slides:
        for k in {s.stem, s.name, s.slide_id}:
            index[k].append(s)
    seen, hits = set(), defaultdict(list)   # slide_id -> [(tier, uri)]
    for root in ann_roots:
        for p in listings[id(root)]:
            name = posixpath.basename(p)
            ext = _ext(name, ANNOTATION_EXTS)
            if ext is None or (root.proto, p) in taken or (root.proto, p) in seen:
                continue
            seen.add((root.proto, p))
            base, uri, tier = name[: -len(ext)], root.uri(p), 1
            cands = list(index.get(base, []))
            if not cands and strip_convention(base) is not None:
                cands, tier = list(index.get(strip_convention(base), [])), 2
            cands = list({id(c): c for c in cands}.values())
            if len(cands) > 1:   # mirrored trees: the slide in the same relative folder
                same = [c for c in cands if c.rel_parent == posixpath.dirname(root.rel(p))]
                cands = same if len(same) == 1 else cands
            if not cands:
                build.orphans.append(uri)
            elif len(cands) > 1:
                build.ambiguous.append(f"{uri} matches slides {', '.join(sorted(c.slide_id for c in cands))} "
                                       "(name it after one slide id, or mirror the slide folders)")
            else:
                hits[cands[0].slide_id].append((tier, uri))
    chosen, ambiguous = {}, set()
    for sid, found in sorted(hits.items()):
        best = min(t for t, _ in found)
        top = sorted(u for t, u in found if t == best)
        if len(top) > 1:
            build.ambiguous.append(f"slide {sid}: {len(top)} files: {', '.join(top)}")
            ambiguous.add(sid)
            continue
        chosen[sid] = top[0]
        build.superseded += [f"{u} (slide {sid} uses {top[0]})" for t, u in sorted(found) if t != best]
    return chosen, ambiguous


def build_manifest(sources: list[str], annotations: list[str] | None = None, dataset_from: str | None = None,
                   center_from: str | None = None, storage_options: dict | None = None) -> ManifestBuild:
    """Scan SOURCEs (local folders/files, any fsspec URI) and annotation sources; return the rows
    (sorted by slide_id) and the findings. Raises ZeusError on bad arguments or no slide found."""
    rules = field_rules(dataset_from, center_from)
    options = storage_options or {}
    slide_roots = [_open_root(s, "SOURCE", options) for s in sources]
    ann_roots = [_open_root(a, "--annotations", options) for a in annotations or []]
    listings = {id(r): _list(r) for r in slide_roots + ann_roots}
    build = ManifestBuild([], bool(ann_roots))
    slides, consumed = _find_slides(slide_roots, ann_roots, listings, build)
    if not slides:
        raise ZeusError(f"SOURCE {', '.join(map(remote.redact, sources))}: no slide found (looked for "
                        f"{' '.join(SLIDE_SUFFIXES)} and folders of .dcm files, recursively)")
    build.duplicates = assign_ids(slides)
    build.renamed = sorted({(s.stem, safe_slide_id(s.stem)) for s in slides if safe_slide_id(s.stem) != s.stem})
    taken = consumed | {(s.root.proto, s.path) for s in slides}
    chosen, ambiguous_ids = _pair(slides, ann_roots, listings, taken, build) if ann_roots else ({}, set())
    missing: dict[str, list[str]] = defaultdict(list)
    for s in sorted(slides, key=lambda s: s.slide_id):
        row = {"slide_id": s.slide_id, "uri": s.uri, "annotation_uri": chosen.get(s.slide_id, ""),
               "dataset": "", "center": "", "mpp": ""}
        for name, rule in rules.items():
            value = rule.apply(s.rel, s.parents)
            if value is None:
                missing[f"--{name}-from {rule.spec}"].append(s.rel)
            row[name] = value or ""
        build.rows.append(row)
        label = {"dicom": "DICOM series", "mrxs": "MRXS"}.get(s.kind)
        if label:
            build.kinds[label] = build.kinds.get(label, 0) + 1
        if ann_roots and not row["annotation_uri"] and s.slide_id not in ambiguous_ids:
            build.unpaired.append(s.slide_id)
    for what, rels in missing.items():
        build.warnings.append(f"{what}: no value for {len(rels)} slide(s) (e.g. {rels[0]}); left empty")
    build.orphans.sort()
    # Files in slide sources that are no slide, no part of one and not in an annotation source.
    build.skipped = len({(r.proto, p) for r in slide_roots for p in listings[id(r)]
                         if not _ext(posixpath.basename(p), SLIDE_SUFFIXES) and (r.proto, p) not in consumed
                         and _deepest(ann_roots, r.proto, p) < 0})
    return build


# --- output ---------------------------------------------------------------------------------------------

def _out_fs(out: str, options: dict):
    try:
        return remote.filesystem(out, options)
    except (ImportError, ValueError, TypeError) as e:
        raise ZeusError(remote.redact(f"--out {out}: cannot open ({str(e).splitlines()[0]})", remote.secrets(options))) from None


def check_output(out: str, force: bool, options: dict | None = None) -> None:
    """Refuse to overwrite an existing manifest without --force (checked before the scan)."""
    if not out.lower().endswith((".csv", ".parquet")):
        raise ZeusError(f"--out {remote.redact(out)}: name it *.csv (or *.parquet), the formats `zeus run` reads")
    fs, path = _out_fs(out, options or {})
    try:
        exists = fs.exists(path)
    except Exception as e:  # noqa: BLE001
        raise ZeusError(remote.redact(f"--out {out}: cannot check it ({remote.cause(e)})", remote.secrets(options))) from None
    if exists and not force:
        raise ZeusError(f"--out {remote.redact(out)} already exists; pass --force to overwrite it")


def manifest_bytes(rows: list[dict], parquet: bool = False) -> bytes:
    if parquet:
        import pandas as pd
        df = pd.DataFrame(rows, columns=list(COLUMNS)).replace({"": None})
        df["mpp"] = df["mpp"].astype("float64")
        return df.to_parquet(index=False)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, lineterminator="\n")
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue().encode()


def write_manifest(build: ManifestBuild, out: str, force: bool = False, options: dict | None = None) -> str:
    """Write atomically (local: temp file + rename; bucket: one put). Returns the full output uri."""
    check_output(out, force, options)
    data = manifest_bytes(build.rows, parquet=out.lower().endswith(".parquet"))
    fs, path = _out_fs(out, options or {})
    proto = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    if proto in ("file", "local"):
        target = Path(path)
        tmp = target.with_name(f".{target.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_bytes(data)
            os.replace(tmp, target)
        except OSError as e:
            raise ZeusError(f"--out {target}: cannot write ({e.strerror or e}); choose a writable path") from None
        finally:
            tmp.unlink(missing_ok=True)
        return str(target)
    try:
        fs.pipe_file(path, data)
    except Exception as e:  # noqa: BLE001
        raise ZeusError(remote.redact(f"--out {out}: cannot write ({remote.cause(e, proto)})", remote.secrets(options))) from None
    return fs.unstrip_protocol(path)
