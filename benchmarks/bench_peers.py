"""Side by side with two public WSI tools on the same slides and tile geometry (issue #11): hs2p (tissue +
tile planning) and LazySlide (tissue, tiles, features), against zeus_ray's planning.

Run with the project venv; the peers live only in a throwaway venv (benchmarks/_work/peers-venv, git-ignored),
never in the project's dependencies:

    .venv/bin/python benchmarks/bench_peers.py                 # everything; makes the peers venv if missing
    .venv/bin/python benchmarks/bench_peers.py --setup         # only (re)install the pinned peers venv
    .venv/bin/python benchmarks/bench_peers.py --skip-install --slides 4 --no-e2e --no-write   # a quick look
    .venv/bin/python benchmarks/bench_peers.py --render        # rewrite the section from the last raw figures

Cohort: benchmarks/_overhead_cohort.py (shared with the overhead benchmark). Every tool plans in process,
with one untimed warm-up slide, then every slide timed (benchmarks/peers/_peer_common.time_slides). The
LazySlide end-to-end run (benchmarks/peers/e2e_lazyslide.py) reports tiles/s, the peak PSS summed over its
process tree and the bytes it wrote. zeus's end-to-end figures come from the overhead benchmark.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:0] = [str(HERE), str(HERE / "peers"), str(ROOT)]

from _overhead_cohort import FOLDER, make_overhead_cohort  # noqa: E402
from _peer_common import MIN_TISSUE, MPP, STRIDE_PX, TILE_PX, loadavg, read_manifest, time_slides  # noqa: E402
from _results import machine, replace_section  # noqa: E402

VENV = ROOT / "benchmarks" / "_work" / "peers-venv"
PEER_PY = VENV / "bin" / "python"
# torch/torchvision pinned to the wheels on this machine's disk (other versions download gigabytes).
PINS = ["hs2p==6.1.*", "lazyslide==0.13.*", "torch==2.14.1", "torchvision==0.29.1"]
WANT = {"hs2p": "6.1.", "lazyslide": "0.13.", "torch": "2.14.1", "torchvision": "0.29.1"}
SHOW = ["hs2p", "lazyslide", "lazyslide-models", "wsidata", "openslide-python", "openslide-bin", "timm", "torch",
        "torchvision", "opencv-python", "shapely", "geopandas", "spatialdata", "zarr"]
RAW = ROOT / "benchmarks" / "_work" / "peers-results.json"
HEADING = "## Side by side with public tools (issue #11)"
GIB = 1024 ** 3


def peer_versions() -> dict[str, str] | None:
    if not PEER_PY.exists():
        return None
    code = ("import importlib.metadata as m, json\nout = {}\nfor p in %r:\n    try: out[p] = m.version(p)\n"
            "    except m.PackageNotFoundError: pass\nprint(json.dumps(out))" % SHOW)
    r = subprocess.run([str(PEER_PY), "-c", code], capture_output=True, text=True)
    return json.loads(r.stdout) if r.returncode == 0 else None


def venv_ok(v: dict | None) -> bool:
    return bool(v) and all(v.get(k, "").startswith(want) for k, want in WANT.items())


def setup(python: str) -> dict:
    """Create the peers venv with the system python3 and install the pinned versions into it."""
    if not PEER_PY.exists():
        print(f"creating {VENV} with {python}", flush=True)
        subprocess.run([python, "-m", "venv", str(VENV)], check=True)
    subprocess.run([str(PEER_PY), "-m", "pip", "install", "-q", *PINS], check=True)
    v = peer_versions()
    if not venv_ok(v):
        sys.exit(f"peers venv {VENV}: expected {WANT}, found {v}")
    print("peers venv:", ", ".join(f"{k} {x}" for k, x in v.items()), flush=True)
    return v


def run_peer(script: str, *args: str) -> dict:
    """Run a peer script with the peers venv's python; its stderr passes through, its result is the last
    stdout line that is a JSON object with "tool"."""
    cmd = [str(PEER_PY), str(HERE / "peers" / script), *args]
    print("$", " ".join(cmd[1:]), flush=True)
    r = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT)
    for line in reversed(r.stdout.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "tool" in obj and r.returncode == 0:
            return obj
    sys.exit(f"{script} failed (exit {r.returncode}); stdout:\n{r.stdout[-3000:]}")


def plan_zeus(rows) -> dict:
    """zeus_ray's planning under the same protocol, in this process."""
    from zeus_ray.config import load_config
    from zeus_ray.slides.planning import plan_slide

    cfg = load_config(None, [f"tiling.magnification={10 / MPP:g}", f"tiling.patch_size={TILE_PX}",
                             f"tiling.overlap={1 - STRIDE_PX / TILE_PX:g}", f"tiling.min_tissue_fraction={MIN_TISSUE}"])

    info = {}

    def plan_one(sid, uri):
        plan = plan_slide(uri, sid, cfg)
        info.update(tissue_mpp=plan.tissue.mpp, display_mpp=getattr(plan, "display_mpp", None))
        return plan.n_tiles, plan.tissue_area_mm2, len(plan.tissue.contours)

    res = time_slides(rows, plan_one)
    return {"tool": "zeus_ray", "version": zeus_version(), "what": "zeus_ray.slides.planning.plan_slide",
            "settings": {"tiling": cfg.tiling.model_dump(include={"magnification", "patch_size", "overlap",
                                                                  "min_tissue_fraction"}),
                         "tissue": cfg.tissue.model_dump(), **info}, **res}


def zeus_version() -> str:
    import importlib.metadata as m
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "zeus_ray"], cwd=ROOT, capture_output=True,
                               text=True).stdout.strip()
    except OSError:
        head, dirty = "", ""
    return m.version("zeus_ray") + (f" ({head}{' + uncommitted changes' if dirty else ''})" if head else "")


def _rng(xs) -> str:
    return f"{statistics.median(xs):g} ({min(xs)}–{max(xs)})"


def section(raw: dict) -> str:
    plans, e2e, versions = raw["plans"], raw["e2e"], raw["versions"]
    n = plans[0]["slides"]
    lines = [HEADING, "",
             f"Command: `cd /work/main && {raw['cmd']}` ({raw['minutes']:.0f} min; the peers run in a throwaway venv, "
             f"benchmarks/_work/peers-venv, made by `--setup`: "
             + ", ".join(f"{k} {v}" for k, v in versions.items()) + ").",
             f"Machine: {raw['machine']}; 2 cores shared with other jobs while this ran: load average (1/5/15 min) "
             "at the start and end of each part is in the tables. Compare within a part, not across parts.",
             f"Cohort: {n} synthetic 20x SVS slides of 7200 × 5400 px (0.5 µm/px, levels 1/4/16, two tissue "
             "blobs each as generated; `benchmarks/_overhead_cohort.py`, seeds 100+i). Geometry for every tool: "
             f"{TILE_PX} px tiles at {MPP:g} µm/px (10x), stride {STRIDE_PX} (75 % overlap), tissue fraction ≥ "
             f"{MIN_TISSUE}.", "",
             "**Planning** (tissue segmentation + tile coordinates, in process; open the slide, read what the tool "
             "needs for tissue, no tile pixels, nothing written): one untimed warm-up slide, then every slide timed.",
             "", "| tool | call | tissue thumbnail | s/slide median | s/slide mean | tiles/slide median (min–max) "
             "| tissue mm²/slide median | tissue pieces/slide | load avg start → end |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for p in plans:
        lines.append(f"| {p['label']} | `{p['what']}` | {p['thumb']} | {p['median_s']:.4f} | {p['mean_s']:.4f} | "
                     f"{_rng(p['tiles_per_slide'])} | {statistics.median(p['tissue_mm2_per_slide']):.2f} | "
                     f"{_rng(p['tissue_pieces_per_slide'])} | "
                     f"{p['loadavg_start']} → {p['loadavg_end']} |")
    z = next((p for p in plans if p["tool"] == "zeus_ray"), None)
    if z:
        lines += ["", "Planning time relative to zeus_ray (median s/slide, lower is faster): "
                  + ", ".join(f"{p['label']} {p['median_s'] / z['median_s']:.2f}×" for p in plans if p is not z) + "."]
    areas = [statistics.median(p["tissue_mm2_per_slide"]) for p in plans]
    lz8, lz2 = (next(p for p in plans if p["label"] == x) for x in ("LazySlide", "LazySlide, default tissue level"))
    merged = sum(a < b for a, b in zip(lz8["tissue_pieces_per_slide"], lz2["tissue_pieces_per_slide"]))
    spread = 100 * (max(areas) - min(areas)) / max(areas)
    lines += ["", "Why the tile counts differ (same threshold, same grid step; from each tool's source):",
              "- zeus_ray: one grid anchored at the slide's (0, 0) over the whole slide; a tile is kept when ≥ 25 % "
              "of it is tissue, so tiles that overhang the tissue edge on any side are kept.",
              "- hs2p: a grid per tissue contour starting at the contour's bounding-box top-left corner and running "
              "to its right/bottom edges; tiles overhanging the top or left edge of a piece are never candidates.",
              "- LazySlide: a grid per tissue piece confined to that piece's bounding box (`edge=False`: a tile "
              "must fit inside the box), and coverage is measured against that piece alone; tiles overhanging "
              "the box on any side are never candidates, so it keeps the fewest. Its closing kernel is in pixels "
              "(7 px, 3 iterations), so at 8 µm/px it bridges wider gaps than at 2 µm/px: "
              f"on {merged} of {n} slides it finds fewer pieces at 8 µm/px than at 2 µm/px (pieces joined into one "
              "polygon), whose larger box holds more tiles: hence its wider tile range at 8 µm/px.",
              "- Median tissue area per slide: " + ", ".join(
                  f"{p['label']} {statistics.median(p['tissue_mm2_per_slide']):.2f} mm²" for p in plans)
              + f" (spread {spread:.1f} % of the largest): the tissue masks explain little of the difference."]
    if e2e:
        lines += ["", "**LazySlide end to end** (tissue, tiles, features written with `WSIData.write` to one zarr "
                  "store per slide; timm `test_vit`, random init, `num_classes=0`, batch 64, fp32 on CPU, "
                  "LazySlide's own timm wrapper `lazyslide_models.TimmModel`; tissue at 8 µm/px as in the planning "
                  "row). tiles/s over the processing time (after imports and model creation); wall includes them. "
                  "PSS: sampled every 0.2 s, summed over the run's process tree (the sampler not included); "
                  "CPU: user + sys seconds of the whole run (wait4 rusage; less sensitive than wall time to other jobs). "
                  "Bytes written: the kernel's write count for the run (same rusage; whole pages); stored: the "
                  "stores' file bytes and their disk usage as `du` counts it.",
                  "", "| DataLoader workers | slides | tiles | processing s | tiles/s | wall s (incl. start-up) "
                  "| CPU ms/tile | peak PSS summed | bytes written | stored: files / disk | load avg start → end |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for e in e2e:
            lines.append(f"| {e['settings']['num_workers']} | {e['slides']} | {e['tiles']} | {e['process_s']:.1f} | "
                         f"**{e['tiles_per_s']:.1f}** | {e['wall_s']:.1f} | {1000 * e['cpu_s'] / e['tiles']:.0f} | "
                         f"{e['peak_pss_bytes'] / GIB:.2f} GiB | {e['bytes_written'] / 1e6:.1f} MB | "
                         f"{e['bytes_stored'] / 1e6:.1f} MB / {e['disk_bytes'] / 1e6:.1f} MB ({e['files_stored']} files) | "
                         f"{e['loadavg_start']} → {e['loadavg_end']} |")
        lines += ["", "zeus end to end: see the Overhead section (benchmarks/bench_overhead.py)."]
    lines += ["", f"Raw figures (per slide): `{RAW.relative_to(ROOT)}`."]
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setup", action="store_true", help="only create/update the peers venv (pinned versions), then exit")
    ap.add_argument("--skip-install", action="store_true", help="use the existing peers venv as it is")
    ap.add_argument("--python", default="python3", help="interpreter that makes the peers venv (the system 3.11)")
    ap.add_argument("--slides", type=int, default=32)
    ap.add_argument("--no-e2e", action="store_true", help="skip the LazySlide end-to-end run")
    ap.add_argument("--e2e-workers", default="0,2", help="LazySlide DataLoader workers, one e2e run each "
                    "(0 = LazySlide's default)")
    ap.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    ap.add_argument("--render", action="store_true", help=f"run nothing: rewrite the section from {RAW.name}")
    args = ap.parse_args()
    t_start = time.perf_counter()
    if args.render:
        publish(json.loads(RAW.read_text()), args.no_write)
        return

    if args.setup:
        setup(args.python)
        return
    versions = peer_versions()
    if args.skip_install:
        if not venv_ok(versions):
            sys.exit(f"peers venv {VENV}: expected {WANT}, found {versions}; run with --setup first")
    elif not venv_ok(versions):
        versions = setup(args.python)

    paths = make_overhead_cohort(n=args.slides, folder=FOLDER)
    rows = read_manifest(FOLDER / "manifest.csv", args.slides)
    print(f"cohort: {len(paths)} slides in {FOLDER}; load average {loadavg()}", flush=True)
    sl = ["--slides", str(args.slides)]

    plans = []
    p = run_peer("plan_hs2p.py", *sl)
    s = p["settings"]
    plans.append(dict(p, label="hs2p", thumb=f"{s['seg_spacing_um']:.2f} µm/px (level {s['seg_level']})"))
    for level, label in (("-1", "LazySlide"), ("auto", "LazySlide, default tissue level")):
        p = run_peer("plan_lazyslide.py", *sl, "--tissue-level", level)
        s = p["settings"]
        plans.append(dict(p, label=label, thumb=f"{s['tissue_level_mpp']:.2f} µm/px (level {s['tissue_level']}, "
                                                f"`level={level!r}`)".replace("'-1'", "-1")))
    print("zeus_ray planning (in this process)", flush=True)
    z = plan_zeus(rows)
    s = z["settings"]
    extra = (f" + a {s['display_mpp']:.3g} µm/px display thumbnail" if s.get("display_mpp")
             and s["display_mpp"] < s["tissue_mpp"] else "")
    plans.append(dict(z, label="zeus_ray", thumb=f"{s['tissue_mpp']:g} µm/px{extra}"))
    for p in plans:
        print(f"{p['label']}: {p['median_s']:.4f} s/slide median, tiles/slide {_rng(p['tiles_per_slide'])}", flush=True)

    e2e = []
    if not args.no_e2e:
        for w in [int(x) for x in args.e2e_workers.split(",") if x.strip()]:
            e = run_peer("e2e_lazyslide.py", *sl, "--num-workers", str(w))
            e2e.append(e)
            print(f"LazySlide e2e, {w} workers: {e['tiles_per_s']:.1f} tiles/s, peak PSS "
                  f"{e['peak_pss_bytes'] / GIB:.2f} GiB, written {e['bytes_written'] / 1e6:.1f} MB", flush=True)

    cmd = ".venv/bin/python benchmarks/bench_peers.py" + "".join(
        f" {a}" for a in sys.argv[1:] if a not in ("--no-write",))
    raw = {"cmd": cmd, "minutes": (time.perf_counter() - t_start) / 60, "machine": machine(), "versions": versions,
           "plans": plans, "e2e": e2e}
    RAW.write_text(json.dumps(raw, indent=1))
    publish(raw, args.no_write)


def publish(raw: dict, print_only: bool) -> None:
    text = section(raw)
    if print_only:
        print(text)
    else:
        replace_section(HEADING, text)


if __name__ == "__main__":
    main()
