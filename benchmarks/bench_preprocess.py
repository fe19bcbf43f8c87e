"""The split shape's CPU cost per tile on one core, preprocessing included (issue #19):

    .venv/bin/python benchmarks/bench_preprocess.py [--slides 2] [--write-results]

On 20x synthetic slides (the overhead cohort's, JPEG tiles), one thread throughout, CPU time per
448 px tile at 10x for: plan (tissue + grid), read (the region reader, decoding straight from the
TIFF tiles and resizing 20x → 10x), and each registered model's preprocessing (PIL-exact resize to
224 px for KEEP, PLIP and QuiltNet; CONCH takes 448 px and only crops), split into its CPU half
(resize + crop) and its device half (the normalise lookup, timed here on the CPU; on a GPU it runs
there). Then tiles/s one core supplies with plan + read + preprocessing, against the issue's goal of
500, and the cores a GPU encoding 2,000 tiles/s needs. Resizers that are not bit-exact are timed too,
with their largest difference from PIL, to show what bit-exactness costs.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from _overhead_cohort import make_overhead_cohort  # noqa: E402
from _results import machine, replace_section  # noqa: E402

SECTION = "## Preprocessing on one core: the split shape's reader-side cost per tile (issue #19)"
GPU_TILES_S = 2000
GOAL = 500


def _cpu_ms(fn, n_tiles: int, repeat: int = 3) -> float:
    """Median CPU ms per tile of `fn()` (which handles n_tiles tiles) over `repeat` calls."""
    out = []
    for _ in range(repeat):
        t0 = time.process_time()
        fn()
        out.append((time.process_time() - t0) * 1e3 / n_tiles)
    return float(np.median(out))


def plan_and_read(paths):
    """(plan ms/tile, read ms/tile, tiles, the read tiles of the first slide) with the default config,
    each slide on a fresh handle, as a reader task's first chunk of a slide."""
    import openslide

    from zeus_ray.config import load_config
    from zeus_ray.slides.planning import plan_slide
    from zeus_ray.slides.region_reader import plan_regions, read_region_tiles
    from zeus_ray.slides.tiff_levels import TiffLevels
    cfg = load_config(None, [])
    plan_s = read_s = 0.0
    n = 0
    first = None
    for p in paths:
        t0 = time.process_time()
        plan = plan_slide(str(p), p.stem, cfg)
        plan_s += time.process_time() - t0
        slide = openslide.OpenSlide(str(p))
        tiff = TiffLevels.open(str(p), slide)
        t0 = time.process_time()
        got = [read_region_tiles(slide, plan.grid, r, tiff=tiff)[1]
               for r in plan_regions(plan.tiles, plan.grid, cfg.tiling.region_tiles)]
        read_s += time.process_time() - t0
        n += plan.tiles.num_rows
        if first is None:
            first = np.concatenate(got)
    return plan_s * 1e3 / n, read_s * 1e3 / n, n, first


def preprocessing(tiles: np.ndarray) -> list[tuple[str, int, float, float]]:
    """(model, input px, resize+crop ms/tile, normalise ms/tile) for each registered model."""
    import torch

    from zeus_ray.encoders.preprocess import Preprocessor
    from zeus_ray.encoders.registry import MODELS
    rows = []
    for name, entry in MODELS.items():
        pre = Preprocessor(entry.spec, "cpu", threads=1)
        crop = pre.resize_crop(tiles).copy()
        resize = _cpu_ms(lambda: pre.resize_crop(tiles), len(tiles))
        norm = _cpu_ms(lambda: pre.normalise(torch.from_numpy(crop)).contiguous(), len(tiles))
        rows.append((name, entry.spec.input_size, resize, norm))
    return rows


def other_resizers(tiles: np.ndarray) -> list[tuple[str, float, int]]:
    """(resizer, ms/tile, largest |difference| from PIL bicubic) for 448 → 224 px."""
    import cv2
    import torch
    import torch.nn.functional as F
    from PIL import Image

    ref = np.stack([np.asarray(Image.fromarray(t).resize((224, 224), Image.BICUBIC)) for t in tiles])
    cands = {
        "PIL bicubic (the published transforms; bit-exact)":
            lambda: np.stack([np.asarray(Image.fromarray(t).resize((224, 224), Image.BICUBIC)) for t in tiles]),
        "PIL reduce(2) (box filter)": lambda: np.stack([np.asarray(Image.fromarray(t).reduce(2)) for t in tiles]),
        "OpenCV INTER_AREA": lambda: np.stack([cv2.resize(t, (224, 224), interpolation=cv2.INTER_AREA) for t in tiles]),
        "OpenCV INTER_CUBIC": lambda: np.stack([cv2.resize(t, (224, 224), interpolation=cv2.INTER_CUBIC) for t in tiles]),
        "torch interpolate bicubic, antialias (CPU)": lambda: F.interpolate(
            torch.from_numpy(tiles).permute(0, 3, 1, 2), size=(224, 224), mode="bicubic",
            antialias=True).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).numpy(),
    }
    rows = []
    for name, fn in cands.items():
        got = fn()
        diff = int(np.abs(got.astype(np.int16) - ref.astype(np.int16)).max())
        rows.append((name, _cpu_ms(fn, len(tiles)), diff))
    return rows


def device_resize(tiles: np.ndarray, device: str) -> tuple[str, float, int]:
    """(resizer, device ms/tile over a 256-tile batch, largest difference from PIL): the tensor
    version of PIL's bicubic (model.resize_on: device, the default on a GPU), timed on `device`."""
    import torch
    from PIL import Image

    from zeus_ray.encoders.resample import pil_resize
    ref = np.stack([np.asarray(Image.fromarray(t).resize((224, 224), Image.BICUBIC)) for t in tiles])
    x = torch.from_numpy(tiles).to(device)
    got = pil_resize(x, 224, 224).cpu().numpy()
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    times = []
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        pil_resize(x, 224, 224)
        sync()
        times.append((time.perf_counter() - t0) * 1e3 / len(tiles))
    diff = int(np.abs(got.astype(np.int16) - ref.astype(np.int16)).max())
    return f"zeus pil_resize as torch ops on {device} (wall, not CPU)", float(np.median(times)), diff


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--slides", type=int, default=2)
    ap.add_argument("--device", default=None, help="also time the tensor resize on this device (e.g. cuda)")
    ap.add_argument("--write-results", action="store_true")
    args = ap.parse_args()
    import cv2
    import torch
    torch.set_num_threads(1)
    cv2.setNumThreads(1)
    paths = make_overhead_cohort(max(args.slides, 1))[:args.slides]
    plan_and_read(paths[:1])   # warm-up: imports, first-call set-up
    plan_ms, read_ms, n, tiles = plan_and_read(paths)
    tiles = tiles[:256]
    buf = np.empty_like(tiles)   # with the resize on the GPU, the CPU copies tiles into pinned memory
    copy_ms = _cpu_ms(lambda: np.copyto(buf, tiles), len(tiles))
    print(f"{n} tiles on {len(paths)} slides: plan {plan_ms:.3f} ms/tile, read {read_ms:.3f} ms/tile")
    pre = preprocessing(tiles)
    alt = other_resizers(tiles)
    if args.device:
        alt.append(device_resize(tiles, args.device))
    lines = [SECTION, "",
             f"Machine: {machine()}. Command: `.venv/bin/python benchmarks/bench_preprocess.py --slides {args.slides}"
             f"{' --device ' + args.device if args.device else ''}{' --write-results' if args.write_results else ''}`. One thread (torch, OpenCV, PIL), CPU time "
             f"(`time.process_time`), median of 3 for preprocessing.", "",
             f"Plan and read on {len(paths)} 20x synthetic slides, {n} tiles of 448 px at 10x: "
             f"**plan {plan_ms:.3f} ms**, **read {read_ms:.3f} ms** per tile (decode from the TIFF tiles, 20x → 10x).", "",
             "| model | input px | resize + crop (CPU) ms/tile | normalise (device half, timed on CPU) ms/tile | "
             "plan + read + resize + crop: tiles/s per core | cores for 2,000 tiles/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name, size, resize, norm in pre:
        per_core = 1e3 / (plan_ms + read_ms + resize)
        lines.append(f"| {name} | {size} | {resize:.3f} | {norm:.3f} | {per_core:.0f} | {GPU_TILES_S / per_core:.1f} |")
    per_core = 1e3 / (plan_ms + read_ms + copy_ms)
    lines.append(f"| any, resized on the GPU (`model.resize_on: device`, the default there): the CPU copies the "
                 f"448 px tile into pinned memory | — | {copy_ms:.3f} | — | {per_core:.0f} | {GPU_TILES_S / per_core:.1f} |")
    lines += ["", f"448 → 224 px resizers on {len(tiles)} tiles (one thread):", "",
              "| resizer | CPU ms/tile | largest difference from PIL bicubic (0–255) |", "| --- | --- | --- |"]
    lines += [f"| {name} | {ms:.3f} | {diff} |" for name, ms, diff in alt]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.write_results:
        replace_section(SECTION, text)


if __name__ == "__main__":
    main()
