"""Building CONCH and KEEP from a checkpoint file: random initialisation then copy (the ordinary
way) against `checkpoint.build_loaded` (built on the meta device, the file's tensors assigned), the
path `load_encoder` takes for every worker and for `zeus reprompt`'s text encoder.

Full-size models with random weights, saved in the release formats (CONCH: pytorch_model.bin,
KEEP: model.safetensors) in a temporary folder; each timing includes reading the file. One torch
thread; medians of alternating repeats.

    .venv/bin/python benchmarks/bench_model_build.py [--repeat 3] [--write]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from _results import machine, replace_section  # noqa: E402

from zeus_ray.encoders.checkpoint import build_loaded, load_state_dict_file  # noqa: E402
from zeus_ray.encoders.conch import build_conch, load_conch_weights  # noqa: E402
from zeus_ray.encoders.keep import build_keep, keep_buffers, load_keep_weights  # noqa: E402


def save(name: str, folder: Path) -> Path:
    model = build_conch() if name == "conch" else build_keep()
    if name == "conch":
        path = folder / "pytorch_model.bin"
        torch.save(model.state_dict(), path)
    else:
        from safetensors.torch import save_file
        path = folder / "model.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def timed(fn) -> tuple[float, float]:
    w, c = time.perf_counter(), time.process_time()
    fn()
    return time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--write", action="store_true")
    args = ap.parse_args()
    torch.set_num_threads(1)
    build = {"conch": (build_conch, load_conch_weights, {}), "keep": (build_keep, load_keep_weights,
                                                                      {"buffers": keep_buffers})}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, (make, load, extra) in build.items():
            path = save(name, Path(tmp))
            ways = {
                "random init, then copy": lambda: load(m := make(), load_state_dict_file(path)) and m,
                "build_loaded": lambda: build_loaded(make, load, load_state_dict_file(path), **extra),
            }
            got: dict = {k: [] for k in ways}
            for i in range(args.repeat):
                for way in (list(ways) if i % 2 == 0 else list(ways)[::-1]):
                    got[way].append(timed(ways[way]))
            params = sum(p.numel() for p in make().parameters()) / 1e6
            for way, runs in got.items():
                rows.append(f"| {name} ({params:.0f} M parameters) | {way} | "
                            f"{statistics.median(r[0] for r in runs):.2f} | {statistics.median(r[1] for r in runs):.2f} |")
    text = "\n".join([
        "## Building CONCH and KEEP from a checkpoint",
        "",
        f"Command: `.venv/bin/python benchmarks/bench_model_build.py --repeat {args.repeat} --write` (full-size models, "
        "random weights saved in the release formats; each time includes reading the file; one torch thread; "
        f"medians of {args.repeat} alternating repeats).",
        f"Machine: {machine()}.",
        "",
        "| model | how | wall s | CPU s |",
        "| --- | --- | --- | --- |",
        *rows,
        "",
        "`build_loaded` (zeus_ray/encoders/checkpoint.py) is what `load_encoder` does for every worker and for "
        "`zeus reprompt`'s text encoder: the random values a model is first built with are never computed.",
        "",
    ])
    print(text)
    if args.write:
        replace_section("## Building CONCH and KEEP from a checkpoint", text)


if __name__ == "__main__":
    main()
