"""Issue #11: what the pipeline costs around a near-free encoder, against a plain process pool.

`zeus run` (run_cohort, the code path users run: Ray start-up, plan, read, encode, write parts,
per-slide reduce with every default output, cohort tables, report) against a plain
`multiprocessing` pool, one process per core, doing the same planning, the same region reads and
the same encodes with no Ray and no writes. Same encoder (`random:test_vit`, timm's tiny test ViT),
batch and threads. Ratio = zeus tiles/s ÷ pool tiles/s, both timed from start (processes, model
load) to finish, in the same invocation.

Also: CPU seconds per tile per stage (as the workers measured them), peak memory summed over every
process of the run (PSS), bytes written per slide, the driver's peak RSS.

    .venv/bin/python benchmarks/bench_overhead.py --cohort large --write    # 32 slides of 7200 × 5400
    .venv/bin/python benchmarks/bench_overhead.py --cohort small --write    # 400 slides of 2400 × 1800
    .venv/bin/python benchmarks/bench_overhead.py --cohort large-128        # 128 slides of 7200 × 5400
    .venv/bin/python benchmarks/bench_overhead.py --scale 100 1000 --write  # driver RSS, 1,000 slides
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from _overhead_cohort import FOLDER, make_overhead_cohort  # noqa: E402
from _results import machine, replace_section  # noqa: E402

# large-128: the large cohort four times over (the same slides and more), where Ray's fixed start weighs less.
COHORTS = {"large": (32, 7200, 5400, FOLDER), "large-128": (128, 7200, 5400, FOLDER),
           "small": (400, 2400, 1800, HERE / "_work" / "overhead-small")}
MODEL, BATCH, DEVICE = "random:test_vit", 64, "cpu"
EXTRA_SETS: list = []   # --set KEY=VALUE for zeus run (e.g. ray.fuse_read_encode=off: the GPU shape on CPUs)
DIRECT = True   # --reader auto: both sides read TIFF tiles directly; openslide: both through OpenSlide


def config(manifest: Path, out: Path, *sets: str):
    from zeus_ray.config import load_config
    return load_config(None, [f"input.manifest={manifest}", f"output.root={out}", f"model.id={MODEL}",
                              f"model.batch_size={BATCH}", f"model.device={DEVICE}",
                              f"cache.dir={out.parent / 'cache'}",
                              f"input.reader={'auto' if DIRECT else 'openslide'}", *sets])


# --- the plain pool --------------------------------------------------------------------------------

_ENC = None


def _init(threads: int, encode: bool, model: str, batch: int, direct: bool) -> None:
    global _ENC, MODEL, BATCH, DIRECT
    MODEL, BATCH, DIRECT = model, batch, direct   # spawned processes start from the module's defaults
    import cv2
    import torch
    torch.set_num_threads(threads)
    cv2.setNumThreads(threads)
    if not encode:
        return
    from zeus_ray.config import ModelConfig
    from zeus_ray.encoders.registry import load_encoder
    _ENC = load_encoder(ModelConfig(id=MODEL, batch_size=BATCH, device="cpu"))


def _slide(row) -> int:
    """Plan, read (one read per region, resized once) and encode one slide (only read with
    `_ENC` None: the GPU mode's reading bound); no writes."""
    import numpy as np
    import openslide
    from zeus_ray.config import JobConfig
    from zeus_ray.slides.region_reader import plan_regions, read_region_tiles
    from zeus_ray.slides.tiff_levels import TiffLevels
    from zeus_ray.slides.planning import plan_slide
    sid, uri = row
    plan = plan_slide(uri, sid, JobConfig())
    slide = openslide.OpenSlide(uri)
    tiff = TiffLevels.open(uri, slide) if DIRECT else None   # zeus's reads: straight from the TIFF tiles
    n, buf = 0, []
    for r in plan_regions(plan.tiles, plan.grid, 8):
        buf.append(read_region_tiles(slide, plan.grid, r, tiff=tiff)[1])
        if sum(len(b) for b in buf) >= BATCH:
            n += len(_ENC.encode_images(np.concatenate(buf))) if _ENC else sum(len(b) for b in buf)
            buf = []
    if buf:
        n += len(_ENC.encode_images(np.concatenate(buf))) if _ENC else sum(len(b) for b in buf)
    slide.close()
    if tiff is not None:
        tiff.close()
    return n


def plain_pool(rows, procs: int, encode: bool = True) -> tuple[int, float]:
    t0 = time.perf_counter()
    with mp.get_context("spawn").Pool(procs, initializer=_init, initargs=(1, encode, MODEL, BATCH, DIRECT)) as pool:
        n = sum(pool.imap_unordered(_slide, rows, chunksize=1))
    return n, time.perf_counter() - t0


# --- measurement helpers ---------------------------------------------------------------------------

def tree_pss(root: psutil.Process) -> int:
    """PSS summed over `root` and all its descendants (processes that end meanwhile count 0)."""
    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_full_info().pss
        except (psutil.Error, OSError):
            pass
    return total


class Sampler:
    """Peak of the summed PSS of this process and all its descendants, and of this process's RSS."""

    def __init__(self, every: float = 0.5):
        self.every, self.peak_pss, self.peak_rss, self.stop = every, 0, 0, threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        me = psutil.Process()
        while not self.stop.is_set():
            self.peak_pss = max(self.peak_pss, tree_pss(me))
            self.peak_rss = max(self.peak_rss, me.memory_info().rss)
            self.stop.wait(self.every)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def du(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def zeus(manifest: Path, out: Path, *sets: str) -> dict:
    from zeus_ray.engine.driver import run_cohort
    shutil.rmtree(out, ignore_errors=True)
    with Sampler() as s:
        t0 = time.perf_counter()
        summary = run_cohort(config(manifest, out, *sets), progress=False)
        wall = time.perf_counter() - t0
    assert summary.failed == 0, [r["error"] for r in summary.rows if r["status"] == "failed"][:3]
    run = json.loads(next(out.glob("cohort/*/run.json")).read_text())
    return {"tiles": summary.tiles_encoded, "wall": wall, "slides": summary.ok, "pss": s.peak_pss,
            "driver_rss": s.peak_rss, "bytes": du(out / "slides"), "timing": summary.timing,
            "pool": summary.pool, "report_bytes": next(out.glob("cohort/*/report.html")).stat().st_size,
            "cohort_seconds": run.get("cohort_seconds", {}), "phases": run.get("driver_seconds", {})}


def ray_start_stop() -> float:
    """Seconds to start and stop the local Ray `zeus run` starts, with nothing run on it (its start
    includes prestarting one Python worker per CPU, which zeus's encoder actors then use)."""
    import ray

    from zeus_ray.config import load_config
    from zeus_ray.engine.cluster import init_ray
    t0 = time.perf_counter()
    init_ray(load_config(None, []))
    ray.shutdown()
    return time.perf_counter() - t0


def stage_table(z: dict) -> list[str]:
    rows = ["| stage | CPU ms per tile | wall ms per tile (summed over workers) |", "| --- | --- | --- |"]
    for stage, (wall, cpu) in sorted(z["timing"].items(), key=lambda kv: -kv[1][1]):
        rows.append(f"| {stage} | {1000 * cpu / z['tiles']:.2f} | {1000 * wall / z['tiles']:.2f} |")
    return rows


def run_cohort_pair(name: str, repeat: int, limit: int | None = None) -> list[str]:
    n, w, h, folder = COHORTS[name]
    n = min(n, limit or n)
    paths = make_overhead_cohort(n, w, h, folder)
    rows = [(p.stem, str(p)) for p in paths]
    procs = os.cpu_count()
    lines = []
    for i in range(repeat):
        # CPU: the pool reads and encodes. GPU: the pipeline cannot beat reading alone on every core
        # (nor the encoder alone, measured by bench_gpu_encoder.py), so the pool only reads.
        tiles_p, wall_p = plain_pool(rows, procs, encode=DEVICE == "cpu")
        fixed = ray_start_stop()
        z = zeus(folder / "manifest.csv", HERE / "_work" / f"overhead-out-{name}", *EXTRA_SETS)
        assert z["tiles"] == tiles_p, (z["tiles"], tiles_p)
        ratio = (z["tiles"] / z["wall"]) / (tiles_p / wall_p)
        lines.append(f"| {i + 1} | {tiles_p} | {wall_p:.1f} s ({tiles_p / wall_p:.0f} tiles/s) | "
                     f"{z['wall']:.1f} s ({z['tiles'] / z['wall']:.0f} tiles/s) | **{ratio:.2f}** | "
                     f"{z['pss'] / 2**30:.2f} GiB | {z['bytes'] / z['slides'] / 1e6:.2f} MB | "
                     f"{z['driver_rss'] / 2**20:.0f} MiB | {fixed:.1f} s ({fixed / wall_p:.0%}) |")
        print(lines[-1], flush=True)
    head = [f"Cohort `{name}`: {n} synthetic 20x slides of {w} × {h} px ({tiles_p} tiles at 10x, 448 px, "
            f"stride 112); encoder `{MODEL}`, batch {BATCH}, CPU; plain pool: {procs} processes; zeus pool: "
            f"{z['pool']}.", "",
            "| run | tiles | plain pool | zeus run | ratio | zeus peak PSS (all processes) | written per slide | "
            "driver peak RSS | local Ray started and stopped, nothing run (share of the plain pool's time) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    return head + lines + ["", f"zeus run's stages (run {repeat}), from the workers' own clocks:", ""] + \
        stage_table(z) + ["", "Driver phases (wall s): " + ", ".join(f"{k} {v:.1f}" for k, v in z["phases"].items()),
                          "", f"Report: {z['report_bytes'] / 1e6:.2f} MB; cohort tables and report: "
                              f"{json.dumps(z['cohort_seconds'])} s.", ""]


def scale(ns: list[int]) -> list[str]:
    """Each size in a fresh process (a clean driver): driver peak RSS, slides/s, cohort outputs."""
    _, w, h, folder = COHORTS["small"]
    make_overhead_cohort(max(ns), w, h, folder)
    out = ["| slides | tiles | wall | slides/s | driver peak RSS | all processes peak PSS | report | "
           "cohort tables + report |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for n in ns:
        reader = "auto" if DIRECT else "openslide"
        p = subprocess.run([sys.executable, __file__, "--one-scale", str(n), "--reader", reader],
                           capture_output=True, text=True, check=True)
        z = json.loads(p.stdout.strip().splitlines()[-1])
        out.append(f"| {n} | {z['tiles']} | {z['wall']:.0f} s | {z['slides'] / z['wall']:.2f} | "
                   f"{z['driver_rss'] / 2**20:.0f} MiB | {z['pss'] / 2**30:.2f} GiB | "
                   f"{z['report_bytes'] / 1e6:.2f} MB | {sum(z['cohort_seconds'].values()):.1f} s |")
        print(out[-1], flush=True)
    return out


def one_scale(n: int) -> None:
    _, w, h, folder = COHORTS["small"]
    manifest = folder / f"manifest-{n}.csv"
    lines = (folder / "manifest.csv").read_text().splitlines()
    manifest.write_text("\n".join(lines[:n + 1]) + "\n")
    z = zeus(manifest, HERE / "_work" / f"overhead-out-scale-{n}")
    z.pop("timing")
    print(json.dumps(z))


def main() -> None:
    global DEVICE, MODEL, BATCH, DIRECT
    ap = argparse.ArgumentParser()
    ap.add_argument("--cohort", choices=sorted(COHORTS), action="append", default=[])
    ap.add_argument("--repeat", type=int, default=1)
    ap.add_argument("--slides", type=int, help="only the first N slides of a cohort (smoke checks)")
    ap.add_argument("--scale", type=int, nargs="*", default=[])
    ap.add_argument("--one-scale", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--write", action="store_true", help="write the figures into benchmarks/RESULTS.md")
    ap.add_argument("--device", default="cpu", help="cpu, or cuda (the pool then only reads: a reading bound)")
    ap.add_argument("--model", default=MODEL)
    ap.add_argument("--batch", type=int, default=BATCH)
    ap.add_argument("--out", help="also write the text to this file")
    ap.add_argument("--set", action="append", default=[], dest="sets", metavar="KEY=VALUE",
                    help="config for zeus run only, e.g. ray.fuse_read_encode=off (the split shape)")
    ap.add_argument("--reader", choices=["auto", "openslide"], default="auto",
                    help="input.reader for zeus and the same reads in the plain pool")
    a = ap.parse_args()
    DEVICE, MODEL, BATCH, DIRECT = a.device, a.model, a.batch, a.reader == "auto"
    EXTRA_SETS[:] = a.sets
    if a.one_scale:
        return one_scale(a.one_scale)
    load = open("/proc/loadavg").read().split()[:3]
    text = ["## Pipeline overhead against a plain process pool (issue #11)", "",
            f"Machine: {machine()}; load average at start {' '.join(load)}.", ""]
    for name in a.cohort:
        text += [f"Command: `.venv/bin/python benchmarks/bench_overhead.py --cohort {name} --repeat {a.repeat}"
                 f" --reader {a.reader}{''.join(' --set ' + x for x in a.sets)}` (reads {'straight from the TIFF tiles' if DIRECT else 'through OpenSlide'}"
                 " on both sides)", ""]
        text += run_cohort_pair(name, a.repeat, a.slides)
    if a.scale:
        text += [f"Command: `.venv/bin/python benchmarks/bench_overhead.py --scale {' '.join(map(str, a.scale))}` "
                 f"(small slides of {COHORTS['small'][1]} × {COHORTS['small'][2]} px, each size in a fresh process)", ""]
        text += scale(a.scale)
    print("\n".join(text))
    if a.out:
        Path(a.out).write_text("\n".join(text) + "\n")
    if a.write:
        replace_section(text[0], "\n".join(text))


if __name__ == "__main__":
    main()
