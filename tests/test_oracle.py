"""End-to-end oracle: the values a `zeus run` writes, recomputed independently of the pipeline's code.

A run on two synthetic slides with lesions (GeoJSON ground truth) and the real CMU slide, with test
prompts that split the tissue (tests/data/prompts-mixed.yaml), so the mask is mixed. From the stored
embedding parts alone (read with pyarrow) every later value is recomputed with plain, brute-force
numpy/shapely: Eq. 1 class vectors from the encoder's text tower → cosines in float64 →
similarities.parquet (by class name); every tile's scores added to every pixel it covers at the
target resolution and divided by the cover count → maps.npz; argmax inside tissue → labels and
mask; the annotation's point-in-polygon truth on the metric grid → the Dice in slides.csv; the
viewer rasters against the slide's physical extent.
"""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import openslide
import pandas as pd
import pyarrow.parquet as pq
import pytest
import shapely
from PIL import Image

from _cohort import completed_results, job_config, make_cohort

ROOT = Path(__file__).resolve().parents[1]
PROMPTS = ROOT / "tests" / "data" / "prompts-mixed.yaml"


@pytest.fixture(scope="module")
def run(tmp_path_factory, slides_dir):
    import ray
    from zeus_ray.engine.driver import run_cohort
    ray.shutdown()
    ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        folder = tmp_path_factory.mktemp("oracle")
        manifest = make_cohort(folder, n=2, extra_rows=[f"cmu,{slides_dir / 'CMU-1-Small-Region.svs'},,real,C,"])
        # Annotations often reach past the tissue: a tumour square in the background corner of syn-1
        # (metrics count inside tissue only).
        ann = folder / "syn-1.geojson"
        gj = json.loads(ann.read_text())
        gj["features"].append({"type": "Feature", "properties": {"objectType": "annotation",
                                                                 "classification": {"name": "Tumor"}},
                               "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [300, 0], [300, 300],
                                                                                [0, 300], [0, 0]]]}})
        ann.write_text(json.dumps(gj))
        out = folder / "out"
        summary = run_cohort(job_config(manifest, out, f"prompts.file={PROMPTS}"), progress=False)
        assert (summary.ok, summary.failed) == (3, 0)
        yield out, manifest.parent, summary
    finally:
        ray.shutdown()


def _class_matrix() -> tuple[list[str], np.ndarray]:
    """Eq. 1 in float64: every classname × template prompt encoded, L2-normalised, averaged, renormalised."""
    import yaml
    from zeus_ray.config import ModelConfig
    from zeus_ray.encoders.registry import load_encoder
    spec = yaml.safe_load(PROMPTS.read_text())
    enc = load_encoder(ModelConfig(id="random:vit_tiny_patch16_224", device="cpu"))
    names, rows = [], []
    for c in spec["classes"]:
        texts = [t.replace("CLASSNAME", n) for n in c["classnames"] for t in spec["templates"]]
        e = np.asarray(enc.encode_texts(texts), np.float64)
        w = (e / np.linalg.norm(e, axis=1, keepdims=True)).mean(0)
        names.append(c["name"])
        rows.append(w / np.linalg.norm(w))
    return names, np.stack(rows)


def _stored(out: Path, sid: str):
    """(tiles table, embeddings float64 (N, D) in tile order, grid dict) read straight from the files."""
    tiles = pq.read_table(next(out.glob(f"slides/{sid}/tiles/*/tiles.parquet")))
    parts = pq.read_table([str(p) for p in out.glob(f"slides/{sid}/embeddings/*/*/pass-*.parquet")]).to_pandas()
    parts = parts.sort_values("tile_id")
    emb = np.stack(parts["embedding"].to_numpy()).astype(np.float64)
    grid = json.loads(tiles.schema.metadata[b"zeus.grid"])
    return tiles.to_pandas().sort_values("tile_id").reset_index(drop=True), parts, emb, grid


def _brute_force_maps(tiles: pd.DataFrame, scores: np.ndarray, grid: dict) -> np.ndarray:
    """Per-pixel (target resolution) average of the scores of every tile covering the pixel."""
    p, s = grid["patch_size"], grid["stride"]
    h, w = (grid["n_rows"] - 1) * s + p, (grid["n_cols"] - 1) * s + p
    acc = np.zeros((scores.shape[1], h, w))
    cnt = np.zeros((h, w))
    for (r, c), sc in zip(tiles[["grid_row", "grid_col"]].to_numpy(), scores):
        acc[:, r * s:r * s + p, c * s:c * s + p] += sc[:, None, None]
        cnt[r * s:r * s + p, c * s:c * s + p] += 1
    with np.errstate(invalid="ignore"):
        return acc / cnt


@pytest.fixture(scope="module")
def recomputed(run):
    out, _, _ = run
    names, W = _class_matrix()
    res = completed_results(out)
    got = {}
    for sid, d in res.items():
        tiles, parts, emb, grid = _stored(out, sid)
        assert parts["tile_id"].tolist() == tiles["tile_id"].tolist()      # full overlap: every kept tile
        cos = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ W.T
        got[sid] = dict(d=d, tiles=tiles, grid=grid, cos=cos, px=_brute_force_maps(tiles, cos, grid))
    return names, got


def test_similarities_are_the_cosines_of_the_stored_embeddings(recomputed):
    names, got = recomputed
    for sid, g in got.items():
        sims = pq.read_table(g["d"] / "similarities.parquet").to_pandas().sort_values("tile_id")
        assert sims["tile_id"].tolist() == g["tiles"]["tile_id"].tolist()
        for i, name in enumerate(names):
            np.testing.assert_allclose(sims[f"sim_{name}"], g["cos"][:, i], atol=2e-6, err_msg=f"{sid} {name}")
        assert (np.abs(g["cos"][:, 0] - g["cos"][:, 1]) > 1e-4).mean() > 0.8   # swapped columns could not pass


def test_maps_are_brute_force_per_pixel_overlap_averages(recomputed):
    names, got = recomputed
    for sid, g in got.items():
        z = np.load(g["d"] / "maps.npz")
        cell = np.gcd(g["grid"]["patch_size"], g["grid"]["stride"])
        px = g["px"]
        assert z["maps"].shape == (len(names), px.shape[1] // cell, px.shape[2] // cell)
        # Every pixel of a cell has the same covering tiles: the cell's value is each of its pixels'.
        blocks = px.reshape(len(names), px.shape[1] // cell, cell, px.shape[2] // cell, cell)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # uncovered cells are all NaN
            lo, hi = np.nanmin(blocks, axis=(2, 4)), np.nanmax(blocks, axis=(2, 4))
        assert np.array_equal(np.isnan(lo), np.isnan(z["maps"]))
        np.testing.assert_allclose(lo, hi, atol=1e-12)
        np.testing.assert_allclose(z["maps"], lo, atol=2e-6, err_msg=sid)


def _tissue_cells(out: Path, sid: str, shape, cell_um: float) -> np.ndarray:
    png = next(out.glob(f"slides/{sid}/tiles/*/tissue_mask_*mpp.png"))
    mpp = float(png.name.split("_")[2].removesuffix("mpp.png"))
    mask = np.array(Image.open(png)) > 0
    out_ = np.zeros(shape, bool)
    for i in range(shape[0]):
        for j in range(shape[1]):
            y, x = int((i + 0.5) * cell_um / mpp), int((j + 0.5) * cell_um / mpp)
            out_[i, j] = y < mask.shape[0] and x < mask.shape[1] and mask[y, x]
    return out_


def test_labels_and_mask_are_the_argmax_inside_tissue(run, recomputed):
    out = run[0]
    names, got = recomputed
    tumour = names.index("tumor")
    fractions = []
    for sid, g in got.items():
        z = np.load(g["d"] / "maps.npz")
        cell_um = float(z["cell_um"])
        tissue = _tissue_cells(out, sid, z["maps"].shape[1:], cell_um)
        assert np.array_equal(z["tissue"], tissue), sid
        labels = np.array(Image.open(next(g["d"].glob("labels_*mpp.png"))))
        mask = np.array(Image.open(next(g["d"].glob("mask_*mpp.png"))))
        covered = ~np.isnan(z["maps"]).any(0)
        want = np.where(tissue & covered, np.argmax(np.nan_to_num(z["maps"], nan=-9), axis=0) + 1, 0)
        assert np.array_equal(labels, want), sid
        assert np.array_equal(mask, np.where(want == tumour + 1, 255, 0)), sid
        assert not (mask > 0)[~tissue].any()                                # mask ⊆ tissue
        fractions.append((mask > 0).sum() / tissue.sum())
    assert all(0.2 < f < 0.8 for f in fractions), fractions                  # a mixed mask


def test_dice_in_slides_csv_from_the_annotation(run, recomputed):
    out, folder, _ = run
    _, got = recomputed
    table = pd.read_csv(next(out.glob("cohort/*/slides.csv"))).set_index("slide_id")
    checked = 0
    for sid, g in got.items():
        ann = folder / f"{sid}.geojson"
        if not ann.exists():
            assert np.isnan(table.loc[sid, "dice"])
            continue
        truth_geom = shapely.union_all([shapely.geometry.shape(f["geometry"])
                                        for f in json.loads(ann.read_text())["features"]])
        z = np.load(g["d"] / "maps.npz")
        cell0, f = float(z["cell0"]), 4                                     # metric grid: cells / 4
        h, w = z["tissue"].shape
        ys, xs = np.meshgrid((np.arange(h * f) + 0.5) * cell0 / f, (np.arange(w * f) + 0.5) * cell0 / f,
                             indexing="ij")
        truth = shapely.contains_xy(truth_geom, xs, ys)
        pred = np.kron(np.array(Image.open(next(g["d"].glob("mask_*mpp.png")))) > 0, np.ones((f, f), bool))
        valid = np.kron(z["tissue"], np.ones((f, f), bool))
        tp, fp, fn = (pred & truth & valid).sum(), (pred & ~truth & valid).sum(), (~pred & truth & valid).sum()
        assert tp > 0 and fp + fn > 0 and (sid != "syn-1" or (truth & ~valid).any())
        np.testing.assert_allclose(table.loc[sid, "dice"], 2 * tp / (2 * tp + fp + fn), atol=1e-12, err_msg=sid)
        checked += 1
    assert checked == 2


def test_viewer_rasters_cover_the_slide_and_carry_the_mask(run, recomputed, slides_dir):
    """mask.tiff / prob_*.tiff: OpenSlide reads them at the slide's physical extent (within one of
    their pixels), pyramidal, and the tumour area equals the cell-grid mask's."""
    out, folder, _ = run
    _, got = recomputed
    for sid, g in got.items():
        src = openslide.OpenSlide(str(slides_dir / "CMU-1-Small-Region.svs") if sid == "cmu" else str(folder / f"{sid}.svs"))
        mpp0 = float(src.properties["openslide.mpp-x"])
        for name in ("mask.tiff", "prob_tumor.tiff"):
            v = openslide.OpenSlide(str(g["d"] / name))
            mpp = float(v.properties["openslide.mpp-x"])
            assert abs(float(v.properties["openslide.mpp-y"]) - mpp) < 1e-9
            for a, b in zip(v.dimensions, src.dimensions):
                assert abs(a * mpp - b * mpp0) <= mpp, (sid, name, v.dimensions, mpp, src.dimensions, mpp0)
            assert v.level_count >= 2 or max(v.dimensions) <= 256
            assert round(mpp / mpp0) <= 16 and abs(mpp / mpp0 - round(mpp / mpp0)) < 1e-6   # integer downsample
        v = openslide.OpenSlide(str(g["d"] / "mask.tiff"))
        tiff_mask = np.asarray(v.read_region((0, 0), 0, v.dimensions).convert("L")) > 0
        cells = np.array(Image.open(next(g["d"].glob("mask_*mpp.png")))) > 0
        z = np.load(g["d"] / "maps.npz")
        cell_area = (float(z["cell_um"])) ** 2
        px_area = float(v.properties["openslide.mpp-x"]) ** 2
        perimeter_cells = (np.diff(cells.astype(int), axis=0) != 0).sum() + (np.diff(cells.astype(int), axis=1) != 0).sum()
        # Nearest sampling moves each cell edge by under one raster pixel.
        tol = perimeter_cells * float(z["cell_um"]) * float(v.properties["openslide.mpp-x"]) + 4 * px_area
        assert abs(tiff_mask.sum() * px_area - cells.sum() * cell_area) <= tol, sid


def test_reference_postprocess_from_stored_embeddings(run, recomputed):
    """`postprocess: reference` on the stored embeddings (a re-prompt: no slide read): its own results
    folder; the mask is the published code's smoothing in its order, recomputed here from maps.npz:
    the UN-cut argmax painted on the slide's canvas at the target resolution (1 µm/px), 0/255 uint8,
    OpenCV's Gaussian blur (kernel 2 × 448 + 1 px, σ from the size), > 10 %, then cut to the tissue
    mask read at the canvas pixels; metrics.json names the post-processing and the conventions."""
    import cv2
    from zeus_ray.commands.reprompt import reprompt_config
    from zeus_ray.engine.driver import run_cohort
    out = run[0]
    names, got = recomputed
    cfg = reprompt_config(str(out), str(PROMPTS), None, ["postprocess=reference"], None)
    s = run_cohort(cfg, progress=False, reprompt=True)
    assert s.ok == 3 and s.tiles_encoded == 0 and s.prompt_key.endswith("-reference")
    ti = names.index("tumor")
    for sid, g in got.items():
        d = next(out.glob(f"slides/{sid}/results/*/{s.prompt_key}"))
        z = np.load(d / "maps.npz")
        covered = z["counts"] > 0
        uncut = covered & (np.where(covered[None], np.nan_to_num(z["maps"], nan=-np.inf), -np.inf).argmax(0) == ti)
        mask_file = next(d.glob("mask_*mpp.png"))
        px = float(mask_file.name[len("mask_"):-len("mpp.png")])     # the canvas: the target µm/px
        assert px == pytest.approx(1.0)
        mask = np.array(Image.open(mask_file)) > 0
        w0, h0, mpp0 = g["grid"]["width"], g["grid"]["height"], g["grid"]["mpp0"]
        assert mask.shape == (int(np.ceil(h0 * mpp0 / px - 1e-6)), int(np.ceil(w0 * mpp0 / px - 1e-6)))
        cell = int(round(float(z["cell_um"]) / px))                 # 112 µm = 112 canvas px
        canvas = np.zeros(mask.shape, np.uint8)
        painted = np.kron(uncut.astype(np.uint8), np.ones((cell, cell), np.uint8))[:mask.shape[0], :mask.shape[1]]
        canvas[:painted.shape[0], :painted.shape[1]] = painted * 255
        blurred = cv2.GaussianBlur(canvas, (897, 897), 0) > 255 * 0.1
        tfile = next(out.glob(f"slides/{sid}/tiles/*/tissue_mask_*mpp.png"))
        tmpp = float(tfile.name[len("tissue_mask_"):-len("mpp.png")])
        tissue = np.array(Image.open(tfile)) > 0
        rows = np.minimum(((np.arange(mask.shape[0]) + 0.5) * px / tmpp).astype(int), tissue.shape[0] - 1)
        cols = np.minimum(((np.arange(mask.shape[1]) + 0.5) * px / tmpp).astype(int), tissue.shape[1] - 1)
        want = blurred & tissue[np.ix_(rows, cols)]
        assert (mask != want).mean() <= 1e-3, sid                    # tissue resampling at pixel edges at most
        assert mask.sum() >= (uncut & z["tissue"]).sum() * cell * cell * 0.9   # the blur dilates
        if (d / "metrics.json").exists():
            m = json.loads((d / "metrics.json").read_text())
            assert m["postprocess"] == "reference" and m["metric_convention"] == "reference"
    run_json = json.loads(next(out.glob(f"cohort/{s.prompt_key}/run.json")).read_text())
    assert run_json["postprocess"] == "reference" and run_json["smoothing"]["kernel_um"] == 897
