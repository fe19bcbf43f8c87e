"""Issue #6 benchmark: re-prompt throughput on a synthetic embedding store, and the incremental
run when nothing is missing.

The store is written with the project's own writers (tiles table with its grid, tissue mask,
display thumbnail, float16 embedding table, completion markers) for N slides of about T tiles
each; embeddings vary smoothly in space so that masks are blobs, as on real slides. No slide file
exists: a re-prompt must not need one.

    .venv/bin/python benchmarks/bench_reprompt.py --slides 100 --tiles 10000 --write
"""
from __future__ import annotations

import argparse
import io
import shutil
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
from PIL import Image

HERE = Path(__file__).resolve().parent
from _results import machine, replace_section  # noqa: E402

WORK = HERE / "_work" / "reprompt"
MODEL = "random:vit_tiny_patch16_224"


def build_store(n_slides: int, n_tiles: int, dim: int) -> tuple[Path, object]:
    from zeus_ray.config import load_config
    from zeus_ray.storage.parts import part_name, part_table
    from zeus_ray.storage.keys import slide_keys, tiling_key
    from zeus_ray.storage.store import OutputStore
    from zeus_ray.slides.planning import mpp_label
    from zeus_ray.slides.tiling import make_grid, tile_table
    from zeus_ray.slides.tissue import TissueMask

    shutil.rmtree(WORK, ignore_errors=True)
    out = WORK / "store"
    manifest = WORK / "manifest.csv"
    WORK.mkdir(parents=True)
    rows = ["slide_id,uri,dataset,center"] + [f"s{i:04d},/nonexistent/s{i:04d}.svs,bench,{'AB'[i % 2]}"
                                             for i in range(n_slides)]
    manifest.write_text("\n".join(rows) + "\n")
    cfg = load_config(None, [f"input.manifest={manifest}", f"output.root={out}", f"model.id={MODEL}"])
    store = OutputStore(str(out))
    side_px = int(np.sqrt(n_tiles) * 112 + 336) * 2           # level-0 px at 0.5 µm/px (20x)
    grid = make_grid(side_px, side_px, 0.5, 1.0, 448, 112)
    mask = np.ones((side_px // 16, side_px // 16), np.uint8)   # 8 µm/px, all tissue
    tiles0 = tile_table(grid, TissueMask(mask, 8.0), 0.25, "s0000")
    rr, cc = tiles0["grid_row"].to_numpy(), tiles0["grid_col"].to_numpy()
    display = np.full((mask.shape[0], mask.shape[1], 3), (228, 156, 196), np.uint8)
    buf = io.BytesIO()
    Image.fromarray(display).save(buf, format="JPEG")
    display_jpg = buf.getvalue()
    buf = io.BytesIO()
    Image.fromarray(mask * 255).save(buf, format="PNG")
    mask_png = buf.getvalue()
    rng = np.random.default_rng(0)
    base = rng.normal(size=(2, dim))
    tkey = tiling_key(cfg)
    model_key = f"{MODEL}@seed0"
    for i in range(n_slides):
        sid = f"s{i:04d}"
        keys = slide_keys(store, sid, None, tkey, model_key, "unused", "bench")
        tiles = tiles0.set_column(0, "slide_id", pa.array([sid] * len(tiles0), pa.string()))
        store.write_parquet(f"{keys.tiles_dir}/tiles.parquet", tiles)
        store.write_bytes(f"{keys.tiles_dir}/tissue_mask_{mpp_label(8.0)}mpp.png", mask_png)
        store.write_bytes(f"{keys.tiles_dir}/thumbnail_{mpp_label(8.0)}mpp.jpg", display_jpg)
        store.commit(keys.tiles_dir, {"slide_id": sid, "status": "ok", "source": "bench"})
        cy, cx = rng.uniform(0.3, 0.7, 2) * rr.max()
        blob = np.exp(-(((rr - cy) ** 2 + (cc - cx) ** 2) / (2 * (0.2 * rr.max()) ** 2)))
        emb = base[0] + (blob[:, None] - 0.5) * 2 * base[1] + 0.3 * rng.normal(size=(len(rr), dim))
        emb /= np.linalg.norm(emb, axis=1, keepdims=True)
        ids = tiles["tile_id"].to_numpy()
        store.write_parquet(f"{keys.emb_dir}/{part_name(1, ids[0])}",
                            part_table(sid, ids, grid.n_cols, 1, emb.astype(np.float32), keys.tiling_key, model_key,
                                       "float16"))
        store.commit(keys.emb_dir, {"slide_id": sid, "source": "bench"})   # the source of its key
    store.write_json(store.path("cohort", "seed", "run.json"), {"config": cfg.model_dump()})
    return out, len(tiles0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--slides", type=int, default=100)
    ap.add_argument("--tiles", type=int, default=10_000)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()

    from zeus_ray.commands.reprompt import reprompt_config
    from zeus_ray.engine.driver import run_cohort

    t0 = time.perf_counter()
    out, per_slide = build_store(args.slides, args.tiles, 512)
    build_s = time.perf_counter() - t0
    total = per_slide * args.slides
    cfg = reprompt_config(str(out), "prompts/metastasis.yaml", MODEL, [], None)
    s1 = run_cohort(cfg, progress=False, reprompt=True)
    assert s1.ok == args.slides and s1.tiles_encoded == 0, s1.line()
    s2 = run_cohort(cfg, progress=False, reprompt=True)          # nothing missing
    assert s2.skipped == args.slides
    rate = total / s1.seconds
    text = "\n".join([
        "## Re-prompting (issue #6)",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_reprompt.py --slides {args.slides} --tiles {args.tiles} --write`",
        f"(a synthetic embedding store of {args.slides} slides × {per_slide:,} tiles = {total:,} tiles, 512-d float16,",
        f"written in {build_s:.0f} s; prompts/metastasis.yaml on `{MODEL}` stored embeddings; local Ray started by the run).",
        f"Machine: {machine()}.",
        "",
        "| measure | value |",
        "| --- | --- |",
        f"| re-prompt, end to end (Ray start, text encoding, per-slide similarities, maps, masks, GeoJSON, viewer TIFFs, overlay, cohort tables, report) | {s1.seconds:.1f} s |",
        f"| tiles per second | {rate:,.0f} ({rate * 60 / 1e6:.2f} M tiles/min; goal ≥ 1 M/min) |",
        f"| seconds per 1,000 slides of {per_slide:,} tiles | {s1.seconds / args.slides * 1000:.0f} s |",
        f"| incremental run when nothing is missing ({args.slides} slides complete) | {s2.seconds:.1f} s |",
        "",
    ])
    print(text)
    if args.write:
        replace_section('## Re-prompting (issue #6)', text)


if __name__ == "__main__":
    main()
