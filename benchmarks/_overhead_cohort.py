"""The cohort shared by the overhead benchmark and the side-by-side benchmark (issue #11): synthetic 20x
SVS slides (0.5 µm/px, levels 1/4/16) written once with zeus's own generator as
benchmarks/_work/overhead/bench-{i}.svs (seed 100 + i), plus manifest.csv (slide_id, uri).

Run with the project venv: `.venv/bin/python benchmarks/_overhead_cohort.py [--n 32]`."""
from __future__ import annotations

import argparse
import csv
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FOLDER = ROOT / "benchmarks" / "_work" / "overhead"
MPP = 0.5                 # 20x
DOWNSAMPLES = (1, 4, 16)


def slide_path(i: int, folder: Path = FOLDER) -> Path:
    return Path(folder) / f"bench-{i}.svs"


def make_overhead_cohort(n: int = 32, width: int = 7200, height: int = 5400, folder: Path = FOLDER) -> list[Path]:
    """Write the slides that are missing or of another size (under a temporary name, then renamed, so a
    stopped run never leaves a half-written slide behind) and (re)write manifest.csv for slides 0..n-1.
    Returns their paths."""
    import openslide
    from zeus_ray.demo.synthetic import write_synthetic_slide

    def current(path: Path) -> bool:
        if not path.exists():
            return False
        try:
            with openslide.OpenSlide(str(path)) as s:
                return s.dimensions == (width, height)
        except openslide.OpenSlideError:
            return False

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(n):
        path = slide_path(i, folder)
        if not current(path):
            tmp = path.with_name(f".{path.stem}.{os.getpid()}.tmp.svs")
            try:
                write_synthetic_slide(tmp, width, height, MPP, downsamples=DOWNSAMPLES, fmt="svs", seed=100 + i)
                os.replace(tmp, path)
            finally:
                tmp.unlink(missing_ok=True)
        paths.append(path)
    manifest = folder / "manifest.csv"
    tmp = manifest.with_name(f".manifest.{os.getpid()}.tmp")
    with tmp.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["slide_id", "uri"])
        w.writerows([[p.stem, str(p)] for p in paths])
    os.replace(tmp, manifest)
    return paths


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--width", type=int, default=7200)
    ap.add_argument("--height", type=int, default=5400)
    ap.add_argument("--folder", type=Path, default=FOLDER)
    a = ap.parse_args()
    out = make_overhead_cohort(a.n, a.width, a.height, a.folder)
    print(f"{len(out)} slides in {a.folder}")
