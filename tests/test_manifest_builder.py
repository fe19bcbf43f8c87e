"""`zeus manifest`: a manifest from a real folder tree (synthetic OpenSlide slides, a DICOM-series
folder, MRXS with its data folder, GeoJSON/XML/PNG/TIFF annotations), locally and on the moto S3
server; the pairing, id and dataset/center rules; the CLI."""
from __future__ import annotations

import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from zeus_ray.config import CacheConfig, InputConfig
from zeus_ray.errors import ZeusError
from zeus_ray.cohort_input.manifest import load_cohort, read_manifest
from zeus_ray.cohort_input.builder import build_manifest, check_output, write_manifest
from zeus_ray.cohort_input.rules import field_rules, parse_rule, parse_storage_options, safe_slide_id
from zeus_ray.slides.access import localise, open_slide
from zeus_ray.demo.synthetic import write_synthetic_slide

ROOT = Path(__file__).resolve().parents[1]
HEADER = "slide_id,uri,annotation_uri,dataset,center,mpp"
GEOJSON = '{"type": "FeatureCollection", "features": []}'
XML = '<?xml version="1.0"?><ASAP_Annotations><Annotations/></ASAP_Annotations>'


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory):
    """One small SVS and one tiled TIFF, copied wherever the tree needs a slide."""
    d = tmp_path_factory.mktemp("synthetic")
    return (write_synthetic_slide(d / "s.svs", 512, 512, 0.5, downsamples=(1, 4)).path,
            write_synthetic_slide(d / "s.tif", 512, 512, 0.5, downsamples=(1, 4), fmt="tiff").path)


def make_tree(root: Path, synthetic) -> Path:
    svs, tif = synthetic

    def put(rel, src=None, text=None, data=None):
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if src:
            shutil.copyfile(src, p)
        else:
            p.write_bytes(data if data is not None else (text or "").encode())

    put("AI4SKIN/HCUV/s1.svs", svs)
    put("AI4SKIN/HCUV/s2.tif", tif)              # a generic tiled TIFF slide: a slide here
    put("AI4SKIN/HUSC/s3.svs", svs)
    put("AI4SKIN/HUSC/s4.svs", svs)
    put("AI4SKIN/HUSC/dup.svs", svs)
    put("ASSIST/HCUV/dup.svs", svs)              # same stem, other folder
    put("ASSIST/HCUV/series1/0001.dcm", data=b"DICM-1")   # one DICOM WSI series = one slide
    put("ASSIST/HCUV/series1/0002.dcm", data=b"DICM-2")
    put("ASSIST/HUSC/m1.mrxs", text="[GENERAL]")
    for name in ("Slidedat.ini", "Index.dat", "Data0000.dat"):
        put(f"ASSIST/HUSC/m1/{name}", text=name)
    put("ASSIST/HUSC/m2.mrxs", text="[GENERAL]")  # its data folder is missing: warned
    put("ASSIST/HUSC/notes.txt", text="not a slide")
    put("ASSIST/HUSC/._s1.svs", data=b"\0")        # macOS fork: hidden, skipped
    # Annotations inside the cohort folder: their TIFF masks must not become slides.
    png = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(png, "PNG")
    put("annotations/s1.geojson", text=GEOJSON)                # exact
    put("annotations/s1_mask.png", data=png.getvalue())        # beaten by the exact one
    tifffile.imwrite(root / "annotations/s2_mask.tif", np.zeros((8, 8), np.uint8))   # convention; a mask
    put("annotations/s3_annotation.xml", text=XML)             # convention
    put("annotations/s4.geojson", text=GEOJSON)                # two exact files: ambiguous
    put("annotations/s4.xml", text=XML)
    # A TIFF mask named exactly like the DICOM folder: a mask, as it sits in the annotation source.
    tifffile.imwrite(root / "annotations/series1.tiff", np.zeros((8, 8), np.uint8))
    put("annotations/m1.png", data=png.getvalue())
    put("annotations/AI4SKIN/HUSC/dup.geojson", text=GEOJSON)  # mirrored folder picks the dup
    put("annotations/orphan.geojson", text=GEOJSON)            # no such slide
    return root


def expected_rows(base: str, ann: str, datasets: bool = True) -> list[list[str]]:
    """Rows in slide_id order; `base`/`ann` prefix the slide and annotation uris."""
    rows = [
        ["HCUV_dup", f"{base}/ASSIST/HCUV/dup.svs", "", "ASSIST", "HCUV"],
        ["HUSC_dup", f"{base}/AI4SKIN/HUSC/dup.svs", f"{ann}/AI4SKIN/HUSC/dup.geojson", "AI4SKIN", "HUSC"],
        ["m1", f"{base}/ASSIST/HUSC/m1.mrxs", f"{ann}/m1.png", "ASSIST", "HUSC"],
        ["m2", f"{base}/ASSIST/HUSC/m2.mrxs", "", "ASSIST", "HUSC"],
        ["s1", f"{base}/AI4SKIN/HCUV/s1.svs", f"{ann}/s1.geojson", "AI4SKIN", "HCUV"],
        ["s2", f"{base}/AI4SKIN/HCUV/s2.tif", f"{ann}/s2_mask.tif", "AI4SKIN", "HCUV"],
        ["s3", f"{base}/AI4SKIN/HUSC/s3.svs", f"{ann}/s3_annotation.xml", "AI4SKIN", "HUSC"],
        ["s4", f"{base}/AI4SKIN/HUSC/s4.svs", "", "AI4SKIN", "HUSC"],
        ["series1", f"{base}/ASSIST/HCUV/series1", f"{ann}/series1.tiff", "ASSIST", "HCUV"],
    ]
    return [r if datasets else r[:3] + ["", ""] for r in rows]


def as_csv(rows) -> str:
    return "\n".join([HEADER] + [",".join(r + [""]) for r in rows]) + "\n"


@pytest.fixture
def tree(tmp_path, synthetic) -> Path:
    return make_tree(tmp_path / "cohort", synthetic)


def test_local_tree_gives_the_exact_manifest_and_summary(tree, tmp_path):
    out = tmp_path / "manifest.csv"
    build = build_manifest([str(tree)], [str(tree / "annotations")], "part:0", "part:1")
    written = write_manifest(build, str(out))
    assert written == str(out)
    assert out.read_text() == as_csv(expected_rows(str(tree), str(tree / "annotations")))

    assert (len(build.rows), build.paired) == (9, 6)
    assert build.unpaired == ["HCUV_dup", "m2"]
    assert build.orphans == [str(tree / "annotations/orphan.geojson")]
    assert build.ambiguous == [f"slide s4: 2 files: {tree}/annotations/s4.geojson, {tree}/annotations/s4.xml"]
    assert build.superseded == [f"{tree}/annotations/s1_mask.png (slide s1 uses {tree}/annotations/s1.geojson)"]
    assert build.duplicates == [("dup", [("HUSC_dup", f"{tree}/AI4SKIN/HUSC/dup.svs"),
                                         ("HCUV_dup", f"{tree}/ASSIST/HCUV/dup.svs")])]
    assert len(build.warnings) == 1 and "m2.mrxs" in build.warnings[0] and "data folder" in build.warnings[0]
    assert build.skipped == 1   # notes.txt; the hidden fork and the MRXS data files are not counted
    text = build.summary(written)
    for line in ("slides found: 9 (1 DICOM series, 2 MRXS)", "paired with an annotation: 6", "unpaired slides: 2",
                 "orphan annotations (no slide of that name): 1", "ambiguous pairings (left empty: rename or move "
                 "one file): 1", "duplicate slide names (ids disambiguated): 1", f"manifest: {out}"):
        assert line in text.splitlines(), (line, text)

    # `zeus run` reads it as is, and the uris open: slides through OpenSlide, DICOM as a folder.
    entries = load_cohort(InputConfig(manifest=str(out)))
    assert [e.slide_id for e in entries] == [r[0] for r in expected_rows("", "")]
    by_id = {e.slide_id: e for e in entries}
    assert by_id["s1"].dataset == "AI4SKIN" and by_id["s1"].center == "HCUV" and by_id["s1"].mpp is None
    for sid in ("s1", "s2", "HUSC_dup"):
        assert open_slide(by_id[sid].uri, sid).dimensions == (512, 512)
    assert os.path.isdir(by_id["series1"].uri)


def test_overwrite_needs_force_and_runs_are_deterministic(tree, tmp_path):
    out = tmp_path / "m.csv"
    args = ([str(tree)], [str(tree / "annotations")], "parent")
    write_manifest(build_manifest(*args), str(out))
    first = out.read_bytes()
    with pytest.raises(ZeusError, match="--force") as e:
        write_manifest(build_manifest(*args), str(out))
    assert "\n" not in str(e.value) and out.read_bytes() == first
    write_manifest(build_manifest(*args), str(out), force=True)
    assert out.read_bytes() == first
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".m.csv")] == []   # no temp file left


def test_without_annotations_tifs_are_slides_and_nothing_is_paired(tree, tmp_path):
    build = build_manifest([str(tree)])
    ids = [r["slide_id"] for r in build.rows]
    assert "s2_mask" in ids and "s2" in ids                   # no annotation source: a TIFF is a slide
    assert all(r["annotation_uri"] == "" for r in build.rows) and build.unpaired == []
    assert "paired with an annotation: 0 (no --annotations given)" in build.summary("x.csv")
    out = write_manifest(build, str(tmp_path / "m.parquet"))          # Parquet when asked
    assert [e.slide_id for e in read_manifest(out)] == sorted(ids) and read_manifest(out)[0].mpp is None


def test_mixed_folder_of_slides_and_annotations(tmp_path, synthetic):
    svs, tif = synthetic
    d = tmp_path / "mixed"
    d.mkdir()
    shutil.copyfile(svs, d / "a.svs")
    shutil.copyfile(tif, d / "b.tif")
    tifffile.imwrite(d / "b_mask.tif", np.zeros((8, 8), np.uint8))   # a mask named after slide b
    (d / "a.svs.geojson").write_text(GEOJSON)                       # QuPath-style name with extension
    build = build_manifest([str(d)], [str(d)])
    assert [(r["slide_id"], r["annotation_uri"]) for r in build.rows] == [
        ("a", str(d / "a.svs.geojson")), ("b", str(d / "b_mask.tif"))]


def test_s3_prefix_gives_s3_uris(tree, tmp_path, s3_server, s3_bucket):
    import boto3
    s3 = boto3.client("s3", endpoint_url=s3_server)
    for p in sorted(tree.rglob("*")):
        if p.is_file():
            s3.upload_file(str(p), s3_bucket, f"cohort/{p.relative_to(tree).as_posix()}")
    prefix = f"s3://{s3_bucket}/cohort"
    out = tmp_path / "s3.csv"
    build = build_manifest([prefix], [f"{prefix}/annotations"],
                           "regex:^(?P<dataset>[^/]+)/(?P<center>[^/]+)/")   # one regex fills both
    write_manifest(build, str(out))
    assert out.read_text() == as_csv(expected_rows(prefix, f"{prefix}/annotations"))
    assert build.unpaired == ["HCUV_dup", "m2"] and build.orphans == [f"{prefix}/annotations/orphan.geojson"]
    assert len(build.warnings) == 1 and "m2.mrxs" in build.warnings[0]

    entries = {e.slide_id: e for e in read_manifest(str(out))}
    cache = CacheConfig(dir=str(tmp_path / "cache"))
    assert open_slide(entries["s3"].uri, "s3", cache).dimensions == (512, 512)
    series = localise(entries["series1"].uri, cache, "series1")       # the folder uri fetches the series
    assert sorted(os.listdir(os.path.dirname(series) if os.path.isfile(series) else series)) == ["0001.dcm", "0002.dcm"]

    # The manifest can also go to the bucket (one put) and is read back from there.
    remote = f"{prefix}/manifest.csv"
    write_manifest(build, remote)
    assert [e.slide_id for e in read_manifest(remote)] == [r[0] for r in expected_rows("", "")]
    with pytest.raises(ZeusError, match="--force"):
        write_manifest(build, remote)


def test_unreachable_bucket_is_one_line_without_secrets(s3_server):
    options = parse_storage_options(["client_kwargs.endpoint_url=http://127.0.0.1:9", "secret=TOPSECRET-VALUE",
                                     "key=AKIDEXAMPLE"])
    with pytest.raises(ZeusError, match="cannot reach the endpoint") as e:
        build_manifest(["s3://some-bucket/slides"], storage_options=options)
    assert "TOPSECRET" not in str(e.value) and "\n" not in str(e.value) and "SOURCE s3://some-bucket/slides" in str(e.value)


@pytest.mark.parametrize("spec,rel,value", [
    ("parent", "D1/C1/a.svs", "C1"),
    ("part:0", "D1/C1/a.svs", "D1"),
    ("part:-1", "D1/C1/a.svs", "C1"),
    ("part:5", "D1/C1/a.svs", None),
    ("part:0", "a.svs", None),
    ("regex:^(?P<dataset>[^/]+)/", "D1/C1/a.svs", "D1"),
    (r"regex:_(?P<dataset>[A-Z]+)\d+\.svs$", "x/slide_ABC12.svs", "ABC"),
    ("regex:^(?P<dataset>nomatch)/", "D1/a.svs", None),
    ("value:AI4SKIN", "D1/a.svs", "AI4SKIN"),
])
def test_field_rules(tmp_path, spec, rel, value):
    p = tmp_path / "root" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(b"")
    build = build_manifest([str(tmp_path / "root")], dataset_from=spec)
    assert build.rows[0]["dataset"] == (value or "")
    assert any("left empty" in w for w in build.warnings) == (value is None)


@pytest.mark.parametrize("spec,match", [
    ("regex:(?P<center>[^/]+)/", r"needs a named group \(\?P<dataset>"),
    ("regex:([unclosed", "bad regular expression"),
    ("part:x", "N must be an integer"),
    ("folder", "use parent, part:N, regex:PATTERN or value:TEXT"),
])
def test_bad_rules_are_one_line_errors(spec, match):
    with pytest.raises(ZeusError, match=match) as e:
        parse_rule(spec, "dataset")
    assert "\n" not in str(e.value) and spec in str(e.value)


def test_regex_with_both_groups_fills_center_unless_given():
    rx = "regex:(?P<dataset>[^/]+)/(?P<center>[^/]+)/"
    assert set(field_rules(rx, None)) == {"dataset", "center"}
    assert field_rules(rx, "parent")["center"].kind == "parent"


def test_ids_are_made_safe_and_duplicates_reported(tmp_path):
    for rel in ("x/My slide#1.svs", "y/.hidden/z.svs", "a/b/s.svs", "a/c/s.svs", "a/b/s.ndpi"):
        p = tmp_path / "r" / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    build = build_manifest([str(tmp_path / "r")])
    ids = [r["slide_id"] for r in build.rows]
    assert ids[0] == "My slide_1" and len(ids) == 4                 # the hidden folder is skipped
    assert build.renamed == [("My slide#1", "My slide_1")]
    assert ids[1:] == ["b_s.ndpi", "b_s.svs", "c_s"]          # same folder: the extension tells them apart
    assert [i for i, _ in build.duplicates[0][1]] == ["b_s.ndpi", "b_s.svs", "c_s"]
    assert safe_slide_id("../..x") == "x" and safe_slide_id("a..b") == "a_b"
    assert safe_slide_id("###").startswith("slide-")


def test_bad_sources_and_options(tmp_path):
    with pytest.raises(ZeusError, match="no such folder"):
        build_manifest([str(tmp_path / "absent")])
    (tmp_path / "empty").mkdir()
    with pytest.raises(ZeusError, match="no slide found"):
        build_manifest([str(tmp_path / "empty")])
    assert parse_storage_options(["anon=true", "client_kwargs.region_name=eu"]) == {
        "anon": True, "client_kwargs": {"region_name": "eu"}}
    with pytest.raises(ZeusError, match="KEY=VALUE"):
        parse_storage_options(["anon"])
    with pytest.raises(ZeusError, match=r"\*\.csv"):
        check_output(str(tmp_path / "m.txt"), force=False)


def zeus(*args, cwd):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "zeus_ray", "manifest", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli(tree, tmp_path):
    args = [str(tree), "--annotations", str(tree / "annotations"), "--dataset-from", "part:0",
            "--center-from", "part:1", "--out", "m.csv"]
    r = zeus(*args, cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "m.csv").read_text() == as_csv(expected_rows(str(tree), str(tree / "annotations")))
    assert "slides found: 9 (1 DICOM series, 2 MRXS)" in r.stdout and f"manifest: {tmp_path / 'm.csv'}" in r.stdout
    assert "  HCUV_dup" in r.stdout and "  m2" in r.stdout

    again = zeus(*args, cwd=tmp_path)
    assert again.returncode == 2 and "--force" in again.stderr and len(again.stderr.strip().splitlines()) == 1
    assert zeus(*args, "--force", cwd=tmp_path).returncode == 0

    bad = zeus(str(tree), "--dataset-from", "regex:[^/]+/", "--out", "n.csv", cwd=tmp_path)
    assert bad.returncode == 2 and "(?P<dataset>" in bad.stderr and len(bad.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "n.csv").exists()
    helptext = zeus("--help", cwd=tmp_path).stdout
    assert all(k in helptext for k in ("part:N", "regex:PATTERN", ".mrxs", "DICOM", "--force", "mask(s)"))
