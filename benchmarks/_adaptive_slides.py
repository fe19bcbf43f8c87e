"""The slides of the adaptive-overlap study (bench_adaptive.py): the two real H&E slides of
tests/data/slides and synthetic 20x slides with lesions of several shapes and sizes, written once
under benchmarks/_work/adaptive/slides (named by a hash of their spec)."""
from __future__ import annotations

import hashlib
import math
import os
from pathlib import Path

import numpy as np
from shapely import affinity
from shapely.geometry import Point, Polygon

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "benchmarks" / "_work" / "adaptive"
SLIDES = ROOT / "tests" / "data" / "slides"
SYN_MPP = 0.5          # 20x synthetic slides, read at level 1 (downsample 2 = 10x)
SYN_VERSION = 1        # bump when the cohort below changes


def _um(geom):
    """µm → level-0 px of the synthetic slides."""
    return affinity.scale(geom, 1 / SYN_MPP, 1 / SYN_MPP, origin=(0, 0))


def _wobbly(cx, cy, r, rng, amp=0.18, n=180, harmonics=(2, 3, 5, 8)):
    """A closed irregular shape (µm) around (cx, cy) with mean radius r."""
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    rad = np.ones(n)
    for k in harmonics:
        rad += rng.uniform(0, amp / math.sqrt(k)) * np.cos(k * t + rng.uniform(0, 2 * np.pi))
    return Polygon(np.c_[cx + r * rad * np.cos(t), cy + r * rad * np.sin(t)]).buffer(0)


def _star(cx, cy, r_out, r_in, points=6, rot=0.3):
    t = np.linspace(0, 2 * np.pi, 2 * points, endpoint=False) + rot
    rad = np.where(np.arange(2 * points) % 2 == 0, r_out, r_in)
    return Polygon(np.c_[cx + rad * np.cos(t), cy + rad * np.sin(t)])


def synthetic_cohort() -> list[dict]:
    """Slide specs in µm: (name, width, height, tissue, lesions). Tile = 448 µm, stride 112 µm."""
    rng = np.random.default_rng(7)
    out = []
    # A: one large irregular piece; a large lesion, a 300 µm island (smaller than a tile), a 180 µm one.
    tissue = _wobbly(2600, 2100, 1800, rng)
    lesions = [_wobbly(2100, 1900, 750, rng, amp=0.3), Point(3700, 2700).buffer(150),
               Point(3300, 1000).buffer(90)]
    out.append(dict(name="syn-blobs", w=5200, h=4200, tissue=[tissue], lesions=lesions))
    # B: two pieces; a star, a thin oblique band, a tiny island, a lesion touching the tissue edge.
    t1, t2 = _wobbly(1700, 1900, 1350, rng), _wobbly(4300, 1800, 1000, rng)
    band = affinity.rotate(Polygon([(-700, -90), (700, -90), (700, 90), (-700, 90)]), 35)
    lesions = [_star(1500, 1700, 650, 300), affinity.translate(band, 4300, 1800),
               Point(2500, 2900).buffer(110), Point(4300, 800).buffer(350)]
    out.append(dict(name="syn-shapes", w=5600, h=3800, tissue=[t1, t2], lesions=lesions))
    # C: a long skin-like strip; a ring lesion (with a hole), a cluster of small islands, no-lesion end.
    strip = Polygon([(300, 900), (6900, 700), (7000, 2300), (400, 2500)]).buffer(150)
    ring = Point(1800, 1600).buffer(600).difference(Point(1800, 1600).buffer(250))
    cluster = [Point(3600 + dx, 1500 + dy).buffer(r) for dx, dy, r in
               [(0, 0, 120), (330, 220, 80), (-250, 350, 160), (450, -300, 100), (150, -420, 60)]]
    out.append(dict(name="syn-strip", w=7300, h=3200, tissue=[strip], lesions=[ring, *cluster]))
    # D: an excision-sized piece (11 × 4.6 mm, as whole skin excisions are): a 2.8 mm irregular
    # nodule and a 400 µm satellite; the small slides above have far more contour per tile.
    lens = affinity.scale(_wobbly(0, 0, 1.0, rng, amp=0.08), 5500, 2300, origin=(0, 0))
    nodule = _wobbly(4600, 2700, 1400, rng, amp=0.25)
    out.append(dict(name="syn-excision", w=12000, h=5400, tissue=[affinity.translate(lens, 6000, 2700)],
                    lesions=[nodule, Point(8300, 2100).buffer(200)]))
    return out


def scale_cohort() -> list[dict]:
    """One slide of whole-slide size (18 × 12 mm; a 16 × 9 mm excision and a fragment), measured
    apart from the cohort above (`--scale`), to see how the saving grows with slide size: a large
    irregular tumour, satellites of 100–300 µm, a thin band and a lesion touching the tissue edge."""
    rng = np.random.default_rng(11)
    excision = affinity.scale(_wobbly(0, 0, 1.0, rng, amp=0.1), 8000, 4500, origin=(0, 0))
    excision = affinity.rotate(affinity.translate(excision, 9000, 5800), 8)
    fragment = _wobbly(3200, 10300, 1100, rng, amp=0.2)
    band = affinity.rotate(Polygon([(-1000, -110), (1000, -110), (1000, 110), (-1000, 110)]), -25)
    lesions = [_wobbly(7600, 5600, 2000, rng, amp=0.3), Point(11800, 4200).buffer(300),
               Point(12600, 6900).buffer(180), Point(5200, 7300).buffer(100), affinity.translate(band, 13500, 6200),
               Point(16600, 5900).buffer(500), _wobbly(3300, 10200, 450, rng, amp=0.35)]
    return [dict(name="syn-wsi", w=18000, h=12000, tissue=[excision, fragment], lesions=lesions)]


def write_cohort(specs: list[dict] | None = None) -> list[dict]:
    """Write the synthetic slides once (named by a hash of their spec)."""
    from shapely.ops import unary_union
    from zeus_ray.demo.synthetic import write_synthetic_slide

    entries = []
    for spec in synthetic_cohort() if specs is None else specs:
        tissue, lesions = unary_union(spec["tissue"]), unary_union(spec["lesions"])
        h = hashlib.sha1(f"{SYN_VERSION}{spec['w']}{spec['h']}{tissue.wkt}{lesions.wkt}".encode()).hexdigest()[:10]
        path = WORK / "slides" / f"{spec['name']}-{h}.svs"
        if not path.exists():
            tmp = path.with_suffix(".tmp.svs")
            write_synthetic_slide(tmp, int(spec["w"] / SYN_MPP), int(spec["h"] / SYN_MPP), SYN_MPP,
                                  tissue=_um(tissue), lesions=_um(lesions.intersection(tissue)),
                                  downsamples=(1, 2, 8), seed=3)
            os.replace(tmp, path)
        entries.append({"slide_id": spec["name"], "uri": str(path), "mpp": None, "kind": "synthetic"})
    return entries


def slide_entries() -> list[dict]:
    real = [{"slide_id": "CMU-1-Small-Region", "uri": str(SLIDES / "CMU-1-Small-Region.svs"), "mpp": None,
             "kind": "real"},
            {"slide_id": "TCGA-CR-7395", "uri": str(SLIDES / "TCGA-CR-7395-01A-01-TS1.svs"), "mpp": 0.25,
             "kind": "real"}]
    return real + write_cohort()
