"""`profile: reference` against an independent re-computation of the published ZEUS pipeline's
arithmetic (cvblab/ZEUS e7b7f89, read for its rules, not copied): CLAM tissue segmentation with the
official parameters, one tile grid per tissue contour anchored at its bounding box with the
four-point rule, tiles read with black padding, CONCH prompts tokenised without the prefix space
(transformers 4.53), summed score canvas, argmax, uint8 Gaussian blur of the UN-cut argmax, > 10 %,
then the tissue cut.

The model is the small variant of the CONCH classes (random weights in the official checkpoint
layout, tests/_checkpoints.py) with a byte-level BPE saved with add_prefix_space on, as CONCH's
file; the slide is the real CMU-1-Small-Region.svs, run at 2 × its level-0 µm/px (≈ 10x, the
AI4SKIN setting): the official code's level 0 is then the slide at that resolution.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import openslide
import pyarrow.parquet as pq
import pytest
import shapely
import torch
from PIL import Image
from shapely.geometry import Polygon

from _checkpoints import make_conch_tokenizer, write_conch_checkpoint
from zeus_ray.config import ModelConfig, load_config
from zeus_ray.encoders.conch import ConchTokenizer
from zeus_ray.encoders.registry import load_encoder
from zeus_ray.prompts import load_prompt_set

ROOT = Path(__file__).resolve().parents[1]
PATCH, STEP = 448, 112


def slide_path(name: str) -> Path:
    """A test slide: tests/data/slides first, then ../shared/data/slides."""
    for d in (ROOT / "tests" / "data" / "slides", ROOT.parent / "shared" / "data" / "slides"):
        if (d / name).is_file():
            return d / name
    pytest.fail(f"{name} is in neither tests/data/slides nor ../shared/data/slides")


# --- the pinned-environment tokenisation rule ------------------------------------------------------

def pinned_ids(tokenizer_file: Path, texts: list[str], context_length: int = 128) -> np.ndarray:
    """Ids as transformers 4.53's PreTrainedTokenizerFast gives them for CONCH's file: byte-level
    pre-tokenizer WITHOUT the prefix space, <start_of_text> … <end_of_text>, truncated and padded
    to 127, one more <pad>."""
    from tokenizers import Tokenizer, pre_tokenizers
    tok = Tokenizer.from_file(str(tokenizer_file))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.post_processor = None
    tok.no_padding()
    tok.no_truncation()
    sot, eot, pad = (tok.token_to_id(t) for t in ("<start_of_text>", "<end_of_text>", "<pad>"))
    out = np.full((len(texts), context_length), pad, np.int64)
    for i, t in enumerate(texts):
        ids = [sot] + tok.encode(t, add_special_tokens=False).ids[:context_length - 3] + [eot]
        out[i, :len(ids)] = ids
    return out


@pytest.fixture(scope="module")
def conch_files(tmp_path_factory):
    d = tmp_path_factory.mktemp("conch")
    # seed 3: about a third of this slide's tiles score tumour, so both masks have both classes
    _, model = write_conch_checkpoint(d, seed=3)
    tok = make_conch_tokenizer(d / "conch_byte_level_bpe_uncased.json", prefix_space=True)
    return d, tok, model


def test_pinned_tokenisation_on_every_prompt_set(conch_files):
    _, tok_file, _ = conch_files
    pinned = ConchTokenizer(tok_file, prefix_space=False)
    conch = ConchTokenizer(tok_file)
    for yaml_file in sorted((ROOT / "prompts").glob("*.yaml")):
        texts = [p for _, ps in load_prompt_set(yaml_file).prompts() for p in ps]
        np.testing.assert_array_equal(pinned(texts).numpy(), pinned_ids(tok_file, texts), err_msg=yaml_file.name)
        # CONCH's own rule (the default) differs exactly there: a space before the first word
        assert (conch(texts).numpy() != pinned(texts).numpy()).any(axis=1).all(), yaml_file.name
    assert ModelConfig().conch_tokenization == "conch"
    assert load_config(overrides=["profile=reference"]).model.conch_tokenization == "zeus-pinned"


# --- the official pipeline's arithmetic, written here --------------------------------------------

def official_tissue(rgb: np.ndarray):
    """CLAM segmentation with ZEUS's parameters at level 0: saturation, median 7, Otsu, closing
    12 × 12, RETR_CCOMP, tissue net area > 2·512² px, 8 largest holes > 16·512² px."""
    sat = cv2.cvtColor(rgb, cv2.COLOR_RGB2HSV)[:, :, 1]
    _, binary = cv2.threshold(cv2.medianBlur(sat, 7), 0, 255, cv2.THRESH_OTSU + cv2.THRESH_BINARY)
    binary = cv2.morphologyEx(binary, cv2.MORPH_CLOSE, np.ones((12, 12), np.uint8))
    contours, hierarchy = cv2.findContours(binary, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_NONE)
    parent = hierarchy[0][:, 3]
    kept, holes = [], []
    for i in np.flatnonzero(parent == -1):
        own = [contours[j] for j in np.flatnonzero(parent == i)]
        area = cv2.contourArea(contours[i]) - sum(cv2.contourArea(h) for h in own)
        if area > 2 * 512 ** 2:
            kept.append(contours[i])
            own = sorted(own, key=cv2.contourArea, reverse=True)[:8]
            holes.append([h for h in own if cv2.contourArea(h) > 16 * 512 ** 2])
    mask = np.zeros(binary.shape, np.uint8)
    cv2.drawContours(mask, kept, -1, 255, cv2.FILLED)
    for hs in holes:
        cv2.drawContours(mask, hs, -1, 0, cv2.FILLED)
    return kept, holes, mask > 0


def official_tiles(contours, holes) -> list[tuple[int, int]]:
    """Per contour: x, y from its bounding box's top-left in steps of 112 while inside the box;
    kept when one of centre ± 112 is inside/on the contour and the centre is in none of its holes."""
    out = []
    for cont, hs in zip(contours, holes):
        bx, by, bw, bh = cv2.boundingRect(cont)
        for y in range(by, by + bh, STEP):
            for x in range(bx, bx + bw, STEP):
                c = (x + PATCH // 2, y + PATCH // 2)
                d = PATCH // 2 // 2
                pts = [(c[0] - d, c[1] - d), (c[0] + d, c[1] + d), (c[0] + d, c[1] - d), (c[0] - d, c[1] + d)]
                if any(cv2.pointPolygonTest(cont, (float(a), float(b)), False) >= 0 for a, b in pts) and \
                        not any(cv2.pointPolygonTest(h, (float(c[0]), float(c[1])), False) > 0 for h in hs):
                    out.append((x, y))
    return out


def dice(a, b) -> float:
    return 2 * np.logical_and(a, b).sum() / (a.sum() + b.sum())


def test_zeus_run_reference_profile_matches_the_official_arithmetic(conch_files, tmp_path):
    weights_dir, tok_file, model = conch_files
    path = slide_path("CMU-1-Small-Region.svs")
    slide = openslide.OpenSlide(str(path))
    try:
        mpp0 = float(slide.properties[openslide.PROPERTY_NAME_MPP_X])
        w0, h0 = slide.dimensions
        # the official input: the slide at 2 × mpp0, past its edge black (convert('RGB'))
        pad_w, pad_h = w0 + w0 % 2, h0 + h0 % 2
        level0 = np.asarray(slide.read_region((0, 0), 0, (pad_w, pad_h)).convert("RGB"))
    finally:
        slide.close()
    image = cv2.resize(level0, (pad_w // 2, pad_h // 2), interpolation=cv2.INTER_AREA)
    target = 2 * mpp0

    # a ground truth: a QuPath polygon (level-0 px) over part of the tissue; vertices off the
    # integers so that no pixel centre lies on an edge (where point-in-polygon conventions differ)
    lesion = [[600.3, 800.7], [1700.1, 700.4], [1600.6, 2100.2], [700.2, 1900.9], [600.3, 800.7]]
    ann = tmp_path / "cmu.geojson"
    ann.write_text(json.dumps({"type": "FeatureCollection", "features": [{
        "type": "Feature", "geometry": {"type": "Polygon", "coordinates": [lesion]},
        "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}}]}))
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(f"slide_id,uri,annotation_uri\ncmu,{path},{ann}\n")
    out = tmp_path / "out"
    job = tmp_path / "job.yaml"
    job.write_text(f"input: {{manifest: '{manifest}'}}\noutput: {{root: '{out}', embedding_dtype: float32}}\n"
                   f"model: {{id: conch, weights: '{weights_dir}', tokenizer: '{tok_file}', device: cpu}}\n"
                   f"tiling: {{target_mpp: {target!r}}}\ncache: {{dir: '{tmp_path / 'cache'}'}}\n"
                   f"prompts: {{file: '{ROOT / 'prompts' / 'ai4skin-leiomyoma.yaml'}'}}\nprofile: reference\n")
    p = subprocess.run([sys.executable, "-m", "zeus_ray", "run", str(job), "--no-progress"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]

    # tissue and tiles
    contours, holes, tissue = official_tissue(image)
    ours_tissue = np.array(Image.open(next(out.glob("slides/*/tiles/*/tissue_mask_*mpp.png")))) > 0
    hh, ww = min(tissue.shape[0], ours_tissue.shape[0]), min(tissue.shape[1], ours_tissue.shape[1])
    assert dice(tissue[:hh, :ww], ours_tissue[:hh, :ww]) > 0.995
    want_tiles = official_tiles(contours, holes)
    tiles = pq.read_table(next(out.glob("slides/*/tiles/*/tiles.parquet")))
    got_tiles = sorted(zip((tiles["x"].to_numpy() // 2).tolist(), (tiles["y"].to_numpy() // 2).tolist()))
    assert got_tiles == sorted(want_tiles) and len(want_tiles) > 30

    # tiles (black past the edge), embeddings and the pinned-token class matrix
    canvas_pad = np.zeros((image.shape[0] + PATCH, image.shape[1] + PATCH, 3), np.uint8)
    canvas_pad[:image.shape[0], :image.shape[1]] = image
    pixels = np.stack([canvas_pad[y:y + PATCH, x:x + PATCH] for x, y in want_tiles])
    enc = load_encoder(ModelConfig(id="conch", weights=str(weights_dir), tokenizer=str(tok_file), device="cpu"),
                       tiny=True)
    emb = enc.encode_images(pixels).astype(np.float64)
    groups = load_prompt_set(ROOT / "prompts" / "ai4skin-leiomyoma.yaml").prompts()
    assert [name for name, _ in groups] == ["normal", "tumor"]
    weights = []
    with torch.inference_mode():
        for _, texts in groups:
            t = model.encode_text(torch.from_numpy(pinned_ids(tok_file, texts)), normalize=False).double().numpy()
            t = (t / np.linalg.norm(t, axis=1, keepdims=True)).mean(0)
            weights.append(t / np.linalg.norm(t))
    scores = (emb / np.linalg.norm(emb, axis=1, keepdims=True)) @ np.stack(weights).T

    # summed score canvas, argmax (normal first), uint8 blur of the un-cut argmax, > 10 %, tissue cut
    h, w = image.shape[:2]
    sums = np.zeros((2, h, w), np.float32)
    for (x, y), s in zip(want_tiles, scores):
        sums[:, y:min(y + PATCH, h), x:min(x + PATCH, w)] += s[:, None, None].astype(np.float32)
    pred = np.argmax(sums, axis=0).astype(np.uint8) * 255
    pred = cv2.GaussianBlur(pred, (2 * PATCH + 1, 2 * PATCH + 1), 0) > 255 * 0.1
    want = pred & tissue

    ours = np.array(Image.open(next(out.glob("slides/*/results/*/*-zeus-pinned-reference/mask_*mpp.png")))) > 0
    assert ours.shape == want.shape
    assert 0.05 < want.mean() < 0.95                          # a mask with both classes, not a trivial one
    assert dice(ours, want) >= 0.99, dice(ours, want)

    # metrics as the official evaluation counts them: target pixels inside tissue, 1e-6 smoothing
    ys, xs = (np.mgrid[0:h, 0:w] + 0.5) * 2                   # canvas pixel centres, level-0 px
    truth = shapely.contains_xy(Polygon(lesion), xs, ys)[tissue]
    pred = want[tissue]
    tp = (truth & pred).sum()
    official = {"dice": (2 * tp + 1e-6) / (truth.sum() + pred.sum() + 1e-6),
                "precision": (tp + 1e-6) / (pred.sum() + 1e-6), "recall": (tp + 1e-6) / (truth.sum() + 1e-6)}
    res = next(out.glob("slides/*/results/*/*-zeus-pinned-reference"))
    metrics = json.loads((res / "metrics.json").read_text())
    assert metrics["metric_convention"] == "reference" and metrics["metric_mpp"] == pytest.approx(target)
    for k, v in official.items():
        assert metrics[k] == pytest.approx(v, abs=1e-9), (k, metrics[k], v)
    # `zeus evaluate` recomputes them from the stored outputs alone
    (res / "metrics.json").unlink()
    p = subprocess.run([sys.executable, "-m", "zeus_ray", "evaluate", str(out)], capture_output=True, text=True,
                       cwd=ROOT, timeout=300)
    assert p.returncode == 0, p.stdout[-2000:] + p.stderr[-3000:]
    again = json.loads((res / "metrics.json").read_text())
    assert {k: again[k] for k in official} == {k: metrics[k] for k in official}
