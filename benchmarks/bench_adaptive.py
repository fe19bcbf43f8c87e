"""Boundary-adaptive overlap (issue #7) against full overlap: mask agreement and tiles encoded.

Every kept tile of every slide is encoded ONCE (full overlap; embeddings cached under
benchmarks/_work/adaptive/); the adaptive mode is then simulated by revealing the cached scores only
for the positions it asks for. That is exact: a tile's embedding does not depend on which other
tiles are encoded.

Slides: the two real H&E slides of tests/data/slides (CMU-1-Small-Region.svs;
TCGA-CR-7395-01A-01-TS1.svs with an mpp override of 0.25) and a synthetic 20x cohort
(_adaptive_slides.py) with lesions of several shapes and sizes (large and small blobs, islands smaller than a tile, a thin
band, a star, a ring with a hole, a cluster, an excision-sized slide). Encoder: a seeded random-weight
ViT (`random:<timm name>:<seed>`; seed 9 chosen as RESULTS.md says) with the AI4SKIN prompt
ensemble; default tiling (10x, 448 px, stride 112). `--scale` adds a whole-slide-size synthetic
slide, reported apart.

    .venv/bin/python benchmarks/bench_adaptive.py [--model random:vit_small_patch16_224:9]
        [--margins 0,0.002,...,inf] [--dilations 0,1,2] [--scale] [--prepare-only] [--write benchmarks/RESULTS.md]

Building the cache took ~8 min on 2 shared cores; later runs take seconds.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _adaptive_slides import WORK, scale_cohort, slide_entries, write_cohort  # noqa: E402
from _results import machine, replace_section  # noqa: E402

from zeus_ray.maps.selection import PassState, Selection, cell_maps, converge  # noqa: E402
from zeus_ray.config import JobConfig, ModelConfig  # noqa: E402
from zeus_ray.maps.rasterise import argmax_mask, cell_geometry, grid_shape, resample_mask_to_grid  # noqa: E402

PROMPTS = ROOT / "prompts" / "ai4skin-leiomyoma.yaml"
SECTION = "## Adaptive overlap (issue #7)"


def encode_slide(entry: dict, cfg: JobConfig, encoder) -> dict:
    """Plan the slide, encode every kept tile once (cached as .npz with the seconds it took)."""
    import openslide
    from zeus_ray.slides.region_reader import plan_regions, read_region_tiles
    from zeus_ray.slides.planning import plan_slide

    plan = plan_slide(entry["uri"], entry["slide_id"], cfg, entry["mpp"])
    model = encoder.model_key.replace(":", "_")
    cache = WORK / "embeddings" / f"{entry['slide_id']}-{plan.tiling_key[:12]}-{model}.npz"
    tiles = plan.tiles.sort_by("tile_id")
    rows, cols = tiles["grid_row"].to_numpy().astype(np.int64), tiles["grid_col"].to_numpy().astype(np.int64)
    if not cache.exists():
        t0 = time.perf_counter()
        slide = openslide.OpenSlide(entry["uri"])
        ids, parts = [], []
        for region in plan_regions(tiles, plan.grid, cfg.tiling.region_tiles):
            tid, imgs = read_region_tiles(slide, plan.grid, region)
            ids.append(tid)
            parts.append(encoder.encode_images(imgs))
        slide.close()
        emb = np.concatenate(parts)[np.argsort(np.concatenate(ids))]
        seconds = time.perf_counter() - t0
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_suffix(".tmp.npz")
        np.savez(tmp, embeddings=emb, tile_id=tiles["tile_id"].to_numpy(), seconds=seconds)
        os.replace(tmp, cache)
        print(f"  {entry['slide_id']}: read + encoded {len(emb)} tiles in {seconds:.0f} s", flush=True)
    cached = np.load(cache)
    if not np.array_equal(cached["tile_id"], tiles["tile_id"].to_numpy()):
        raise SystemExit(f"{cache}: tiles differ from the slide's plan; delete the file and re-run")
    geom = cell_geometry(plan.grid.patch_size, plan.grid.stride)
    shape = grid_shape(plan.grid.n_rows, plan.grid.n_cols, geom)
    tissue = resample_mask_to_grid(plan.tissue.mask, plan.tissue.mpp, shape, geom.cell * plan.grid.target_mpp)
    kept = np.zeros((plan.grid.n_rows, plan.grid.n_cols), bool)
    kept[rows, cols] = True
    return {"entry": entry, "plan": plan, "rows": rows, "cols": cols, "emb": cached["embeddings"],
            "seconds": float(cached["seconds"]) if "seconds" in cached else None, "kept": kept, "tissue": tissue}


def labels_of(encoded, scores, tissue, patch, stride):
    maps, _ = cell_maps(encoded, scores, patch, stride)
    return argmax_mask(maps, valid=tissue)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    s = a.sum() + b.sum()
    return 1.0 if s == 0 else float(2 * np.logical_and(a, b).sum() / s)


def contour_length(labels: np.ndarray) -> int:
    """Cell sides between two tissue cells of different label."""
    v = labels >= 0
    return int((v[:, 1:] & v[:, :-1] & (labels[:, 1:] != labels[:, :-1])).sum()
               + (v[1:] & v[:-1] & (labels[1:] != labels[:-1])).sum())


def simulate(slide: dict, tumour: int, margin: float, dilation: int, disagreement: bool, coarse_first: bool) -> dict:
    """Adaptive run revealing the cached scores; compared with full overlap on the tissue cells."""
    g = slide["plan"].grid
    scores, full = slide["grid_scores"], slide["full"]
    # The selection `zeus run` executes (selection.PassState), the cached scores standing in for the encoder.
    state = PassState(slide["kept"], slide["tissue"], Selection("adaptive", g.patch_size, g.stride, margin, dilation,
                                                                 disagreement, coarse_first), scores.shape[2])
    converge(state, lambda r, c, _p: scores[r, c])
    ada = labels_of(state.encoded, state.scores, slide["tissue"], g.patch_size, g.stride)
    inside = full >= 0
    return {"dice": dice(ada == tumour, full == tumour),
            "dice_other": dice(inside & (ada != tumour), inside & (full != tumour)),
            "mismatch": float((ada != full)[inside].mean()) if inside.any() else 0.0,
            "cells_differing": int((ada != full)[inside].sum()),
            "encoded": state.n_encoded, "full": int(slide["kept"].sum()), "passes": state.n_passes,
            "counts": np.bincount(state.passes.ravel(), minlength=state.n_passes + 1)[1:].tolist()}


def parse_floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",")]


def summarise(rows: list[dict]) -> dict:
    enc, full = sum(r["encoded"] for r in rows), sum(r["full"] for r in rows)
    return {"mean": float(np.mean([r["dice"] for r in rows])), "min": min(r["dice"] for r in rows),
            "min_other": min(r["dice_other"] for r in rows),
            "mismatch": max(r["mismatch"] for r in rows), "frac": enc / full,
            "max_slide_frac": max(r["encoded"] / r["full"] for r in rows),
            "passes": max(r["passes"] for r in rows), "encoded": enc, "full": full}


def fmt_margin(m: float) -> str:
    return "inf" if math.isinf(m) else f"{m:g}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="random:vit_small_patch16_224:9")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--margins", type=parse_floats, default=[0, 0.001, 0.002, 0.003, 0.005, 0.01, 0.02, 0.05, math.inf])
    ap.add_argument("--dilations", type=lambda s: [int(v) for v in s.split(",")], default=[0, 1, 2])
    ap.add_argument("--goal-dice", type=float, default=0.98)
    ap.add_argument("--prepare-only", action="store_true", help="write slides and cache embeddings, then stop")
    ap.add_argument("--scale", action="store_true", help="also measure the whole-slide-size slide (reported apart; "
                    "encoding it the first time takes ~30 min on 2 cores)")
    ap.add_argument("--write", type=Path, help="replace this benchmark's section of that RESULTS.md")
    args = ap.parse_args()

    from zeus_ray.encoders.registry import load_encoder
    from zeus_ray.prompts import class_embeddings, load_prompt_set
    from zeus_ray.results.reduce import cosine_scores

    t_start = time.perf_counter()
    encoder = load_encoder(ModelConfig(id=args.model, device="cpu", dtype=args.dtype, batch_size=args.batch))
    prompts = load_prompt_set(PROMPTS)
    slides = [encode_slide(e, JobConfig(), encoder) for e in slide_entries()]
    scale = [encode_slide(e, JobConfig(), encoder) for e in write_cohort(scale_cohort())] if args.scale else []
    if args.prepare_only:
        return
    w = class_embeddings(encoder, prompts)
    tumour = prompts.tumour_index
    for s in slides + scale:
        g = s["plan"].grid
        s["grid_scores"] = np.full((*s["kept"].shape, len(w)), np.nan)
        s["grid_scores"][s["rows"], s["cols"]] = cosine_scores(s["emb"], w)
        s["full"] = labels_of(s["kept"], s["grid_scores"], s["tissue"], g.patch_size, g.stride)

    # Coarse-first (the default) over margins × dilations; then at dilation 0 without coarse-first,
    # and with the disagreement criterion.
    keys = ([(m, d, False, True) for m in args.margins for d in args.dilations]
            + [(m, 0, False, False) for m in args.margins] + [(m, 0, True, True) for m in args.margins])
    grid = {k: [simulate(s, tumour, *k) for s in slides] for k in keys}
    summ = {k: summarise(v) for k, v in grid.items()}
    ok = [k for k, v in summ.items() if min(v["min"], v["min_other"]) >= args.goal_dice]
    best = min(ok, key=lambda k: (summ[k]["frac"], -summ[k]["min_other"])) if ok else None
    # The whole-slide-size slide, at the default chosen above and without coarse first.
    scale_rows = {k: [simulate(s, tumour, *k) for s in scale] for k in ([best, (*best[:3], not best[3])]
                                                                      if scale and best else [])}
    write_report(args, slides, grid, summ, best, prompts, tumour, time.perf_counter() - t_start, scale, scale_rows)


def write_report(args, slides, grid, summ, best, prompts, tumour, seconds, scale=(), scale_rows=None) -> None:
    names = [s["entry"]["slide_id"] for s in slides]
    enc_s = [s["seconds"] for s in slides]
    lines = [SECTION, "",
             "Adaptive mode (`zeus_ray/maps/selection.py`, the selection `zeus run` executes) against full overlap, same slides, same encoder. Every kept "
             "tile is encoded once (full overlap); the adaptive mode is simulated by revealing those scores only "
             "for the positions it asks for (exact: a tile's embedding does not depend on other tiles).", "",
             f"- Command: `cd /work/main && .venv/bin/python benchmarks/bench_adaptive.py "
             f"{'--scale ' if scale else ''}--write benchmarks/RESULTS.md` ({seconds:.0f} s with the embeddings cached in benchmarks/_work/adaptive/"
             + (f"; building that cache (read + encode, {sum(len(s['rows']) for s in slides)} tiles) took "
                f"{sum(enc_s):.0f} s" if all(v is not None for v in enc_s) else "") + ").",
             f"- Encoder: `{args.model}` ({args.dtype} autocast, CPU): timm ViT-S/16 (224 px input) with seeded "
             "random weights and the built-in hashed-word text tower; prompts `prompts/ai4skin-leiomyoma.yaml` "
             f"(tumour class `{prompts.class_names[tumour]}`). Tiling: 10x, 448 px, stride 112 (75 % overlap), "
             "tissue fraction ≥ 0.25. Cells: 112 µm.",
             "- Why this encoder: random weights carry no semantics whatever the size, but a random ViT's "
             "embedding follows the image content, so its maps have real spatial structure (lesions, tissue "
             "edges, texture). ViT-S/16 ran 1.6× faster than ViT-B/16 side by side (5.9 against 3.6 tiles/s, bf16, "
             "batch 32, this shared CPU under load), which is what let the cohort reach 6,457 tiles within the "
             "~10 min encoding budget.",
             "- Seed: with the AI4SKIN prompts, 7 of the seeds 0–15 gave one class on every tile of a 92-tile "
             "sample (16 tiles from each real slide, 10 lesion and 10 lesion-free tiles from each of the first "
             "three synthetic slides); seed 9 was taken, before this study ran, as the seed with the largest "
             "lesion-vs-lesion-free separation of the tumour-minus-normal score among those whose sample had "
             "20–80 % tumour tiles. With it the lesions come out as `normal` and the lesion-free tissue as "
             "`tumor` (tumour fractions below), so `Dice N` is the lesion-level figure; the goal is judged on "
             "the smaller of the two.",
             f"- Machine: {machine()}, shared with other jobs.",
             "- `Dice T`: tumour-class mask against full overlap's, on the tissue cells; `Dice N`: the same for the "
             "other class (the complement inside tissue); `cells differing`: largest fraction of tissue cells with "
             "another label on any slide; `encoded`: tiles encoded / tiles full overlap encodes, all slides pooled; "
             "`worst slide`: the largest per-slide fraction; `passes`: most passes on any slide.", "",
             "Slides (full overlap). Contour: cell sides between tissue cells of different label.", "",
             "| slide | kind | grid | kept tiles | tumour fraction of tissue | contour (cell sides) "
             "| contour per 100 tiles |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for s in slides:
        g, full = s["plan"].grid, s["full"]
        c = contour_length(full)
        lines.append(f"| {s['entry']['slide_id']} | {s['entry']['kind']} | {g.n_rows} × {g.n_cols} | "
                     f"{s['kept'].sum()} | {(full == tumour)[full >= 0].mean():.2f} | {c} | "
                     f"{100 * c / s['kept'].sum():.1f} |")
    lines += ["", "| margin | dilation | disagreement | coarse first | mean Dice T | min Dice T | min Dice N "
              "| cells differing | encoded | × fewer | worst slide | passes |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (m, d, dis, cf), v in summ.items():
        tag = " (default)" if (m, d, dis, cf) == best else ""
        lines.append(f"| {fmt_margin(m)}{tag} | {d} | {'yes' if dis else 'no'} | {'yes' if cf else 'no'} | "
                     f"{v['mean']:.4f} | {v['min']:.4f} | "
                     f"{v['min_other']:.4f} | {v['mismatch']:.4f} | {v['frac']:.3f} | {1 / v['frac']:.1f} | "
                     f"{v['max_slide_frac']:.3f} | {v['passes']} |")
    lines += ["", "Per slide, dilation 0, no disagreement criterion: encoded fraction / min(Dice T, Dice N).", "",
              "| margin | coarse first | " + " | ".join(names) + " |", "| --- | --- |" + " --- |" * len(names)]
    for (m, d, dis, cf), rows in grid.items():
        if d == 0 and not dis:
            lines.append(f"| {fmt_margin(m)} | {'yes' if cf else 'no'} | " + " | ".join(
                f"{r['encoded'] / r['full']:.3f} / {min(r['dice'], r['dice_other']):.4f}" for r in rows) + " |")
    if best is not None:
        lines += ["", f"Per slide at the default (margin {fmt_margin(best[0])}, dilation {best[1]}, disagreement "
                  f"{'on' if best[2] else 'off'}, coarse first {'on' if best[3] else 'off'}: the setting with "
                  f"the fewest tiles whose Dice T and Dice N are ≥ {args.goal_dice} on every slide):", "",
                  "| slide | Dice T | Dice N | cells differing | encoded / full | × fewer | tiles per pass "
                  "| refined tiles per contour side |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for s, r in zip(slides, grid[best]):
            c = contour_length(s["full"])
            per = f"{(r['encoded'] - r['counts'][0]) / c:.1f}" if c and r["counts"] else "–"
            lines.append(f"| {s['entry']['slide_id']} | {r['dice']:.4f} | {r['dice_other']:.4f} | "
                         f"{r['cells_differing']} | {r['encoded']} / "
                         f"{r['full']} | {r['full'] / r['encoded']:.1f} | {', '.join(map(str, r['counts']))} | {per} |")
        v = summ[best]
        margins = np.concatenate([np.abs(np.diff(np.sort(sl["grid_scores"][sl["kept"]], axis=1)[:, -2:], axis=1))[:, 0]
                                  for sl in slides])
        q = np.percentile(margins, [25, 50, 75])
        same_dice = all([(r["dice"], r["dice_other"]) for r in grid[(best[0], d, *best[2:])]]
                        == [(r["dice"], r["dice_other"]) for r in grid[best]]
                        for d in args.dilations if (best[0], d, *best[2:]) in grid)
        plain = summ.get((best[0], best[1], best[2], not best[3]))
        goal = "meets" if v["frac"] <= 0.25 else "falls short of"
        lines += ["", "Findings:", "",
                  f"- Default: margin {fmt_margin(best[0])}, dilation {best[1]}, disagreement "
                  f"{'on' if best[2] else 'off'}, coarse first {'on' if best[3] else 'off'}: {v['encoded']} of {v['full']} tiles ({v['frac']:.3f}, "
                  f"{1 / v['frac']:.1f}× fewer, pooled), min Dice {min(v['min'], v['min_other']):.4f} over both "
                  f"classes and all slides. This {goal} the issue's goal of 4× fewer tiles at Dice ≥ "
                  f"{args.goal_dice} on this cohort as a whole; per slide, see the table above.",
                  "- What costs tiles is contour, not area: beyond the first pass (1/16 of the tiles plus gap "
                  "fillers), each cell side of contour costs the few tiles that straddle it. Slides with little "
                  "contour per tile (the lesion-free CMU region, the excision-sized slide, the strip) save most; "
                  "small slides with several small lesions save least, and the 35-tile TCGA frozen section, whose "
                  "random-model map is speckled, saves nothing. For a given lesion layout contour grows with a "
                  "slide's side and tiles with its area, so larger slides save more"
                  + ("; the whole-slide-size slide below measures that." if scale_rows else
                     "; nothing beyond 3,402 tiles per slide was measured in this run (`--scale` adds a "
                     "whole-slide-size slide)."),
                  f"- Dilation 1 or 2 at margin {fmt_margin(best[0])} "
                  + ("changes no slide's Dice and only adds tiles." if same_dice else "changes the Dice (table).")
                  + " The only cells that differ at the default are those in the table above.",
                  "- The disagreement criterion of the issue (every tile over a cell whose covering encoded tiles "
                  "disagree) costs more tiles for the same Dice on this cohort (rows `yes`), so it is off by "
                  "default (`disagreement=True` turns it on).",
                  f"- The margin is in cosine units and model-specific: this random ViT's tile margins (best minus "
                  f"second-best cosine) have quartiles {q[0]:.4f} / {q[1]:.4f} / {q[2]:.4f}, so margins ≥ 0.01 "
                  "refine nearly every tile. Margin 0 (contours and uncovered tissue only) misses an island whose "
                  "first-pass tiles never say that class (syn-blobs, Dice N < 1); re-measure the margin for a real "
                  "model before relying on one.",
                  (f"- Coarse first: at margin {fmt_margin(best[0])}, dilation {best[1]}, locating the contour with "
                   f"half-overlapping tiles (positions every 2) before the fully-overlapping ones encodes "
                   f"{v['encoded']} tiles against {plain['encoded']} without it ({1 / v['frac']:.2f}× against "
                   f"{1 / plain['frac']:.2f}× fewer than full overlap), min Dice {min(v['min'], v['min_other']):.4f} "
                   f"against {min(plain['min'], plain['min_other']):.4f}; it takes up to {v['passes']} passes "
                   f"against {plain['passes']}." if plain else "- Coarse first: not compared in this run."),
                  "- In the pipeline a slide's next pass is selected as soon as its own pass is in, while the "
                  "long-lived encoder pool works on other slides (no per-pass job start-up).",
                  "- Time: encoding scales with the encoded fraction, reading does not (the first pass touches every "
                  "tissue block). The simulation encodes nothing: end-to-end times are in the section `Full against "
                  "adaptive overlap, end to end` below."]
    for k, rows in (scale_rows or {}).items():
        if k == best:
            lines += ["", "Whole-slide size (`--scale`; not in the pooled figures above, which chose the default): "
                      "the default against the same without coarse first.", "",
                      "| slide | kept tiles | contour per 100 tiles | coarse first | encoded / full | × fewer | "
                      "Dice T | Dice N | tiles per pass |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
        for sl, r in zip(scale, rows):
            c = contour_length(sl["full"])
            lines.append(f"| {sl['entry']['slide_id']} | {r['full']} | {100 * c / r['full']:.1f} | "
                         f"{'yes' if k[3] else 'no'} | {r['encoded']} / {r['full']} | {r['full'] / r['encoded']:.1f} | "
                         f"{r['dice']:.4f} | {r['dice_other']:.4f} | {', '.join(map(str, r['counts']))} |")
    if scale:
        lines += ["", f"Building the whole-slide-size slide's cache (read + encode, "
                  f"{sum(len(s['rows']) for s in scale)} tiles) took {sum(s['seconds'] or 0 for s in scale):.0f} s."]
    text = "\n".join(lines) + "\n"
    print(text)
    (WORK / "results.json").write_text(json.dumps(
        {f"{fmt_margin(k[0])}/{k[1]}/{k[2]}/{k[3]}": {"summary": summ[k], "slides": dict(zip(names, grid[k]))}
         for k in grid}, indent=1))
    if args.write:
        replace_section(SECTION, text, args.write)


if __name__ == "__main__":
    main()
