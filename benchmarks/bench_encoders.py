"""Encoder throughput (tiles/s) per registered architecture, random weights, real sizes.

Each architecture is the real one with random initialisation (CONCH: our CoCa ViT-B/16 at 448 px;
KEEP: timm ViT-L/16 at 224 + BERT; PLIP: transformers CLIP ViT-B/32; QuiltNet: open_clip ViT-B-32)
wrapped in the same TorchEncoder that load_encoder returns, so a timed call is the whole
`encode_images` path: uint8 tiles → device → resize/crop/normalise → (autocast) forward → L2 norm.
Input: real 448 × 448 H&E tiles from tests/data/slides/CMU-1-Small-Region.svs.

    .venv/bin/python benchmarks/bench_encoders.py [--models conch,keep] [--batches 1,8,32]
        [--dtypes float32,bfloat16] [--budget 570] [--max-call 150] [--write benchmarks/RESULTS.md]

fp32 and bf16 are warmed up, then timed in alternation (medians). A batch size whose estimated time
(warm-ups + one timed call per dtype, from the rates at the previous batch size) exceeds
--max-call seconds, or would overrun --budget, is skipped and marked so in the table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from zeus_ray.encoders.base import TorchEncoder  # noqa: E402
from zeus_ray.encoders.registry import MODELS  # noqa: E402

SLIDE = ROOT / "tests" / "data" / "slides" / "CMU-1-Small-Region.svs"
from _results import machine, replace_section  # noqa: E402

SECTION = "## Encoders (issue #3)"
AMP = {"float32": None, "bfloat16": torch.bfloat16}
WARMUP = {"float32": 1, "bfloat16": 2}   # CPU bf16 autocast needs 2 calls before it is fast


def build(name: str):
    """(architecture label, module, image_fn) with random weights, full size."""
    if name == "conch":
        from zeus_ray.encoders.conch import build_conch
        m = build_conch()
        return "CoCa ViT-B/16 @448 (ours)", m, lambda x: m.encode_image(x, normalize=False)
    if name == "keep":
        from zeus_ray.encoders.keep import build_keep
        m = build_keep()
        return "timm ViT-L/16 @224 + MLP head", m, lambda x: m.encode_image(x, normalize=False)
    if name == "plip":
        from transformers import CLIPConfig, CLIPModel
        m = CLIPModel(CLIPConfig())
        return "transformers CLIP ViT-B/32 @224", m, lambda x: m.get_image_features(pixel_values=x).pooler_output
    if name == "quiltnet":
        import open_clip
        m = open_clip.create_model("ViT-B-32", pretrained=None)
        return "open_clip ViT-B-32 @224 (nn.MultiheadAttention)", m, m.encode_image
    raise SystemExit(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def real_tiles(n: int) -> np.ndarray:
    import openslide
    slide = openslide.OpenSlide(str(SLIDE))
    w, h = slide.dimensions
    rng = np.random.default_rng(0)
    xs, ys = rng.integers(0, w - 448, 8), rng.integers(0, h - 448, 8)
    base = np.stack([np.asarray(slide.read_region((int(x), int(y)), 0, (448, 448)).convert("RGB"))
                     for x, y in zip(xs, ys)])
    slide.close()
    return base[np.arange(n) % len(base)]


def time_pair(encs: dict, tiles: np.ndarray, min_time: float, max_iters: int) -> dict[str, list[float]]:
    """Warm up every dtype, then time them in alternation, so that load from other jobs on a
    shared machine hits fp32 and bf16 alike and their ratio stays meaningful."""
    for dtype, enc in encs.items():
        for _ in range(WARMUP[dtype]):
            enc.encode_images(tiles)
    times: dict[str, list[float]] = {d: [] for d in encs}
    while not all(times.values()) or (min(map(sum, times.values())) < min_time
                                      and min(map(len, times.values())) < max_iters):
        for dtype, enc in encs.items():
            t = time.perf_counter()
            enc.encode_images(tiles)
            times[dtype].append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="conch,keep,plip,quiltnet")
    ap.add_argument("--batches", default="1,8,32")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--budget", type=float, default=570, help="seconds for the whole run")
    ap.add_argument("--max-call", type=float, default=150,
                    help="skip a batch size whose estimated time (all dtypes, warm-up included) is longer")
    ap.add_argument("--min-time", type=float, default=3, help="time each dtype for at least this long")
    ap.add_argument("--max-iters", type=int, default=4)
    ap.add_argument("--write", default=None, help="RESULTS.md to update (the encoders section)")
    args = ap.parse_args(argv)
    batches = [int(b) for b in args.batches.split(",")]
    dtypes = args.dtypes.split(",")
    start = time.time()
    info = machine()
    print(info, flush=True)
    tiles_all = real_tiles(max(batches))
    rows = []
    for name in args.models.split(","):
        spec = MODELS[name].spec
        t = time.time()
        label, module, image_fn = build(name)
        print(f"{name}: built {label} in {time.time() - t:.1f} s", flush=True)
        encs = {d: TorchEncoder(spec, module, image_fn, None, device="cpu", amp_dtype=AMP[d],
                                batch_size=max(batches), model_key=f"{name}@random", logit_scale=1.0)
                 for d in dtypes}
        per_tile: dict[str, float] = {}
        for b in batches:
            est = (sum(per_tile[d] * b * (WARMUP[d] + 1) for d in dtypes) if per_tile else None)
            skip = None
            if est is not None and est > args.max_call:
                skip = f"skipped: est. {est:.0f} s > {args.max_call:.0f} s"
            elif est is not None and time.time() - start + est > args.budget:
                skip = f"skipped: est. {est:.0f} s, over the {args.budget:.0f} s budget"
            if skip:
                rows += [(name, label, b, d, None, skip) for d in dtypes]
                print(f"  {name} batch {b}: {skip}", flush=True)
                continue
            times = time_pair(encs, tiles_all[:b], args.min_time, args.max_iters)
            for d in dtypes:
                med = float(np.median(times[d]))
                per_tile[d] = med / b
                rows.append((name, label, b, d, b / med, f"{len(times[d])} timed call(s), median {med:.2f} s"))
                print(f"  {name} {d} batch {b}: {b / med:.2f} tiles/s ({rows[-1][-1]})", flush=True)
        del module, encs
    table = render(rows, batches)
    print(table)
    if args.write:
        cmd = "cd /work/main && .venv/bin/python benchmarks/bench_encoders.py " + " ".join(argv or sys.argv[1:])
        write_section(Path(args.write), table, info, cmd, time.time() - start)
    return 0


def render(rows, batches) -> str:
    by = {(r[0], r[2], r[3]): r for r in rows}
    lines = ["| model | architecture (random weights) | batch | fp32 tiles/s | bf16 tiles/s | bf16/fp32 |",
             "| --- | --- | --- | --- | --- | --- |"]
    for name in dict.fromkeys(r[0] for r in rows):
        label = next(r[1] for r in rows if r[0] == name)
        for b in batches:
            f, h = by.get((name, b, "float32")), by.get((name, b, "bfloat16"))
            cell = lambda r: "—" if r is None else (f"{r[4]:.2f}" if r[4] is not None else r[5])  # noqa: E731
            ratio = (f"{h[4] / f[4]:.2f}×" if f and h and f[4] and h[4] else "—")
            lines.append(f"| {name} | {label} | {b} | {cell(f)} | {cell(h)} | {ratio} |")
    return "\n".join(lines)


def write_section(path: Path, table: str, info: str, cmd: str, seconds: float) -> None:
    body = (f"{SECTION}\n\nEncoder throughput, whole `encode_images` path (uint8 448-px tiles → resize/crop/"
            f"normalise → forward → L2 norm), random weights at the real sizes, CPU.\n\n"
            f"- Command: `{cmd}` ({seconds / 60:.1f} min)\n- Machine: {info}. The machine was shared with "
            f"other jobs while this ran, so absolute figures are noisy and low; the bf16/fp32 ratios are "
            f"the more reliable figures.\n- Warm-up: 1 call (fp32) or 2 calls (bf16) per combination, "
            f"then timed calls (median).\n\n{table}\n")
    replace_section(SECTION, body, path)


if __name__ == "__main__":
    sys.exit(main())
