"""Shared by the peer scripts (run inside the throwaway peers venv, never the project venv): the cohort
manifest, the geometry every tool gets, the timing protocol and the one JSON line each script prints."""
from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
MANIFEST = ROOT / "benchmarks" / "_work" / "overhead" / "manifest.csv"
# Issue #11 geometry: 448 px tiles at 1 µm/px (10x), stride 112 (75 % overlap), tissue fraction ≥ 0.25.
TILE_PX, MPP, STRIDE_PX, MIN_TISSUE = 448, 1.0, 112, 0.25


def parser(doc: str) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=doc.splitlines()[0])
    ap.add_argument("--manifest", type=Path, default=MANIFEST, help="slide_id,uri CSV (default: the overhead cohort)")
    ap.add_argument("--slides", type=int, default=None, help="use the first N slides of the manifest")
    return ap


def read_manifest(path: Path, n: int | None = None) -> list[tuple[str, str]]:
    if not Path(path).exists():
        sys.exit(f"manifest {path} not found: create the cohort with "
                 f".venv/bin/python benchmarks/_overhead_cohort.py (project venv)")
    with Path(path).open(newline="") as f:
        rows = [(r["slide_id"], r["uri"]) for r in csv.DictReader(f)]
    rows = rows if n is None else rows[:n]
    if not rows:
        sys.exit(f"manifest {path}: no slides")
    return rows


def loadavg() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "n/a"


def time_slides(rows, plan_one) -> dict:
    """The protocol every tool gets: plan the first slide once untimed (warm-up: lazy imports, caches),
    then plan and time every slide; `plan_one(slide_id, uri)` returns (n_tiles, tissue_mm2, tissue_pieces)."""
    t0 = time.perf_counter()
    plan_one(*rows[0])
    warmup = time.perf_counter() - t0
    load0 = loadavg()
    secs, tiles, tissue, pieces = [], [], [], []
    for sid, uri in rows:
        t0 = time.perf_counter()
        n, mm2, k = plan_one(sid, uri)
        secs.append(time.perf_counter() - t0)
        tiles.append(int(n))
        tissue.append(round(float(mm2), 4))
        pieces.append(int(k))
    return {"slides": len(rows), "slide_ids": [r[0] for r in rows], "warmup_s": round(warmup, 4),
            "seconds_per_slide": [round(s, 5) for s in secs], "median_s": statistics.median(secs),
            "mean_s": statistics.fmean(secs), "tiles_per_slide": tiles,
            "median_tiles": statistics.median(tiles), "mean_tiles": statistics.fmean(tiles),
            "tissue_mm2_per_slide": tissue, "tissue_pieces_per_slide": pieces, "loadavg_start": load0, "loadavg_end": loadavg()}


def emit(result: dict) -> None:
    """The script's result: one JSON object on one line, the last line of stdout (tools may print
    other lines before it; bench_peers.py reads the last line that parses as an object with "tool")."""
    result.setdefault("python", platform.python_version())
    result.setdefault("cpus", os.cpu_count())
    sys.stdout.flush()
    print(json.dumps(result), flush=True)
