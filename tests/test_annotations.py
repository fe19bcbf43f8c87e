"""Ground-truth readers: the same lesion written by the test in QuPath GeoJSON, ASAP XML, Aperio
ImageScope XML and a mask PNG must give the same raster on the cell grid."""
from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import cv2
import numpy as np
import pytest
import shapely
from shapely.geometry import MultiPolygon, Polygon, box

from zeus_ray.truth.annotations import rasterise_annotation, rasterise_geometry, read_annotation
from zeus_ray.errors import AnnotationError

CELL0 = 10.5            # level-0 px per cell (deliberately not an integer)
GRID = (300, 380)       # cells: 3150 x 3990 level-0 px
SHELL = [(400, 300), (1900, 350), (2100, 1500), (1200, 1900), (350, 1400)]
HOLE = [(800, 700), (1500, 650), (1600, 1300), (900, 1350)]
ISLAND = [(1050, 900), (1300, 880), (1350, 1100), (1100, 1150)]
SECOND = [(2500, 1800), (3600, 2000), (3300, 2900), (2600, 2700)]
STROMA = [(100, 2200), (1800, 2300), (1700, 3000), (200, 3050)]


def lesion():
    return MultiPolygon([Polygon(SHELL, [HOLE]), Polygon(ISLAND), Polygon(SECOND)])


def centres_inside(geom, shape, cell0):
    """Independent reference: shapely point-in-polygon at every cell centre."""
    yy, xx = np.mgrid[0:shape[0], 0:shape[1]]
    return shapely.contains_xy(geom, (xx + 0.5) * cell0, (yy + 0.5) * cell0)


# --- writers for the four formats (what QuPath, ASAP and ImageScope save) --------------------------

def feature(coords, cls, gtype="Polygon", object_type="annotation"):
    props = {"objectType": object_type}
    if cls is not None:
        props["classification"] = {"name": cls, "color": [255, 0, 0]}
    return {"type": "Feature", "id": "x", "geometry": {"type": gtype, "coordinates": coords}, "properties": props}


def ring(c):
    return [list(p) for p in c] + [list(c[0])]


def write_geojson(path, features, bare_list=False):
    obj = features if bare_list else {"type": "FeatureCollection", "features": features}
    Path(path).write_text(json.dumps(obj))
    return str(path)


def write_asap(path, annotations, groups=("Tumor", "Stroma")):
    """annotations: list of (coords, group)."""
    out = ['<?xml version="1.0"?>', "<ASAP_Annotations>", "<Annotations>"]
    for k, (coords, group) in enumerate(annotations):
        out.append(f'<Annotation Name="Annotation {k}" Type="Polygon" PartOfGroup="{group}" Color="#F4FA58">')
        out.append("<Coordinates>")
        out += [f'<Coordinate Order="{i}" X="{x}" Y="{y}" />' for i, (x, y) in enumerate(coords)]
        out.append("</Coordinates></Annotation>")
    out.append("</Annotations><AnnotationGroups>")
    out += [f'<Group Name="{g}" PartOfGroup="None" Color="#64FE2E"><Attributes /></Group>' for g in groups]
    out.append("</AnnotationGroups></ASAP_Annotations>")
    Path(path).write_text("\n".join(out))
    return str(path)


def write_imagescope(path, layers):
    """layers: list of (name, [(coords, negative), ...])."""
    out = ['<?xml version="1.0" encoding="UTF-8"?>', '<Annotations MicronsPerPixel="0.252100">']
    rid = 0
    for a, (name, regions) in enumerate(layers, start=1):
        out.append(f'<Annotation Id="{a}" Name="{name}" ReadOnly="0" Type="4" LineColor="65280" Visible="1">')
        out.append('<Attributes><Attribute Name="Description" Id="0" Value=""/></Attributes><Regions>')
        out.append('<RegionAttributeHeaders><AttributeHeader Id="9999" Name="Region" ColumnWidth="-1"/>'
                   '</RegionAttributeHeaders>')
        for coords, negative in regions:
            rid += 1
            out.append(f'<Region Id="{rid}" Type="0" Zoom="0.5" Selected="0" ImageLocation="" Text="" '
                       f'NegativeROA="{int(negative)}" InputRegionId="0" Analyze="1" DisplayId="{rid}">')
            out.append("<Attributes/><Vertices>")
            out += [f'<Vertex X="{x}" Y="{y}" Z="0"/>' for x, y in coords]
            out.append("</Vertices></Region>")
        out.append("</Regions><Plots/></Annotation>")
    out.append("</Annotations>")
    Path(path).write_text("\n".join(out))
    return str(path)


def write_mask_png(path, geom, d, size0=(3200, 4000), value=255):
    """A mask image at downsample d: pixel (r, c) is set when its centre is inside geom."""
    shape = (math.ceil(size0[0] / d), math.ceil(size0[1] / d))
    m = centres_inside(geom, shape, d)
    cv2.imwrite(str(path), (m * value).astype(np.uint8))
    return str(path)


@pytest.fixture
def lesion_files(tmp_path):
    qp = write_geojson(tmp_path / "l.geojson", [
        feature([ring(SHELL), ring(HOLE)], "Tumor"),
        feature([[ring(ISLAND)], [ring(SECOND)]], "tumor", gtype="MultiPolygon"),
        feature([ring(STROMA)], "Stroma"),
        feature([ring(STROMA)], "Tumor", object_type="detection"),      # detections are not ground truth
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]},
         "properties": {"objectType": "annotation", "classification": {"name": "Tumor"}}},
    ])
    # ASAP has no holes: the hole is an exclusion group; the island inside it is its own annotation
    asap = write_asap(tmp_path / "l.xml", [(SHELL, "Tumor"), (HOLE, "Exclusion"), (ISLAND, "Tumor"),
                                           (SECOND, "Tumor"), (STROMA, "Stroma")],
                      groups=("Tumor", "Exclusion", "Stroma"))
    scope = write_imagescope(tmp_path / "scope.xml", [
        ("Tumor", [(SHELL, False), (HOLE, True), (SECOND, False)]),
        ("Tumor", [(ISLAND, False)]),          # an island in a hole lives in its own layer
        ("Stroma", [(STROMA, False)]),
    ])
    return {"geojson": qp, "asap": asap, "imagescope": scope}


def test_grid_rasteriser_matches_point_in_polygon():
    g = lesion()
    r = rasterise_geometry(g, GRID, CELL0)
    assert (r == centres_inside(g, GRID, CELL0)).all()
    assert r.sum() > 1000 and not r[60:100, 100:130].all()  # the hole is empty somewhere


def test_grid_rasteriser_matches_point_in_polygon_on_random_shapes():
    """Polygons that cross the grid's edges, vertices on cell centres and edges (the rounding cases of a
    pixel filler), holes: every cell as shapely's point-in-polygon at its centre says."""
    rng = np.random.default_rng(7)
    for k in range(300):
        h, w = (int(v) for v in rng.integers(5, 60, 2))
        cell0 = float(rng.choice([0.5, 1.0, 3.7, 112.0]))
        n = int(rng.integers(3, 12))
        pts = (rng.integers(-4, 2 * max(h, w) + 4, (n, 2)) / 2.0 if k % 2
               else rng.uniform(-5, max(h, w) + 5, (n, 2))) * cell0
        g = shapely.make_valid(Polygon(pts))
        g = shapely.union_all([p for p in shapely.get_parts(g) if p.geom_type.endswith("Polygon")])
        if k % 3 == 0:
            g = g.difference(shapely.Point(*pts.mean(0)).buffer(cell0 * rng.uniform(1, 6)))
        assert (rasterise_geometry(g, (h, w), cell0) == centres_inside(g, (h, w), cell0)).all(), k


def test_four_formats_give_identical_rasters(lesion_files, tmp_path):
    want = centres_inside(lesion(), GRID, CELL0)
    qp = read_annotation(lesion_files["geojson"], tumour_classes=["TUMOR"])
    scope = read_annotation(lesion_files["imagescope"], tumour_classes=["tumor"])
    asap = read_annotation(lesion_files["asap"], tumour_classes=["Tumor"], exclude_classes=["Exclusion"])
    assert qp.kind == "polygons" and set(qp.classes) == {"Tumor", "tumor", "Stroma"}
    assert (rasterise_annotation(qp, GRID, CELL0) == want).all()
    assert (rasterise_annotation(scope, GRID, CELL0) == want).all()
    assert (rasterise_annotation(asap, GRID, CELL0) == want).all()   # the island inside the exclusion stays
    assert abs(qp.geometry.area - lesion().area) < 1e-6

    # Mask image at downsample d: a cell can differ only where the boundary passes between its centre
    # and the centre of the mask pixel holding it (<= d/sqrt(2) apart), i.e. near the boundary.
    d = 16.0
    png = write_mask_png(tmp_path / "m.png", lesion(), d)
    mask = read_annotation(png, mask_downsample=d)
    got = rasterise_annotation(mask, GRID, CELL0)
    diff = np.argwhere(got != want)
    boundary = lesion().boundary
    dist = shapely.distance(boundary, shapely.points((diff[:, 1] + 0.5) * CELL0, (diff[:, 0] + 0.5) * CELL0))
    assert (dist <= d / math.sqrt(2) + 1e-9).all()
    assert 0 < len(diff) < 0.05 * want.sum()
    # the same mask given in µm/px with the slide's mpp0
    via_mpp = read_annotation(png, mask_mpp=8.0, mpp0=0.5)
    assert via_mpp.downsample == d and (rasterise_annotation(via_mpp, GRID, CELL0) == got).all()


def test_mask_on_the_grid_is_exact_and_labels_select(tmp_path):
    want = centres_inside(lesion(), GRID, CELL0)
    labels = want.astype(np.uint8) * 2 + centres_inside(Polygon(STROMA), GRID, CELL0).astype(np.uint8)
    path = tmp_path / "labels.tif"
    import tifffile
    tifffile.imwrite(path, labels)
    tum = read_annotation(path, mask_downsample=CELL0, tumour_classes=["2"])
    assert (rasterise_annotation(tum, GRID, CELL0) == want).all() and tum.left_out == ("1",)
    anything = read_annotation(path, mask_downsample=CELL0)   # nonzero
    assert (rasterise_annotation(anything, GRID, CELL0) == (labels > 0)).all()
    # a larger grid than the mask: cells past its edge are not tumour
    big = rasterise_annotation(tum, (GRID[0] + 5, GRID[1] + 7), CELL0)
    assert not big[GRID[0]:].any() and not big[:, GRID[1]:].any()


def test_pyramidal_tiff_mask_read_at_a_level_that_fits(tmp_path, monkeypatch):
    from zeus_ray.truth import annotations
    from zeus_ray.results.export import write_pyramidal_tiff
    want = centres_inside(lesion(), GRID, CELL0)
    fine = np.repeat(np.repeat(want, 2, axis=0), 2, axis=1)     # downsample CELL0 / 2
    path = tmp_path / "pyr.tif"
    assert write_pyramidal_tiff(fine, path, mpp=1.0, tile=256, nearest=True)[1] == GRID
    monkeypatch.setattr(annotations, "_MAX_MASK_PX", GRID[0] * GRID[1])   # level 0 "too big"
    a = read_annotation(path, mask_downsample=CELL0 / 2)
    assert a.mask.shape == GRID and a.downsample == CELL0
    assert (rasterise_annotation(a, GRID, CELL0) == want).all()


def test_class_filtering(lesion_files):
    path = lesion_files["geojson"]
    tumour = read_annotation(path, tumour_classes=["tumor"]).geometry
    stroma = read_annotation(path, tumour_classes=["STROMA"]).geometry
    default = read_annotation(path).geometry             # default: tumour terms, Stroma left out
    assert abs(stroma.area - Polygon(STROMA).area) < 1e-6
    assert default.equals(tumour) and abs(tumour.area - lesion().area) < 1e-6   # detection ignored
    assert read_annotation(lesion_files["imagescope"], tumour_classes=["Stroma"]).geometry.equals(Polygon(STROMA))
    asap_stroma = read_annotation(lesion_files["asap"], tumour_classes=["stroma"]).geometry
    assert asap_stroma.equals(Polygon(STROMA))


def test_no_matching_class_warns_and_is_empty(lesion_files, caplog):
    with caplog.at_level(logging.WARNING):
        a = read_annotation(lesion_files["geojson"], tumour_classes=["Necrosis"])
    assert a.geometry.is_empty and "no region has a tumour class" in caplog.text
    assert not rasterise_annotation(a, GRID, CELL0).any()


def test_older_qupath_forms(tmp_path):
    feats = [{"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring(SECOND)]},
              "properties": {"object_type": "annotation", "classification": "Tumor"}},
             {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [ring(STROMA)]},
              "properties": {"classification": {"names": ["Tumor", "Positive"], "color": [1, 2, 3]}}}]
    path = write_geojson(tmp_path / "old.json", feats, bare_list=True)
    assert read_annotation(path, tumour_classes=["tumor"]).geometry.equals(Polygon(SECOND))
    assert read_annotation(path, tumour_classes=["Tumor: Positive"]).geometry.equals(Polygon(STROMA))
    bare = tmp_path / "bare.geojson"
    bare.write_text(json.dumps({"type": "Polygon", "coordinates": [ring(SHELL), ring(HOLE)]}))
    assert read_annotation(bare).geometry.equals(Polygon(SHELL, [HOLE]))


def test_hole_handling_each_format(tmp_path):
    outer, hole = box(0, 0, 1000, 1000), box(300, 300, 700, 700)
    want = outer.difference(hole)
    qp = write_geojson(tmp_path / "h.geojson", [feature([ring(list(outer.exterior.coords)[:-1]),
                                                         ring(list(hole.exterior.coords)[:-1])], "Tumor")])
    asap = write_asap(tmp_path / "h.xml", [(list(outer.exterior.coords)[:-1], "_0"),
                                           (list(hole.exterior.coords)[:-1], "_2")], groups=("_0", "_2"))
    scope = write_imagescope(tmp_path / "hs.xml", [("", [(list(outer.exterior.coords)[:-1], False),
                                                         (list(hole.exterior.coords)[:-1], True)])])
    png = tmp_path / "h.png"
    m = np.zeros((100, 100), np.uint8)
    m[:, :] = 1
    m[30:70, 30:70] = 0
    cv2.imwrite(str(png), m)
    for a in (read_annotation(qp), read_annotation(asap), read_annotation(scope)):   # defaults: `_2` is a hole
        assert a.geometry.equals(want), a.source
        r = rasterise_annotation(a, (10, 10), 100.0)
        assert r.sum() == 84 and not r[3:7, 3:7].any()
    r = rasterise_annotation(read_annotation(png, mask_downsample=10.0), (10, 10), 100.0)
    assert r.sum() == 84 and not r[3:7, 3:7].any()


BOWTIE = [(0, 0), (100, 100), (100, 0), (0, 100)]


@pytest.mark.parametrize("fmt", ["geojson", "asap", "imagescope"])
def test_bowtie_repaired_with_warning(fmt, tmp_path, caplog):
    if fmt == "geojson":
        path = write_geojson(tmp_path / "b.geojson", [feature([ring(BOWTIE)], "Tumor")])
    elif fmt == "asap":
        path = write_asap(tmp_path / "b.xml", [(BOWTIE, "Tumor")])
    else:
        path = write_imagescope(tmp_path / "b.xml", [("Tumor", [(BOWTIE, False)])])
    with caplog.at_level(logging.WARNING):
        a = read_annotation(path)
    assert "invalid" in caplog.text and "make_valid" in caplog.text and str(path) in caplog.text
    assert a.geometry.is_valid and abs(a.geometry.area - 5000.0) < 1e-9  # two triangles
    assert isinstance(a.geometry, MultiPolygon) and len(a.geometry.geoms) == 2


MALFORMED = {
    "trunc.geojson": ('{"type": "FeatureCollection", "features": [{"type": "Feat', "not valid JSON"),
    "badgeom.geojson": (json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 1]]]},
         "properties": {}}]}), "feature 0: bad Polygon geometry"),
    "nofeatures.geojson": ('{"type": "FeatureCollection"}', "without a 'features' list"),
    "weird.json": ('{"hello": 1}', "top level is not a GeoJSON"),
    "asap_bad.xml": ('<ASAP_Annotations><Annotations><Annotation PartOfGroup="T"><Coordinates>'
                     '<Coordinate Order="0" X="abc" Y="1"/></Coordinates></Annotation></Annotations>'
                     '</ASAP_Annotations>', "coordinate 'abc' is not a number"),
    "asap_trunc.xml": ('<ASAP_Annotations><Annotations><Annotation', "not valid XML"),
    "scope_bad.xml": ('<Annotations><Annotation Name="T"><Regions><Region Id="1"><Vertices>'
                      '<Vertex X="1"/></Vertices></Region></Regions></Annotation></Annotations>',
                      "coordinate None is not a number"),
    "other.xml": ("<svg></svg>", "neither ASAP"),
    "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "cannot be decoded"),
    "notes.txt": ("hello", "not a recognised annotation format"),
}


@pytest.mark.parametrize("name", sorted(MALFORMED))
def test_malformed_file_names_file_and_problem(name, tmp_path):
    content, expected = MALFORMED[name]
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(AnnotationError) as e:
        read_annotation(path, mask_downsample=4.0)
    msg = str(e.value)
    assert str(path) in msg and expected in msg and "\n" not in msg


def test_missing_file_and_mask_without_scale(tmp_path):
    with pytest.raises(AnnotationError, match="not found"):
        read_annotation(tmp_path / "nope.geojson")
    png = tmp_path / "m.png"
    cv2.imwrite(str(png), np.ones((4, 4), np.uint8))
    with pytest.raises(AnnotationError, match="needs its scale"):
        read_annotation(png, mask_mpp=2.0)   # no mpp0


def test_read_from_bucket(s3_bucket, lesion_files):
    import s3fs
    fs = s3fs.S3FileSystem()
    fs.put(lesion_files["geojson"], f"{s3_bucket}/gt/slide1.geojson")
    a = read_annotation(f"s3://{s3_bucket}/gt/slide1.geojson", tumour_classes=["Tumor"])
    assert a.source.startswith("s3://") and a.geometry.equals(read_annotation(lesion_files["geojson"],
                                                                              tumour_classes=["Tumor"]).geometry)
    with pytest.raises(AnnotationError, match=f"s3://{s3_bucket}/gt/missing.xml.*not found"):
        read_annotation(f"s3://{s3_bucket}/gt/missing.xml")


# --- defaults a pathologist expects: tumour vocabulary, exclusions, left-out classes -----------------

from zeus_ray.truth.classes import DEFAULT_EXCLUDE_TERMS, DEFAULT_TUMOUR_TERMS  # noqa: E402
from zeus_ray.config import EvaluationConfig  # noqa: E402

NECROSIS = [(2500, 300), (3500, 300), (3500, 1200), (2500, 1200)]
LESION = MultiPolygon([Polygon(SHELL, [HOLE]), Polygon(ISLAND)])


@pytest.fixture
def same_lesion(tmp_path):
    """One lesion (a shell with a hole, an island in the hole) beside Stroma and Necrosis regions, drawn
    the way each tool draws it; no class settings are given when these are read."""
    qp = write_geojson(tmp_path / "qp.geojson", [
        feature([ring(SHELL), ring(HOLE)], "Tumor"),          # a real hole
        feature([ring(ISLAND)], None),                          # unclassified: drawn as tumour
        feature([ring(STROMA)], "Stroma"),
        feature([ring(NECROSIS)], "Necrosis"),
    ])
    asap = write_asap(tmp_path / "camelyon.xml",                # CAMELYON16 groups: _0/_1 tumour, _2 exclusion
                      [(SHELL, "_0"), (HOLE, "_2"), (ISLAND, "_1"), (STROMA, "Stroma"), (NECROSIS, "Necrosis")],
                      groups=("_0", "_1", "_2", "Stroma", "Necrosis"))
    scope = write_imagescope(tmp_path / "scope.xml", [
        ("Tumour region", [(SHELL, False), (HOLE, True)]),    # NegativeROA hole
        ("", [(ISLAND, False)]),                                # the island in its own, unnamed layer
        ("Stroma", [(STROMA, False)]),
        ("Necrosis", [(NECROSIS, False)]),
    ])
    return {"geojson": qp, "asap": asap, "imagescope": scope}


def test_same_lesion_identical_truth_in_three_formats_with_defaults(same_lesion):
    rasters = {}
    for fmt, path in same_lesion.items():
        a = read_annotation(path)
        assert a.left_out == ("Necrosis", "Stroma"), fmt
        assert a.geometry.symmetric_difference(LESION).area < 1e-6, fmt
        rasters[fmt] = rasterise_annotation(a, GRID, CELL0)
    assert (rasters["geojson"] == rasters["asap"]).all() and (rasters["geojson"] == rasters["imagescope"]).all()
    assert (rasters["geojson"] == centres_inside(LESION, GRID, CELL0)).all()
    stroma = centres_inside(Polygon(STROMA), GRID, CELL0)
    necrosis = centres_inside(Polygon(NECROSIS), GRID, CELL0)
    hole = centres_inside(Polygon(HOLE).difference(Polygon(ISLAND)), GRID, CELL0)
    island = centres_inside(Polygon(ISLAND), GRID, CELL0)
    assert min(stroma.sum(), necrosis.sum(), hole.sum(), island.sum()) > 100
    for fmt, r in rasters.items():
        assert not r[stroma].any() and not r[necrosis].any(), f"{fmt}: a non-tumour class counted"
        assert not r[hole].any(), f"{fmt}: the hole / exclusion counted as tumour"
        assert r[island].all(), f"{fmt}: the island in the hole lost"
    asap = read_annotation(same_lesion["asap"])
    assert asap.tumour == ("_0", "_1") and asap.excluded == ("_2",)
    assert read_annotation(same_lesion["geojson"]).tumour == ("(unclassified)", "Tumor")


TUMOUR_NAMES = ["Tumor", "tumour", "Tumour region", "Tumor: Positive", "Invasive carcinoma", "Carcinoma in-situ",
                "In-situ tumor", "Metastases", "metastasis", "DCIS", "Leiomyoma", "Melanoma", "Tumor no. 2",
                "Non-invasive carcinoma", "Neoplastic cells", "Malignant", "_0", "_1"]
LEFT_OUT_NAMES = ["Non-tumour", "non tumor", "No tumour", "Tumour-free margin", "Peritumoral stroma",
                  "peri-tumoural region", "Tumor-associated stroma", "Tumour necrosis", "Stroma", "Necrosis",
                  "Other", "Immune cells", "Region*", "Ignore*", "Haematoma", "Healthy glands", "Lymph node",
                  "Tumor infiltrating lymphocytes", "_3"]
EXCLUDED_NAMES = ["_2", "Exclusion", "exclude", "Excluded area", "Normal"]


def test_vocabulary_matching(tmp_path):
    names = TUMOUR_NAMES + LEFT_OUT_NAMES + EXCLUDED_NAMES
    squares = [box(2000 * k, 0, 2000 * k + 1000, 1000) for k in range(len(names))]
    path = write_geojson(tmp_path / "v.geojson", [feature([ring(list(sq.exterior.coords)[:-1])], n)
                                                  for sq, n in zip(squares, names)])
    a = read_annotation(path)
    assert set(a.tumour) == set(TUMOUR_NAMES)
    assert set(a.left_out) == set(LEFT_OUT_NAMES)
    assert set(a.excluded) == set(EXCLUDED_NAMES)
    assert a.geometry.equals(shapely.union_all(squares[:len(TUMOUR_NAMES)]))
    # the prompt set's tumour class joins the vocabulary
    dys = write_geojson(tmp_path / "d.geojson", [feature([ring(SECOND)], "High-grade dysplasia")])
    assert read_annotation(dys).geometry.is_empty
    assert read_annotation(dys, tumour_class_name="dysplasia").geometry.equals(Polygon(SECOND))


def test_placeholder_names_are_unclassified(tmp_path):
    scope = write_imagescope(tmp_path / "p.xml", [("Layer 1", [(SECOND, False)])])
    asap = write_asap(tmp_path / "p_asap.xml", [(SECOND, "None"), (STROMA, "Annotation Group 0")],
                      groups=("Annotation Group 0",))
    assert read_annotation(scope).geometry.equals(Polygon(SECOND))
    a = read_annotation(asap)
    assert a.geometry.equals(MultiPolygon([Polygon(SECOND), Polygon(STROMA)])) and a.tumour == ("(unclassified)",)


def test_explicit_classes_and_terms_override_the_vocabulary(same_lesion):
    qp, asap = same_lesion["geojson"], same_lesion["asap"]
    a = read_annotation(qp, tumour_classes=["STROMA"])            # exact names; unclassified no longer counts
    assert a.geometry.equals(Polygon(STROMA)) and a.left_out == ("(unclassified)", "Necrosis", "Tumor")
    b = read_annotation(asap, exclude_classes=[])                  # `_2` no longer cut out: left out
    assert b.geometry.equals(Polygon(SHELL)) and "_2" in b.left_out
    c = read_annotation(asap, tumour_classes=["_2"], exclude_classes=["necrosis"])
    assert c.geometry.equals(Polygon(HOLE)) and c.excluded == ("Necrosis",)
    d = read_annotation(qp, tumour_terms=["necrosis"])             # "Tumor" is no longer a tumour term
    assert d.geometry.equals(MultiPolygon([Polygon(ISLAND), Polygon(NECROSIS)]))
    assert read_annotation(asap, tumour_terms=[]).geometry.is_empty
    e = read_annotation(asap, exclude_terms=["stroma"])            # `_2` is no longer an exclusion
    assert e.excluded == ("Stroma",) and "_2" in e.left_out and e.geometry.equals(Polygon(SHELL))
    # the config's defaults are the reader's defaults
    ev = EvaluationConfig()
    assert ev.tumour_terms == list(DEFAULT_TUMOUR_TERMS) and ev.exclude_terms == list(DEFAULT_EXCLUDE_TERMS)
    with pytest.raises(ValueError, match="tumour_terms: '--' has no letter or digit"):
        EvaluationConfig(tumour_terms=["tumour", "--"])


def test_exclusion_cuts_what_it_overlaps_but_not_tumour_drawn_inside_it(tmp_path):
    big, partial = box(0, 0, 1000, 1000), box(800, 400, 1200, 600)
    area, inside = box(2000, 0, 3000, 1000), box(2200, 200, 2400, 400)
    path = write_geojson(tmp_path / "x.geojson", [
        feature([ring(list(g.exterior.coords)[:-1])], cls)
        for g, cls in [(big, "Tumor"), (partial, "Exclusion"), (area, "Exclusion"), (inside, "Tumor")]])
    assert read_annotation(path).geometry.equals(MultiPolygon([big.difference(partial), inside]))


def test_left_out_line_once_per_slide(same_lesion, caplog):
    with caplog.at_level(logging.INFO, logger="zeus_ray.truth.annotations"):
        read_annotation(same_lesion["asap"])
    lines = [r for r in caplog.records if "classes not counted as tumour" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == logging.INFO
    assert lines[0].getMessage() == (f"annotation file {same_lesion['asap']}: classes not counted as tumour: "
                                     "Necrosis, Stroma; tumour: _0, _1; cut out: _2")
