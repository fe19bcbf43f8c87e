"""`zeus tiles` end to end, as a user runs it (subprocess): real slides, a synthetic 40x pyramid
checked exactly against an independent computation, remote slides, and every bad input."""
import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import boto3
import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import MultiPolygon, Point, box

from zeus_ray.synthetic import write_synthetic_slide, write_unsupported_tiff
from zeus_ray.tiling import grid_from_table_metadata

ROOT = Path(__file__).resolve().parents[1]
CMU = "CMU-1-Small-Region.svs"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"


def zeus(*args, cache=None):
    cmd = [sys.executable, "-m", "zeus_ray", "tiles", *map(str, args)]
    if cache is not None:
        cmd += ["--set", f"cache.dir={cache}"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=os.environ.copy())


def one_error_line(r, *needles):
    assert r.returncode != 0 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: slide "), r.stderr
    assert "Traceback" not in r.stderr
    for n in needles:
        assert re.search(n, lines[0]), (n, lines[0])


def test_real_20x_slide(slides_dir, tmp_path):
    r = zeus(slides_dir / CMU, "--out", tmp_path)
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = tmp_path / "CMU-1-Small-Region"
    tiles = pq.read_table(out / "tiles.parquet")
    m = re.match(r"CMU-1-Small-Region: level 0 .* read (\d+) px -> 448 px at 1 µm/px, (\d+) tiles, "
                 r"tissue ([\d.]+) mm², [\d.]+ s", lines[0])
    assert m, lines[0]
    assert int(m.group(1)) == 898 and int(m.group(2)) == tiles.num_rows > 20
    assert 0.4 < float(m.group(3)) < 0.9
    g = grid_from_table_metadata(tiles)
    assert (g.level, g.read_size, g.mpp0) == (0, 898, 0.499)
    assert set(tiles.column("read_size").to_pylist()) == {898}
    assert min(tiles.column("tissue_fraction").to_pylist()) >= 0.25
    mask = cv2.imread(str(out / "tissue_mask_8.00mpp.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (math.ceil(2967 * 0.499 / 8), math.ceil(2220 * 0.499 / 8)) and set(np.unique(mask)) == {0, 255}
    thumb = cv2.imread(str(out / "thumbnail.png"))
    assert max(thumb.shape[:2]) == 1600
    info = json.loads((out / "tiles.json").read_text())
    assert info["status"] == "ok" and info["n_tiles"] == tiles.num_rows and len(info["tiling_key"]) == 16
    # Overrides change the geometry: 20x reads the level natively, a higher threshold keeps fewer.
    r = zeus(slides_dir / CMU, "--out", tmp_path / "b", "--magnification", "20",
             "--set", "tiling.min_tissue_fraction=0.9")
    assert r.returncode == 0, r.stderr
    assert "read 448 px -> 448 px at 0.5 µm/px" in r.stdout


def test_synthetic_40x_pyramid_exact(tmp_path):
    """Level 1 at 10x; every box, the count and the filter against independent computations."""
    tissue = Point(3000, 2600).buffer(1900).difference(Point(3200, 2500).buffer(700)).union(
        box(5800, 700, 7600, 5000))
    s = write_synthetic_slide(tmp_path / "syn40.svs", 8192, 6144, 0.25, tissue=tissue, lesions=None,
                              downsamples=(1, 4, 16))
    r = zeus(s.path, "--out", tmp_path / "out")
    assert r.returncode == 0, r.stderr
    assert "level 1 (1 µm/px; level 0 0.25 µm/px from metadata), read 448 px -> 448 px" in r.stdout
    out = tmp_path / "out" / "syn40"
    t = pq.read_table(out / "tiles.parquet").to_pydict()
    # Independent grid: 10x tiles of 448 px are 1792 level-0 px, stride 448, just enough to cover.
    n_cols, n_rows = math.ceil((8192 - 1792) / 448) + 1, math.ceil((6144 - 1792) / 448) + 1
    for tid, x, y, row, col in zip(t["tile_id"], t["x"], t["y"], t["grid_row"], t["grid_col"]):
        assert (x, y) == (448 * col, 448 * row) and tid == row * n_cols + col
    assert set(t["level"]) == {1} and set(t["read_size"]) == {448}
    # Brute-force tissue fraction from the written mask: each mask px is 32 level-0 px, so the
    # tile boxes fall on whole level-0 px of the mask repeated 32 times.
    mask = cv2.imread(str(out / "tissue_mask_8.00mpp.png"), cv2.IMREAD_UNCHANGED) > 0
    full = np.zeros((n_rows * 448 + 1792, n_cols * 448 + 1792), bool)
    up = np.repeat(np.repeat(mask, 32, axis=0), 32, axis=1)
    full[: up.shape[0], : up.shape[1]] = up[: full.shape[0], : full.shape[1]]
    kept = {}
    for row in range(n_rows):
        for col in range(n_cols):
            f = full[row * 448: row * 448 + 1792, col * 448: col * 448 + 1792].mean()
            if f >= 0.25 and f > 0:
                kept[row * n_cols + col] = f
    assert sorted(kept) == sorted(t["tile_id"])
    np.testing.assert_allclose([kept[i] for i in t["tile_id"]], t["tissue_fraction"], atol=1e-6)
    # Against the true tissue polygon: the mask is within a pixel or so of it, so tiles clearly
    # above/below the threshold by the polygon are kept/dropped.
    boxes = shapely.box(np.arange(n_rows * n_cols) % n_cols * 448, np.arange(n_rows * n_cols) // n_cols * 448,
                        np.arange(n_rows * n_cols) % n_cols * 448 + 1792, np.arange(n_rows * n_cols) // n_cols * 448 + 1792)
    true_frac = shapely.area(shapely.intersection(boxes, MultiPolygon(s.tissue.geoms))) / 1792 ** 2
    ids = set(t["tile_id"])
    assert all(i in ids for i in np.flatnonzero(true_frac >= 0.31))
    assert not any(i in ids for i in np.flatnonzero(true_frac < 0.19))
    area = json.loads((out / "tiles.json").read_text())["tissue_area_mm2"]
    assert abs(area - s.tissue.area * 0.25 ** 2 / 1e6) < 0.08


def test_frozen_section_without_mpp_then_override(slides_dir, tmp_path):
    r = zeus(slides_dir / TCGA, "--out", tmp_path)
    one_error_line(r, "TCGA-CR-7395-01A-01-TS1", "no µm/px", "--mpp")
    assert not (tmp_path / "TCGA-CR-7395-01A-01-TS1").exists()
    r = zeus(slides_dir / TCGA, "--out", tmp_path, "--mpp", "0.25")
    assert r.returncode == 0, r.stderr
    assert "level 1 " in r.stdout and "from override" in r.stdout
    assert pq.read_table(tmp_path / "TCGA-CR-7395-01A-01-TS1" / "tiles.parquet").num_rows > 0


@pytest.mark.parametrize("name,needles", [
    ("missing.svs", ["'missing'", "file not found"]),
    ("broken.svs", ["'broken'", "not a slide OpenSlide can read"]),
    ("unreadable.svs", ["'unreadable'", "corrupt", "Bogus marker length"]),
])
def test_bad_slide_files(slides_dir, tmp_path, name, needles):
    one_error_line(zeus(slides_dir / name, "--out", tmp_path), *needles)


def test_unsupported_tiff_and_debug_traceback(tmp_path):
    path = write_unsupported_tiff(tmp_path / "plain.tif")
    one_error_line(zeus(path, "--out", tmp_path / "o"), "'plain'", "not a slide", "tiled pyramidal TIFF")
    r = zeus("--out", tmp_path / "o", path)[:0] if False else subprocess.run(
        [sys.executable, "-m", "zeus_ray", "--debug", "tiles", path, "--out", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "Traceback" in r.stderr


def test_slide_without_tissue_is_not_an_error(tmp_path):
    s = write_synthetic_slide(tmp_path / "blank.svs", 2048, 2048, 0.5, tissue=MultiPolygon(), lesions=MultiPolygon(),
                              downsamples=(1, 4))
    r = zeus(s.path, "--out", tmp_path / "o")
    assert r.returncode == 0, r.stderr
    assert "0 tiles" in r.stdout and "status no_tissue" in r.stdout
    out = tmp_path / "o" / "blank"
    assert pq.read_table(out / "tiles.parquet").num_rows == 0
    assert json.loads((out / "tiles.json").read_text())["status"] == "no_tissue"
    assert (out / "thumbnail.png").exists()


def test_remote_slide_and_unreachable_bucket(s3_server, s3_bucket, slides_dir, tmp_path):
    boto3.client("s3", endpoint_url=s3_server).upload_file(str(slides_dir / CMU), s3_bucket, f"c/{CMU}")
    local = zeus(slides_dir / CMU, "--out", tmp_path / "local")
    remote = zeus(f"s3://{s3_bucket}/c/{CMU}", "--out", tmp_path / "remote", cache=tmp_path / "cache")
    assert remote.returncode == 0, remote.stderr
    a = pq.read_table(tmp_path / "local" / "CMU-1-Small-Region" / "tiles.parquet")
    b = pq.read_table(tmp_path / "remote" / "CMU-1-Small-Region" / "tiles.parquet")
    assert a.equals(b) and a.schema.metadata == b.schema.metadata    # same tiles, same tiling key
    assert local.stdout.split(",")[:3] == remote.stdout.split(",")[:3]
    r = zeus(f"s3://zeus-no-such-bucket-{os.getpid()}/{CMU}", "--out", tmp_path / "x", cache=tmp_path / "cache")
    one_error_line(r, "CMU-1-Small-Region", "cannot fetch", "no such bucket")


def test_bad_options(slides_dir, tmp_path):
    r = zeus(slides_dir / CMU, "--out", tmp_path, "--set", "tiling.overlap=1.5")
    assert r.returncode == 2 and "tiling.overlap" in r.stderr and "Traceback" not in r.stderr
    r = zeus(slides_dir / CMU, "--out", tmp_path, "--magnification", "10", "--target-mpp", "1")
    assert r.returncode == 2 and "not both" in r.stderr
