"""Each part of `profile: reference` on its own: the config profile, the tile grid's origin and
CLAM's four-point selection, black edge padding, the CONCH tokenisation option, the official-order
smoothing and the offset-aware resampling the anchored grid needs."""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import openslide
import pytest
import torch
from PIL import Image
from shapely.geometry import box

from _checkpoints import make_conch_tokenizer, write_conch_checkpoint
from test_reference_profile import official_tissue, official_tiles, pinned_ids, slide_path
from zeus_ray.config import ModelConfig, TissueConfig, load_config
from zeus_ray.errors import ConfigError
from zeus_ray.maps.postprocess import official_order_smoothing
from zeus_ray.maps.rasterise import resample_nearest
from zeus_ray.slides.region_reader import plan_regions, read_region_tiles
from zeus_ray.slides.tiling import make_grid, tile_origins, tile_table, tissue_anchor
from zeus_ray.slides.tissue import read_thumbnail, segment_tissue
from zeus_ray.storage.keys import run_key, tiling_key
from zeus_ray.truth.annotations import Annotation, rasterise_annotation

ROOT = Path(__file__).resolve().parents[1]


# --- config ---------------------------------------------------------------------------------------

def test_profile_sets_what_differs_and_own_keys_win():
    base = load_config()
    assert (base.profile, base.tiling.anchor, base.tiling.selection, base.tiling.padding) == \
        ("default", "slide", "fraction", "white")
    assert (base.model.conch_tokenization, base.postprocess, base.tissue.odd_kernels) == ("conch", "none", True)
    ref = load_config(overrides=["profile=reference"])          # 10x: the official px is 1 µm
    assert (ref.tiling.anchor, ref.tiling.selection, ref.tiling.padding) == ("tissue", "four_point", "black")
    assert (ref.model.conch_tokenization, ref.postprocess, ref.evaluation.metric_mpp) == ("zeus-pinned", "reference", 1.0)
    t = ref.tissue
    assert (t.thumbnail_mpp, t.use_otsu, t.median_blur_um, t.close_um, t.odd_kernels, t.hole_outlines) == \
        (1.0, True, 7.0, 12.0, False, False)
    assert (t.min_tissue_area_um2, t.min_hole_area_um2, t.max_holes) == (2 * 512 ** 2, 16 * 512 ** 2, 8)
    # lengths follow the target resolution; keys the user sets win over the profile
    half = load_config(overrides=["profile=reference", "tiling.target_mpp=0.5", "tiling.padding=white",
                                  "tissue.close_um=20"])
    assert (half.tissue.thumbnail_mpp, half.tissue.median_blur_um, half.tissue.min_tissue_area_um2) == \
        (0.5, 3.5, 2 * 512 ** 2 * 0.25)
    assert (half.tiling.padding, half.tissue.close_um, half.tiling.anchor) == ("white", 20.0, "tissue")
    with pytest.raises(ConfigError, match="profile"):
        load_config(overrides=["profile=paper"])


def test_keys_change_with_the_parts_and_stay_at_the_defaults():
    base = load_config()
    assert tiling_key(base) == tiling_key(load_config(overrides=["tiling.anchor=slide"]))
    keys = {tiling_key(load_config(overrides=[s])) for s in
            ("tiling.anchor=tissue", "tiling.selection=four_point", "tiling.padding=black")}
    assert len(keys) == 3 and tiling_key(base) not in keys
    assert run_key("pk", base) == "pk"
    assert run_key("pk", load_config(overrides=["model.conch_tokenization=zeus-pinned"])) == "pk-zeus-pinned"
    assert run_key("pk", load_config(overrides=["profile=reference"])) == "pk-zeus-pinned-reference"
    assert run_key("pk", load_config(overrides=["profile=reference", "model.id=keep"])) == "pk-reference"


# --- grid, selection, tissue parameters on the real slide ----------------------------------------

@pytest.fixture(scope="module")
def cmu():
    slide = openslide.OpenSlide(str(slide_path("CMU-1-Small-Region.svs")))
    yield slide, float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
    slide.close()


def test_reference_tissue_grid_and_tiles_at_level_0_equal_the_official_rule(cmu):
    """The setting of issue 22 (448 level-0 px tiles): official tissue at Dice 1, anchor (73, 78),
    the same 286 tiles."""
    slide, mpp0 = cmu
    cfg = load_config(overrides=["profile=reference", f"tiling.target_mpp={mpp0}"])
    thumb, tmpp = read_thumbnail(slide, mpp0, cfg.tissue.thumbnail_mpp)
    tissue = segment_tissue(thumb, tmpp, cfg.tissue)
    contours, holes, official = official_tissue(np.asarray(slide.read_region((0, 0), 0, slide.dimensions).convert("RGB")))
    assert tissue.mask.shape == official.shape and np.array_equal(tissue.mask > 0, official)
    default = segment_tissue(*read_thumbnail(slide, mpp0, 8.0), TissueConfig())
    up = cv2.resize(default.mask, slide.dimensions, interpolation=cv2.INTER_NEAREST) > 0
    assert 0.9 < 2 * (up & official).sum() / (up.sum() + official.sum()) < 0.99   # ours differs a little
    origin = tissue_anchor(tissue.contours, tissue.mpp, mpp0)
    assert origin == (73, 78)
    g = make_grid(*slide.dimensions, mpp0, mpp0, 448, 112, origin=origin, padding="black", every_start=True)
    tiles = tile_table(g, tissue, 0.25, "cmu", "four_point")
    assert sorted(zip(tiles["x"].to_pylist(), tiles["y"].to_pylist())) == sorted(official_tiles(contours, holes))
    assert tiles.num_rows == 286


def test_grid_origin_and_every_start():
    g = make_grid(1000, 800, 0.5, 0.5, 448, 112, origin=(73, 78))
    x, y = tile_origins(g, np.array([0, 1]), np.array([0, 2]))
    assert x.tolist() == [73, 297] and y.tolist() == [78, 190]
    assert (g.n_cols, g.n_rows) == (6, 4)                       # the last tile reaches the edge
    e = make_grid(1000, 800, 0.5, 0.5, 448, 112, origin=(73, 78), every_start=True)
    assert (e.n_cols, e.n_rows) == (9, 7)                       # every top-left inside the slide
    assert 73 + 112 * (e.n_cols - 1) < 1000 <= 73 + 112 * e.n_cols
    with pytest.raises(ValueError, match="outside"):
        make_grid(1000, 800, 0.5, 0.5, 448, 112, origin=(1000, 0))


def test_black_padding_is_openslide_through_convert_rgb(cmu):
    """A tile past the slide's right edge: with padding black, the region reader (TIFF tiles and
    OpenSlide) gives what read_region(...).convert('RGB') gives; white by default."""
    slide, mpp0 = cmu
    w, h = slide.dimensions
    tiff = None
    from zeus_ray.slides.tiff_levels import TiffLevels
    tiff = TiffLevels.open(str(slide_path("CMU-1-Small-Region.svs")), slide)
    assert tiff is not None
    for padding, fill in (("black", 0), ("white", 255)):
        g = make_grid(w, h, mpp0, mpp0, 448, 112, origin=(73, 78), padding=padding, every_start=True)
        col = g.n_cols - 1
        x, y = (int(v[0]) for v in tile_origins(g, np.array([3]), np.array([col])))
        table = {"tile_id": np.array([3 * g.n_cols + col]), "grid_row": np.array([3]), "grid_col": np.array([col])}
        region = plan_regions(table, g, 8, "cmu")[0]
        want = np.asarray(slide.read_region((x, y), 0, (448, 448)).convert("RGB")).copy()
        want[:, w - x:] = fill
        for reader in (None, tiff):
            _, tiles = read_region_tiles(slide, g, region, tiff=reader)
            assert np.array_equal(tiles[0], want), (padding, reader)
    tiff.close()


# --- CONCH tokenisation through the encoder -------------------------------------------------------

def test_conch_tokenization_option_reaches_the_text_tower(tmp_path):
    from zeus_ray.encoders.registry import load_encoder
    _, model = write_conch_checkpoint(tmp_path)
    tok = make_conch_tokenizer(tmp_path / "conch_byte_level_bpe_uncased.json", prefix_space=True)
    texts = ["An H&E stained image of leiomyoma.", "normal tissue"]
    with torch.inference_mode():
        want = model.encode_text(torch.from_numpy(pinned_ids(tok, texts)), normalize=True).numpy()
    cfg = dict(id="conch", weights=str(tmp_path), tokenizer=str(tok), device="cpu")
    pinned = load_encoder(ModelConfig(**cfg, conch_tokenization="zeus-pinned")).encode_texts(texts)
    conch = load_encoder(ModelConfig(**cfg)).encode_texts(texts)
    np.testing.assert_allclose(pinned, want, atol=1e-5)
    assert np.abs(conch - want).max() > 1e-3


# --- smoothing in the official order and offset-aware resampling ----------------------------------

def test_official_order_smoothing_is_the_official_arithmetic():
    rng = np.random.default_rng(0)
    cells = rng.random((9, 7)) < 0.3
    cell, origin, shape, patch = 16, (5, 9), (150, 120), 64
    tissue = np.zeros(shape, bool)
    tissue[20:140, 10:100] = True
    got = official_order_smoothing(cells, cell, origin, shape, patch, tissue)
    canvas = np.zeros(shape, np.uint8)
    for r, c in zip(*np.nonzero(cells)):
        y0, x0 = origin[1] + r * cell, origin[0] + c * cell
        canvas[y0:y0 + cell, x0:x0 + cell] = 255               # cells past the canvas are cut off
    want = (cv2.GaussianBlur(canvas, (2 * patch + 1, 2 * patch + 1), 0) > 25.5) & tissue
    assert np.array_equal(got, want) and got.any() and not got[~tissue].any()
    # the blur runs before the tissue cut: tumour outside tissue still spreads into it
    outside = np.zeros((9, 7), bool)
    outside[0, 0] = True                                      # canvas [9, 25) × [5, 21): outside tissue
    assert official_order_smoothing(outside, cell, origin, shape, patch, tissue)[20:30, 10:25].any()


def test_resample_nearest_offset_and_rasterise_origin():
    a = np.arange(12).reshape(3, 4)
    out = resample_nearest(a, 10, (4, 5), 10, -1, offset=(-10, 5))
    assert out[0].tolist() == [-1] * 5                        # row centre -5: outside
    assert out[1].tolist() == [1, 2, 3, -1, -1]               # x centres 10, 20, 30, 40: columns 1, 2, 3, outside
    assert np.array_equal(resample_nearest(a, 10, (3, 4), 10, -1, offset=(0.0, 0.0)), a)
    ann = Annotation(source="test", geometry=box(30, 40, 70, 80))
    shifted = rasterise_annotation(ann, (10, 10), 10.0, (20, 30))
    plain = rasterise_annotation(ann, (10, 10), 10.0)
    assert np.array_equal(shifted[:-3, :-2], plain[3:, 2:])   # origin x 20, y 30: 2 columns, 3 rows and shifted.sum() == plain.sum() == 16


# --- a grid anchored at the tissue without the rest of the profile: outputs stay aligned ---------

def test_anchored_grid_outputs_stay_on_the_slide(tmp_path):
    """`zeus run` with tiling.anchor=tissue alone: the cell grid starts at the tissue's bounding box,
    and the metrics, mask.tiff and polygons are placed by that origin (checked against the
    annotation and the stored cell mask, independently of the code that wrote them)."""
    import json
    import subprocess
    import sys

    import shapely
    import tifffile
    from shapely.geometry import shape

    from _cohort import completed_results, make_cohort
    manifest = make_cohort(tmp_path / "c", n=1)
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-m", "zeus_ray", "run", "--no-progress", "--set", f"input.manifest={manifest}",
                        "--set", f"output.root={out}", "--set", "model.id=random:vit_tiny_patch16_224",
                        "--set", f"cache.dir={tmp_path / 'cache'}", "--set", "tiling.anchor=tissue"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    res = completed_results(out)["syn-0"]
    grid = json.loads(next(out.glob("slides/syn-0/tiles/*/tiles.json")).read_text())["grid"]
    ox, oy = grid["origin_x"], grid["origin_y"]
    assert ox % 224 and oy % 224                               # off the slide-origin lattice
    with np.load(res / "maps.npz") as z:
        tissue, cell0 = z["tissue"], float(z["cell0"])
        assert z["origin0"].tolist() == [ox, oy]
    cells = np.array(Image.open(next(res.glob("mask_*mpp.png")))) > 0
    lesion = shapely.union_all([shape(f["geometry"]) for f in
                                json.loads((tmp_path / "c" / "syn-0.geojson").read_text())["features"]])
    f = 4
    up = lambda m: np.kron(m, np.ones((f, f), dtype=bool)).astype(bool)  # noqa: E731
    ys, xs = (np.mgrid[0:cells.shape[0] * f, 0:cells.shape[1] * f] + 0.5) * (cell0 / f)
    truth = shapely.contains_xy(lesion, xs + ox, ys + oy) & up(tissue)
    pred = up(cells) & up(tissue)
    tp, fp, fn = (pred & truth).sum(), (pred & ~truth).sum(), (~pred & truth).sum()
    assert json.loads((res / "metrics.json").read_text())["dice"] == pytest.approx(2 * tp / (2 * tp + fp + fn), abs=1e-9)
    assert truth.sum() > 20 and tp > 0
    d = json.loads((res / "result.json").read_text())["viewer_downsample"]
    tiff = tifffile.imread(res / "mask.tiff", level=0) > 0
    vy, vx = (np.mgrid[0:tiff.shape[0], 0:tiff.shape[1]] + 0.5) * d
    ci, cj = np.floor((vy - oy) / cell0).astype(int), np.floor((vx - ox) / cell0).astype(int)
    inside = (ci >= 0) & (cj >= 0) & (ci < cells.shape[0]) & (cj < cells.shape[1])
    want = np.zeros_like(tiff)
    want[inside] = cells[ci[inside], cj[inside]]
    assert np.array_equal(tiff, want) and tiff.any()
    polys = shapely.union_all([shape(f["geometry"]) for f in json.loads((res / "prediction.geojson").read_text())["features"]])
    assert abs(polys.area - tiff.sum() * d * d) < 0.05 * polys.area   # the polygons outline the viewer raster
    assert polys.intersection(shapely.box(ox, oy, ox + 1e9, oy + 1e9)).area == pytest.approx(polys.area)
