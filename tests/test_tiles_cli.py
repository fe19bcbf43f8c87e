"""`zeus tiles` end to end as a user runs it (subprocesses of `python -m zeus_ray tiles`): real
slides, a synthetic 40x pyramid checked exactly against an independent computation, a slide in a
bucket, and every bad input. Option handling is checked in-process through the same cli.main."""
import json
import math
import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import boto3
import cv2
import numpy as np
import pyarrow.parquet as pq
import pytest
import shapely
from shapely.geometry import MultiPolygon, Point, box

from zeus_ray.cli import main
from zeus_ray.errors import SlideError
from zeus_ray.demo.synthetic import write_synthetic_slide, write_unsupported_tiff
from zeus_ray.slides.tiling import grid_from_table_metadata

from _dpi_tiff import write_dpi_tiff

ROOT = Path(__file__).resolve().parents[1]
CMU = "CMU-1-Small-Region.svs"
TCGA = "TCGA-CR-7395-01A-01-TS1.svs"
# Synthetic 40x tissue: a disc with a 0.1 mm² hole (kept as a hole) and a box.
SYN_TISSUE = Point(3000, 2600).buffer(1900).difference(Point(3200, 2500).buffer(700)).union(box(5800, 700, 7600, 5000))


def zeus_cmd(*args):
    return [sys.executable, "-m", "zeus_ray", "tiles", *map(str, args)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, slides_dir, s3_server):
    """Every CLI invocation of this module, run as subprocesses a few at a time (each pays the
    interpreter start-up), keyed by name: {name: (CompletedProcess, out_dir)}."""
    tmp = tmp_path_factory.mktemp("cli")
    cache = tmp / "cache"
    bucket = f"zeus-cli-{os.getpid()}"
    s3 = boto3.client("s3", endpoint_url=s3_server)
    s3.create_bucket(Bucket=bucket)
    s3.upload_file(str(slides_dir / CMU), bucket, f"c/{CMU}")
    syn = write_synthetic_slide(tmp / "syn40.svs", 8192, 6144, 0.25, tissue=SYN_TISSUE, lesions=None,
                                downsamples=(1, 4, 16))
    blank = write_synthetic_slide(tmp / "blank.svs", 2048, 2048, 0.5, tissue=MultiPolygon(),
                                  lesions=MultiPolygon(), downsamples=(1, 4))
    plain = write_unsupported_tiff(tmp / "plain.tif")
    # Generic TIFFs with resolution tags: a screen DPI (72, 300 dpi), none without a unit, and a
    # microscopy resolution in px/cm; a 2.5x-like scan at 4 µm/px.
    dpi = {name: write_dpi_tiff(tmp / f"{name}.tif", res, unit) for name, res, unit in
           (("dpi72", 72, "INCH"), ("dpi300", 300, "INCH"), ("unitless", 72, "NONE"), ("cm", 20000, "CENTIMETER"))}
    coarse = write_synthetic_slide(tmp / "coarse4.svs", 1024, 768, 4.0, tile=128, downsamples=(1,))
    c = ["--set", f"cache.dir={cache}"]
    jobs = {
        "cmu": [slides_dir / CMU],
        "syn40": [syn.path],
        "tcga": [slides_dir / TCGA],
        "tcga_mpp": [slides_dir / TCGA, "--mpp", "0.25"],
        "missing": [slides_dir / "missing.svs"],
        "broken": [slides_dir / "broken.svs"],
        "unreadable": [slides_dir / "unreadable.svs"],
        "plain": [plain],
        "blank": [blank.path],
        "remote": [f"s3://{bucket}/c/{CMU}", *c],
        "no_bucket": [f"s3://zeus-no-such-bucket-{os.getpid()}/{CMU}", *c],
        "dpi72": [dpi["dpi72"]],
        "dpi72_mpp": [dpi["dpi72"], "--mpp", "0.5"],
        "dpi300": [dpi["dpi300"]],
        "unitless": [dpi["unitless"]],
        "cm": [dpi["cm"]],
        "coarse4": [coarse.path],
        "cmu_budget": [slides_dir / CMU, "--set", "tiling.max_tiles_per_slide=5"],
    }
    cmds = {k: zeus_cmd(*v, "--out", tmp / k) for k, v in jobs.items()}
    run = lambda cmd: subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)  # noqa: E731
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(cmds, pool.map(run, cmds.values())))
    return {k: (r, tmp / k) for k, r in done.items()} | {"_syn": syn, "_plain": plain}


def one_error_line(r, *needles):
    assert r.returncode == 2 and r.stdout == ""
    # stderr may also hold log records (cli.main logs at INFO); the error itself is one line.
    errors = [ln for ln in r.stderr.strip().splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: slide ") and r.stderr.rstrip().endswith(errors[0])
    assert "Traceback" not in r.stderr
    for n in needles:
        assert re.search(n, errors[0]), (n, errors[0])


def test_real_20x_slide(runs):
    r, out_dir = runs["cmu"]
    assert r.returncode == 0, r.stderr
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1
    out = out_dir / "CMU-1-Small-Region"
    tiles = pq.read_table(out / "tiles.parquet")
    m = re.match(r"CMU-1-Small-Region: level 0 .* read (\d+) px -> 448 px at 1 µm/px, (\d+) tiles, "
                 r"tissue ([\d.]+) mm², [\d.]+ s", lines[0])
    assert m, lines[0]
    # 10x from a 20x slide with one level: 448 µm / 0.499 µm/px = 897.8 → 898 px reads, halved.
    assert int(m.group(1)) == 898 and int(m.group(2)) == tiles.num_rows > 20
    assert 0.4 < float(m.group(3)) < 0.9
    g = grid_from_table_metadata(tiles)
    assert (g.level, g.read_size, g.mpp0) == (0, 898, 0.499)
    assert set(tiles.column("read_size").to_pylist()) == {898}
    assert min(tiles.column("tissue_fraction").to_pylist()) >= 0.25
    mask = cv2.imread(str(out / "tissue_mask_8.00mpp.png"), cv2.IMREAD_UNCHANGED)
    assert mask.shape == (math.ceil(2967 * 0.499 / 8), math.ceil(2220 * 0.499 / 8))
    assert set(np.unique(mask)) == {0, 255}
    assert max(cv2.imread(str(out / "thumbnail.png")).shape[:2]) == 1600
    info = json.loads((out / "tiles.json").read_text())
    assert info["status"] == "ok" and info["n_tiles"] == tiles.num_rows and len(info["tiling_key"]) == 16


def test_overrides_in_process(slides_dir, tmp_path, capsys):
    """Same entry point in-process (cli.main): 20x is read natively (448.9 px per tile), a higher
    threshold keeps fewer tiles of the same tissue, and the tiling key changes."""
    assert main(["tiles", str(slides_dir / CMU), "--out", str(tmp_path), "--magnification", "20",
                 "--set", "tiling.min_tissue_fraction=0.9"]) == 0
    line = capsys.readouterr().out
    assert "level 0" in line and "read 449 px -> 448 px at 0.5 µm/px" in line
    out = tmp_path / "CMU-1-Small-Region"
    t20 = pq.read_table(out / "tiles.parquet")
    assert min(t20.column("tissue_fraction").to_pylist()) >= 0.9
    assert main(["tiles", str(slides_dir / CMU), "--out", str(tmp_path / "b"), "--target-mpp", "1.0"]) == 0
    capsys.readouterr()
    k10 = json.loads((tmp_path / "b" / "CMU-1-Small-Region" / "tiles.json").read_text())["tiling_key"]
    assert json.loads((out / "tiles.json").read_text())["tiling_key"] != k10


def test_synthetic_40x_pyramid_exact(runs):
    """Level 1 at 10x; every box, the count and the filter against independent computations."""
    r, out_dir = runs["syn40"]
    syn = runs["_syn"]
    assert r.returncode == 0, r.stderr
    assert "level 1 (1 µm/px; level 0 0.25 µm/px from metadata), read 448 px -> 448 px" in r.stdout
    out = out_dir / "syn40"
    t = pq.read_table(out / "tiles.parquet").to_pydict()
    # Independent grid: 10x tiles of 448 px are 1792 level-0 px, stride 448, just enough to cover.
    n_cols, n_rows = math.ceil((8192 - 1792) / 448) + 1, math.ceil((6144 - 1792) / 448) + 1
    for tid, x, y, row, col in zip(t["tile_id"], t["x"], t["y"], t["grid_row"], t["grid_col"]):
        assert (x, y) == (448 * col, 448 * row) and tid == row * n_cols + col
    assert set(t["level"]) == {1} and set(t["read_size"]) == {448} and set(t["size"]) == {448}
    # Brute-force tissue fraction from the written mask: a mask px is 32 × 32 level-0 px, so
    # repeating it 32 times gives a level-0 mask where every tile box is whole pixels.
    mask = cv2.imread(str(out / "tissue_mask_8.00mpp.png"), cv2.IMREAD_UNCHANGED) > 0
    full = np.zeros((n_rows * 448 + 1792, n_cols * 448 + 1792), bool)
    up = np.repeat(np.repeat(mask, 32, axis=0), 32, axis=1)
    full[: up.shape[0], : up.shape[1]] = up[: full.shape[0], : full.shape[1]]
    kept = {}
    for row in range(n_rows):
        for col in range(n_cols):
            f = full[row * 448: row * 448 + 1792, col * 448: col * 448 + 1792].mean()
            if f >= 0.25:
                kept[row * n_cols + col] = f
    assert sorted(kept) == sorted(t["tile_id"])
    np.testing.assert_allclose([kept[i] for i in t["tile_id"]], t["tissue_fraction"], atol=1e-6)
    # Against the true tissue polygon: the mask follows it to about a pixel (8 µm), so tiles
    # clearly above / below the threshold by the polygon are kept / dropped.
    i = np.arange(n_rows * n_cols)
    boxes = shapely.box(i % n_cols * 448, i // n_cols * 448, i % n_cols * 448 + 1792, i // n_cols * 448 + 1792)
    true_frac = shapely.area(shapely.intersection(boxes, syn.tissue)) / 1792 ** 2
    ids = set(t["tile_id"])
    assert all(j in ids for j in np.flatnonzero(true_frac >= 0.31))
    assert not any(j in ids for j in np.flatnonzero(true_frac < 0.19))
    # Tissue area: boundary pixels that are partly tissue count as tissue (a fixed threshold of 8
    # on saturation), so the mask is about one 8 µm pixel wider than the polygon all round.
    area = json.loads((out / "tiles.json").read_text())["tissue_area_mm2"]
    true_mm2, band_mm2 = syn.tissue.area * 0.25 ** 2 / 1e6, syn.tissue.length * 0.25 * 8 / 1e6
    assert -0.5 * band_mm2 < area - true_mm2 < 1.5 * band_mm2


def test_frozen_section_without_mpp_then_override(runs):
    r, out_dir = runs["tcga"]
    one_error_line(r, "TCGA-CR-7395-01A-01-TS1", "no µm/px", "--mpp")
    assert not (out_dir / "TCGA-CR-7395-01A-01-TS1").exists()
    r, out_dir = runs["tcga_mpp"]
    assert r.returncode == 0, r.stderr
    assert "level 1 " in r.stdout and "from override" in r.stdout and "read 896 px" in r.stdout
    assert pq.read_table(out_dir / "TCGA-CR-7395-01A-01-TS1" / "tiles.parquet").num_rows > 0


@pytest.mark.parametrize("name,needles", [
    ("missing", ["'missing'", "file not found"]),
    ("broken", ["'broken'", "not a slide OpenSlide can read"]),
    ("unreadable", ["'unreadable'", "corrupt", "Bogus marker length"]),     # opens; fails at read time
    ("plain", ["'plain'", "not a slide", "tiled pyramidal TIFF"]),          # a TIFF OpenSlide rejects
    ("no_bucket", ["'CMU-1-Small-Region'", "cannot fetch", "no such bucket"]),
])
def test_bad_inputs_one_line(runs, name, needles):
    one_error_line(runs[name][0], *needles)


@pytest.mark.parametrize("name,needles", [
    ("dpi72", [r"'dpi72': metadata says 352\.8 µm/px \(72 dpi, unit inch\): not a microscopy resolution "
               r"\(0\.05–20 µm/px\); no objective power; give its level-0 µm/px with --mpp"]),
    ("dpi300", [r"'dpi300': metadata says 84\.67 µm/px \(300 dpi, unit inch\): not a microscopy", "--mpp"]),
    ("unitless", [r"'unitless': no µm/px in its metadata \(TIFF resolution 72 px per unit, unit none", "--mpp"]),
    ("coarse4", [r"'coarse4': level 0 is 4 µm/px \(from metadata\), 4× coarser than the target 1 µm/px",
                 "tiling.magnification to 5 or less", "tiling.max_upsampling"]),
])
def test_implausible_geometry_fails_before_tiling(runs, name, needles):
    """A screen resolution in the TIFF tags is no µm/px, and strong upsampling is an error: one
    line, exit code 2, no outputs (the 72-dpi slide used to be planned as thousands of tiles each
    upsampled from about one pixel)."""
    r, out_dir = runs[name]
    one_error_line(r, *needles)
    assert "`mpp` column" not in r.stderr and not out_dir.exists()


def test_dpi_tiff_with_mpp_override_and_plausible_tags(runs):
    r, out_dir = runs["dpi72_mpp"]
    assert r.returncode == 0, r.stderr
    assert "level 0 (0.5 µm/px; level 0 0.5 µm/px from override), read 896 px -> 448 px" in r.stdout
    assert pq.read_table(out_dir / "dpi72" / "tiles.parquet").num_rows > 0
    override = pq.read_table(out_dir / "dpi72" / "tiles.parquet")
    r, out_dir = runs["cm"]                       # 20000 px/cm: 0.5 µm/px, used as it is
    assert r.returncode == 0, r.stderr
    assert "level 0 0.5 µm/px from metadata" in r.stdout
    cm = pq.read_table(out_dir / "cm" / "tiles.parquet")
    cols = ["tile_id", "x", "y", "read_size", "tissue_fraction"]   # same pixels, same µm/px: same tiles
    assert cm.select(cols).equals(override.select(cols))


def test_tile_budget_names_the_count_and_the_key(runs):
    n = pq.read_table(runs["cmu"][1] / "CMU-1-Small-Region" / "tiles.parquet").num_rows
    r, out_dir = runs["cmu_budget"]
    one_error_line(r, "'CMU-1-Small-Region'", f"needs {n:,} tiles, over tiling.max_tiles_per_slide \\(5\\)",
                   "raise tiling.max_tiles_per_slide")
    assert not out_dir.exists()


def test_debug_shows_the_traceback(runs):
    with pytest.raises(SlideError, match="not a slide"):
        main(["--debug", "tiles", str(runs["_plain"]), "--out", "unused"])


def test_slide_without_tissue_is_not_an_error(runs):
    r, out_dir = runs["blank"]
    assert r.returncode == 0, r.stderr
    assert "0 tiles" in r.stdout and "status no_tissue" in r.stdout
    out = out_dir / "blank"
    assert pq.read_table(out / "tiles.parquet").num_rows == 0
    assert json.loads((out / "tiles.json").read_text())["status"] == "no_tissue"
    assert (out / "thumbnail.png").exists()


def test_remote_slide_gives_the_same_tiles(runs):
    r, out_dir = runs["remote"]
    assert r.returncode == 0, r.stderr
    local = pq.read_table(runs["cmu"][1] / "CMU-1-Small-Region" / "tiles.parquet")
    remote = pq.read_table(out_dir / "CMU-1-Small-Region" / "tiles.parquet")
    assert local.equals(remote) and local.schema.metadata == remote.schema.metadata   # same tiling key
    assert r.stdout.split(", tissue")[0] == runs["cmu"][0].stdout.split(", tissue")[0]


def test_bad_options(slides_dir, tmp_path, capsys):
    assert main(["tiles", str(slides_dir / CMU), "--out", str(tmp_path), "--set", "tiling.overlap=1.5"]) == 2
    assert "tiling.overlap" in capsys.readouterr().err
    assert main(["tiles", str(slides_dir / CMU), "--out", str(tmp_path), "--magnification", "10",
                 "--target-mpp", "1"]) == 2
    assert "not both" in capsys.readouterr().err
    assert main(["tiles", str(slides_dir / CMU), "--out", str(tmp_path), "--slide-id", "../x"]) == 2
    assert "safe folder name" in capsys.readouterr().err
    assert not list(tmp_path.iterdir())
