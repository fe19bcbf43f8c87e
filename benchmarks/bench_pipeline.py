"""Issue #4 benchmark: pipeline end-to-end tiles/s against the encoder alone, in one run.

Both are measured on the same local Ray cluster with the same model, batch size, dtype and the same
resources for the encoder actor (so the ratio says how much of the encoder's throughput the
streaming read → encode → write → reduce pipeline keeps). Also: peak memory (RSS of all
processes) during the pipeline run, and the per-slide reduce core (cosine + overlap averaging +
argmax) against tile count.

    .venv/bin/python benchmarks/bench_pipeline.py --write
"""
from __future__ import annotations

import argparse
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import psutil

HERE = Path(__file__).resolve().parent
from _results import machine, replace_section  # noqa: E402

WORK = HERE / "_work" / "pipeline"


def make_cohort(n: int, width: int, height: int) -> Path:
    from zeus_ray.demo import write_qupath_geojson
    from zeus_ray.synthetic import write_synthetic_slide
    WORK.mkdir(parents=True, exist_ok=True)
    rows = ["slide_id,uri,annotation_uri,dataset,center"]
    for i in range(n):
        sid = f"bench-{i}"
        if not (WORK / f"{sid}.svs").exists():
            s = write_synthetic_slide(WORK / f"{sid}.svs", width, height, 0.5, seed=100 + i)
            write_qupath_geojson(WORK / f"{sid}.geojson", s.lesions)
        rows.append(f"{sid},{sid}.svs,{sid}.geojson,bench,{'AB'[i % 2]}")
    (WORK / "manifest.csv").write_text("\n".join(rows) + "\n")
    return WORK / "manifest.csv"


def encoder_alone(model_cfg, enc_cpus: int, batch: int, n_batches: int, tiles: np.ndarray) -> float:
    """Tiles/s of the same encoder in a Ray actor with the same CPUs, fed from memory."""
    import ray

    @ray.remote(num_cpus=enc_cpus)
    class Enc:
        def __init__(self, cfg):
            from zeus_ray.encoders.registry import load_encoder
            self.e = load_encoder(cfg)

        def run(self, x, n):
            self.e.encode_images(x)               # warm-up
            t0 = time.perf_counter()
            for _ in range(n):
                self.e.encode_images(x)
            return len(x) * n / (time.perf_counter() - t0)

    actor = Enc.remote(model_cfg)
    rate = ray.get(actor.run.remote(tiles[:batch], n_batches))
    ray.kill(actor)
    return rate


def reduce_core_ms(n_tiles: int, dim: int = 512, n_cls: int = 2, reps: int = 5) -> float:
    from zeus_ray.rasterise import argmax_mask, average_maps, cell_geometry, grid_shape
    from zeus_ray.slide_reduce import cosine_scores
    side = int(np.ceil(np.sqrt(n_tiles)))
    rr, cc = np.divmod(np.arange(side * side)[:n_tiles], side)
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(n_tiles, dim)).astype(np.float16).astype(np.float32)
    cm = rng.normal(size=(n_cls, dim)).astype(np.float32)
    geom = cell_geometry(448, 112)
    shape = grid_shape(side, side, geom)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        maps, _ = average_maps(rr, cc, cosine_scores(emb, cm), shape, geom)
        argmax_mask(maps)
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=4)
    ap.add_argument("--size", type=int, nargs=2, default=(7200, 5400), help="level-0 px (20x)")
    ap.add_argument("--model", default="random:vit_base_patch16_224")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--write", action="store_true", help="append the figures to benchmarks/RESULTS.md")
    args = ap.parse_args()

    import ray

    from zeus_ray.config import load_config
    from zeus_ray.pipeline import run_cohort
    from zeus_ray.ray_stages import pool_settings

    manifest = make_cohort(args.slides, *args.size)
    out = WORK / "out"
    shutil.rmtree(out, ignore_errors=True)
    cfg = load_config(None, [f"input.manifest={manifest}", f"output.root={out}", f"model.id={args.model}",
                             f"model.dtype={args.dtype}", f"model.batch_size={args.batch}",
                             f"cache.dir={WORK / 'cache'}"])
    ray.init(include_dashboard=False, configure_logging=False, log_to_driver=False)
    n_enc, enc_args, batch, n_read = pool_settings(cfg)

    peak = [0]
    stop = threading.Event()

    def sample():
        while not stop.is_set():
            rss = sum(p.memory_info().rss for p in psutil.process_iter() if p.is_running())
            peak[0] = max(peak[0], rss)
            time.sleep(0.2)

    t = threading.Thread(target=sample, daemon=True)
    base_rss = sum(p.memory_info().rss for p in psutil.process_iter())
    t.start()
    summary = run_cohort(cfg, progress=False)
    stop.set()
    t.join()
    pipe_rate = summary.tiles_encoded / summary.seconds

    from zeus_ray.region_reader import plan_regions, read_region_tiles
    from zeus_ray.tiles_stage import plan_slide
    plan = plan_slide(str(WORK / "bench-0.svs"), "bench-0", cfg)
    import openslide
    slide = openslide.OpenSlide(str(WORK / "bench-0.svs"))
    _, tiles = read_region_tiles(slide, plan.grid, plan_regions(plan.tiles, plan.grid, 8, "bench-0")[0])
    n_batches = max(3, int(summary.tiles_encoded // batch // 4))
    enc_rate = encoder_alone(cfg.model, enc_args.get("num_cpus", 1), batch, n_batches, tiles)
    ray.shutdown()

    reduce_rows = [(n, reduce_core_ms(n)) for n in (1_000, 10_000, 50_000, 100_000)]
    full_reduce = sorted((r["n_tiles"], r["reduce_seconds"]) for r in summary.rows if r.get("reduce_seconds"))
    lines = [
        "## Pipeline (issue #4)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_pipeline.py --write` ({args.slides} synthetic 20x slides of "
        f"{args.size[0]} × {args.size[1]} px, 448 px tiles at 10x, 75 % overlap; encoder `{args.model}` "
        f"({args.dtype}, batch {batch}), one CPU encoder actor with {enc_args.get('num_cpus')} CPU, {n_read} reader task slot(s)).",
        f"Machine: {machine()}, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; local Ray {ray.__version__}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| tiles encoded by the pipeline | {summary.tiles_encoded} |",
        f"| pipeline end-to-end (plan, read, encode, write, reduce, cohort tables; includes Ray Data start-up) | {pipe_rate:.2f} tiles/s ({summary.seconds:.1f} s) |",
        f"| encoder alone, same model/batch/dtype/CPUs, in a Ray actor, tiles in memory | {enc_rate:.2f} tiles/s |",
        f"| **ratio pipeline / encoder alone** | **{pipe_rate / enc_rate:.2f}** (goal ≥ 0.9) |",
        f"| peak RSS of all processes during the run (before: {base_rss / 2**30:.2f} GiB) | {peak[0] / 2**30:.2f} GiB |",
        "",
        "Reduce core per slide (cosine of float16-stored embeddings with 2 class vectors, overlap averaging on",
        "the cell grid, argmax), median of 5, D = 512:",
        "",
        "| tiles | ms |",
        "| --- | --- |",
        *[f"| {n:,} | {ms:.1f} |" for n, ms in reduce_rows],
        "",
        "Whole per-slide reduce task in the run above (also writes Parquet tables, mask PNGs, maps, pyramidal",
        "TIFFs, GeoJSON, heat-maps, overlay, metrics): " + ", ".join(f"{n} tiles: {s:.2f} s" for n, s in full_reduce) + ".",
        "",
    ]
    text = "\n".join(lines)
    print(text)
    if args.write:
        replace_section('## Pipeline (issue #4)', text)


if __name__ == "__main__":
    main()
