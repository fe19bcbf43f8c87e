"""`zeus doctor`: a preflight check of a job config, in seconds, before an hour on a cluster.

Each check is a small function of the shared `Context` returning (status, message) lines, status
"ok", "warn" or "fail"; `run_doctor` runs them in order, each guarded so that one broken item
never hides the others. Nothing is encoded and no model is loaded: weights are only located,
slides only stat-ed (a small sample opened), the output root gets a probe file that is removed.
Checks of the machine (devices, hub cache, slide cache) describe the machine doctor runs on.
"""
from __future__ import annotations

import os
import shutil
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from ..errors import ZeusError
from .lines import FAIL, OK, WARN, Context, Line, first_line, redact
from .model_checks import check_tokenizer, check_weights

POOL = 16          # parallel stat calls (bucket round trips dominate)
MAX_NAMED = 10     # missing slides named one by one
RAY_TIMEOUT_S = 60


def _size(n: float) -> str:
    return f"{n / 1e9:.1f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def _is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def _storage_options(ctx: Context) -> dict:
    return dict(getattr(ctx.cfg.input, "storage_options", None) or {})


# ---------------------------------------------------------------- config and cohort

def check_config(ctx: Context) -> list[Line]:
    from ..config import load_config
    ctx.cfg = load_config(ctx.config, ctx.overrides, {"ray": {"address": ctx.address}} if ctx.address else None)
    c = ctx.cfg
    return [(OK, f"config {ctx.config or '(defaults)'}: valid (model {c.model.id}, output {c.output.root})")]


def check_prompts(ctx: Context) -> list[Line]:
    from ..prompts import load_prompt_set
    ps = load_prompt_set(ctx.cfg.prompts.file)
    ctx.tumour_class = ps.tumour_class
    return [(OK, f"prompts {ctx.cfg.prompts.file}: {len(ps.classes)} classes ({', '.join(c.name for c in ps.classes)}; "
                 f"tumour: {ps.tumour_class}), {len(ps.templates)} templates")]


def check_cohort(ctx: Context) -> list[Line]:
    from ..cohort_input.manifest import load_cohort
    ctx.entries = load_cohort(ctx.cfg.input)
    src = ctx.cfg.input.manifest or ctx.cfg.input.glob
    n_ann = sum(e.annotation_uri is not None for e in ctx.entries)
    groups = sorted({e.dataset for e in ctx.entries if e.dataset})
    return [(OK, f"cohort {src}: {len(ctx.entries)} slides, {n_ann} with annotations"
             + (f", datasets {', '.join(groups)}" if groups else ""))]


def _stat(uri: str, options: dict) -> tuple[bool, int | None, str | None]:
    """(exists, size, error) for a local path or any fsspec URI; never raises."""
    from ..storage import remote
    if not _is_remote(uri):
        path = remote.local_path(uri)
        return os.path.exists(path), (os.path.getsize(path) if os.path.isfile(path) else None), None
    try:
        fs, path = remote.filesystem(uri, options)
        info = fs.info(path)
        return True, info.get("size") if info.get("type") != "directory" else None, None
    except FileNotFoundError:
        return False, None, None
    except Exception as e:  # noqa: BLE001 - credentials, endpoint: reported, not raised
        return False, None, remote.cause(e, uri.split("://", 1)[0])


def _exist_lines(what: str, items: list[tuple[str, str]], results: list) -> list[Line]:
    missing = [(sid, uri) for (sid, uri), (ok, _, err) in zip(items, results) if not ok and err is None]
    errors = [(sid, err) for (sid, _), (ok, _, err) in zip(items, results) if err is not None]
    lines: list[Line] = []
    if missing:
        named = "; ".join(f"{sid} ({redact(uri)})" for sid, uri in missing[:MAX_NAMED])
        more = f"; +{len(missing) - MAX_NAMED} more" if len(missing) > MAX_NAMED else ""
        lines.append((FAIL, f"{what}: {len(missing)} of {len(items)} missing: {named}{more}; fix the uris "
                            f"in the manifest or upload the files"))
    if errors:
        named = "; ".join(f"{sid}: {err}" for sid, err in errors[:MAX_NAMED])
        lines.append((FAIL, f"{what}: {len(errors)} of {len(items)} cannot be checked: {named}"))
    if not lines:
        total = sum(r[1] or 0 for r in results)
        lines.append((OK, f"{what}: all {len(items)} exist" + (f" ({_size(total)})" if total else "")))
    return lines


def check_slides_exist(ctx: Context) -> list[Line]:
    options = _storage_options(ctx)
    slides = [(e.slide_id, e.uri) for e in ctx.entries]
    anns = [(e.slide_id, e.annotation_uri) for e in ctx.entries if e.annotation_uri]
    with ThreadPoolExecutor(POOL) as pool:
        res = list(pool.map(lambda it: _stat(it[1], options), slides + anns))
    for (_, uri), (ok, size, _) in zip(slides, res):
        if ok:
            ctx.sizes[uri] = size
    lines = _exist_lines("slides", slides, res[:len(slides)])
    if anns:
        lines += _exist_lines("annotation files", anns, res[len(slides):])
    return lines


def sample(entries: list, k: int) -> list:
    """k entries spread evenly over the list (first and last included): deterministic."""
    if k <= 0 or not entries:
        return []
    if k >= len(entries):
        return list(entries)
    return [entries[round(i * (len(entries) - 1) / (k - 1))] for i in range(k)] if k > 1 else [entries[0]]


def _open_one(ctx: Context, e) -> Line:
    from ..slides.magnification import resolve_mpp
    from ..slides.access import open_slide

    slide = open_slide(e.uri, e.slide_id, ctx.cfg.cache, _storage_options(ctx))
    try:
        what = f"slide {e.slide_id}: opens ({slide.dimensions[0]} × {slide.dimensions[1]} px, {slide.level_count} levels)"
        mpp, source = resolve_mpp(slide, e.slide_id, override=e.mpp, default=ctx.cfg.input.default_mpp)
        ctx.mpp0[e.slide_id] = mpp
        ctx.dims[e.slide_id] = tuple(slide.dimensions)
        if source == "input.default_mpp":
            return WARN, f"{what}, no usable µm/px in its metadata: input.default_mpp={mpp:g} µm/px will be used"
        if source == "objective-power":
            return WARN, f"{what}, no µm/px in its metadata: {mpp:.4g} µm/px assumed from the objective power " \
                         f"(give an `mpp` column in the manifest if that is wrong)"
        return OK, f"{what}, {mpp:.4g} µm/px ({source})"
    finally:
        slide.close()


def check_sample_slides(ctx: Context) -> list[Line]:
    present = [e for e in ctx.entries if e.uri in ctx.sizes]
    chosen = sample(present, ctx.sample_size)
    if ctx.sample_size == 0:
        return [(WARN, "slides: none opened (--sample 0): formats and µm/px not checked")]
    if not chosen:
        return []   # no slide exists: said above

    def one(e) -> Line:
        try:
            return _open_one(ctx, e)
        except ZeusError as err:
            return FAIL, str(err)
    with ThreadPoolExecutor(min(4, len(chosen))) as pool:   # remote ones are fetched into the cache
        return list(pool.map(one, chosen))


def _outside(ann, dims) -> str | None:
    """Why a polygon annotation cannot belong to its slide: every region lies outside the slide's
    level-0 extent (coordinates of another level, in µm, or another slide's file); else None."""
    if ann.geometry is None or ann.geometry.is_empty or dims is None:
        return None
    from shapely.geometry import box
    w, h = dims
    if ann.geometry.intersects(box(0, 0, w, h)):
        return None
    x0, y0, x1, y1 = (round(v) for v in ann.geometry.bounds)
    return (f"lies wholly outside the slide: its regions span x {x0}..{x1}, y {y0}..{y1} px, the slide is {w} × {h} "
            "level-0 px; check that the file belongs to this slide and that its coordinates are level-0 pixels")


def check_annotations(ctx: Context) -> list[Line]:
    from ..truth.annotations import read_with_settings
    ev = ctx.cfg.evaluation.model_dump()
    lines: list[Line] = []
    for e in ctx.entries:
        if e.slide_id not in ctx.mpp0 or not e.annotation_uri:
            continue
        try:
            ann = read_with_settings(e.annotation_uri, ev, mpp0=ctx.mpp0[e.slide_id], tumour_class_name=ctx.tumour_class,
                                     storage_options=_storage_options(ctx))
        except ZeusError as err:
            lines.append((FAIL, f"annotation of slide {e.slide_id}: {err}"))
            continue
        empty = ann.mask is not None and not ann.mask.any() or ann.mask is None and (
            ann.geometry is None or ann.geometry.is_empty)
        classes = ", ".join(ann.classes) or "unclassified"
        outside = _outside(ann, ctx.dims.get(e.slide_id))
        if outside:
            lines.append((FAIL, f"annotation of slide {e.slide_id}: {outside}"))
        elif empty:
            lines.append((WARN, f"annotation of slide {e.slide_id}: no region counts as tumour (classes in the file: "
                                f"{classes}); name them in evaluation.tumour_classes or evaluation.tumour_terms"))
        else:
            lines.append((OK, f"annotation of slide {e.slide_id}: {ann.kind}, classes: {classes}"))
    return lines


# ---------------------------------------------------------------- output, devices, cluster, cache

def check_output(ctx: Context) -> list[Line]:
    from ..storage.store import OutputStore
    root = ctx.cfg.output.root
    try:
        store = OutputStore(root, ctx.cfg.output.storage_options)
        probe = store.path(f".zeus-doctor-{uuid.uuid4().hex[:8]}")
        created = []
        if store.local:   # remember which folders the probe creates, to remove them again
            p = Path(store.root)
            while not p.exists() and p != p.parent:
                created.append(p)
                p = p.parent
        store.write_bytes(probe, b"zeus doctor write probe\n")
        store.fs.rm_file(probe)
        for d in created:
            d.rmdir()
    except Exception as e:  # noqa: BLE001 - any backend error is the answer
        return [(FAIL, f"output.root {redact(root)} is not writable ({first_line(e)[:200]}); set output.root "
                       f"to a folder or bucket this job can write")]
    return [(OK, f"output.root {redact(root)}: writable (probe file written and removed)")]


def check_devices(ctx: Context) -> list[Line]:
    import torch
    dev = ctx.cfg.model.device
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        names = sorted({torch.cuda.get_device_name(i) for i in range(n)})
        bf16 = "yes" if torch.cuda.is_bf16_supported() else "no (float16 autocast instead)"
        return [(OK, f"devices: {n} CUDA GPU(s) here ({', '.join(names)}), bf16 {bf16}")]
    if dev.startswith("cuda"):
        return [(WARN, f"devices: model.device={dev} but torch sees no CUDA device on this machine "
                       f"(fine when the GPUs are on the Ray workers; else --set model.device=cpu)")]
    return [(OK, f"devices: no CUDA device here; model.device={dev} encodes on CPU (slow for CONCH/KEEP)")]


_RAY_PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False, logging_level="ERROR")
print("ZEUS-DOCTOR " + json.dumps({"resources": ray.cluster_resources(),
      "nodes": sum(1 for n in ray.nodes() if n["Alive"])}))
ray.shutdown()
"""


def check_ray(ctx: Context) -> list[Line]:
    import json
    import subprocess
    import sys
    address = ctx.cluster_address()
    if not address:
        return [(OK, f"ray: no cluster address; the job starts a local Ray here ({os.cpu_count()} CPUs)")]
    from ..engine.connect import preflight
    try:   # `auto`, a listener, the token: what `zeus run` checks before it joins
        target, env = preflight(address)
    except ZeusError as e:
        return [(FAIL, f"ray: {e}")]
    # A child process: ray.init cannot be timed out in-process and must not stay attached here.
    try:
        proc = subprocess.run([sys.executable, "-c", _RAY_PROBE, target], capture_output=True, text=True,
                              timeout=RAY_TIMEOUT_S, env=os.environ | env)
    except subprocess.TimeoutExpired:
        return [(FAIL, f"ray: no answer from the cluster at {address} within {RAY_TIMEOUT_S} s")]
    out = next((ln for ln in proc.stdout.splitlines() if ln.startswith("ZEUS-DOCTOR ")), None)
    if out is None:
        err = [ln for ln in proc.stderr.splitlines() if ln.strip()]
        return [(FAIL, f"ray: cannot join the cluster at {address}: {redact(err[-1] if err else 'no output')[:300]}")]
    return cluster_lines(target, json.loads(out.removeprefix("ZEUS-DOCTOR ")), ctx.cfg)


def cluster_lines(address: str, info: dict, cfg) -> list[Line]:
    """Report lines from a cluster's totals ({"resources": ray.cluster_resources(), "nodes": n})."""
    res = info["resources"]
    gpus = res.get("GPU", 0)
    lines: list[Line] = [(OK, f"ray cluster at {address}: {info['nodes']} node(s), {res.get('CPU', 0):g} CPUs, "
                              f"{gpus:g} GPUs")]
    if gpus == 0 and cfg.model.device.startswith("cuda"):
        lines.append((WARN, f"ray: model.device={cfg.model.device} but the cluster has no GPU now "
                            f"(an autoscaling GPU group may start from zero)"))
    for key in ("reader_resources", "encoder_resources"):
        for name, amount in getattr(cfg.ray, key).items():
            if res.get(name, 0) >= amount:
                lines.append((OK, f"ray resource {name!r} (ray.{key}): {res[name]:g} in the cluster"))
            else:
                lines.append((WARN, f"ray resource {name!r} (ray.{key}) is not in the cluster now: its tasks wait "
                                    f"until a node offers it (an autoscaling group may start from zero; else "
                                    f"check the node group's --resources)"))
    return lines


def _dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and not f.is_symlink())


def check_cache(ctx: Context) -> list[Line]:
    remote = {u: s for u, s in ctx.sizes.items() if _is_remote(u)}
    if ctx.entries is not None and not any(_is_remote(e.uri) for e in ctx.entries):
        return [(OK, "slide cache: not used (every slide is a local file)")]
    cache = ctx.cfg.cache
    folder = Path(os.path.expanduser(cache.dir))
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".zeus-doctor-{uuid.uuid4().hex[:8]}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        return [(FAIL, f"slide cache: cache.dir {folder} is not writable ({e.strerror or e}); set cache.dir to a "
                       f"writable local folder")]
    free, held = shutil.disk_usage(folder).free, _dir_bytes(folder)
    room, limit = free + held, cache.max_gb * 1e9
    biggest = max((s or 0 for s in remote.values()), default=0)
    what = (f"slide cache {folder}: {_size(free)} free on its disk, {_size(held)} cached, "
            f"cache.max_gb={cache.max_gb:g}")
    if biggest > room:
        return [(FAIL, f"{what}: the largest slide ({_size(biggest)}) does not fit; point cache.dir at a larger disk")]
    if room < limit:
        return [(WARN, f"{what}: the disk fills before the limit; lower cache.max_gb or point cache.dir at a larger disk")]
    if biggest > limit:
        return [(WARN, f"{what}: the largest slide ({_size(biggest)}) is over the limit; raise cache.max_gb")]
    return [(OK, what)]


# ---------------------------------------------------------------- the runner

def checks() -> list[tuple[str, Callable[[Context], list[Line]], str]]:
    """(name, check, the Context field it needs) in the order they run and print."""
    return [
        ("config", check_config, ""),
        ("prompts", check_prompts, "cfg"),
        ("cohort", check_cohort, "cfg"),
        ("slides", check_slides_exist, "entries"),
        ("sample", check_sample_slides, "entries"),
        ("annotations", check_annotations, "entries"),
        ("weights", check_weights, "cfg"),
        ("tokenizer", check_tokenizer, "cfg"),
        ("output", check_output, "cfg"),
        ("devices", check_devices, "cfg"),
        ("ray", check_ray, "cfg"),
        ("cache", check_cache, "cfg"),
    ]


def run_doctor(config: str | None, overrides: list[str] | None = None, address: str | None = None,
               sample_size: int = 5, echo: Callable[[str], None] = print) -> dict[str, int]:
    """Run every check, print `status message` lines and the summary; returns the counts."""
    ctx = Context(config, list(overrides or []), address, sample_size)
    counts = {OK: 0, WARN: 0, FAIL: 0}
    for name, check, needs in checks():
        if needs and getattr(ctx, needs) is None:
            continue   # its input already failed, on a line of its own
        try:
            lines = check(ctx)
        except ZeusError as e:
            lines = [(FAIL, str(e))]
        except Exception as e:  # noqa: BLE001 - a broken check is one fail line, not the end
            lines = [(FAIL, f"{name}: check failed ({first_line(e)[:300]})")]
        for status, message in lines:
            counts[status] += 1
            echo(f"{status:<4} {message}")
    echo(f"zeus doctor: {counts[OK]} ok, {counts[WARN]} warnings, {counts[FAIL]} failures")
    return counts
