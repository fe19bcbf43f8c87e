"""Small defects found on real inputs, one test each: the slides table's column order after a resumed
run, `zeus manifest` over a folder holding zeus outputs, an MRXS without its data folder, the
slide-id message, and `zeus doctor` on an annotation lying wholly outside its slide."""
from __future__ import annotations

import json
import shutil

import pandas as pd
import pytest
from _cohort import make_cohort

from zeus_ray.cohort_input.builder import build_manifest
from zeus_ray.errors import SlideError, ZeusError
from zeus_ray.slides.access import open_slide
from zeus_ray.storage.store import OutputStore, check_slide_id


def test_slides_table_keeps_its_column_order_when_rows_come_from_markers(tmp_path):
    """A resumed run's rows are the stored markers (JSON, keys sorted): slide_id stays first and the
    order is that of a fresh run."""
    from zeus_ray.results.cohort_tables import write_slide_tables
    fresh = {"slide_id": "b", "status": "ok", "error": None, "n_tiles": 3, "dataset": "d", "center": "c",
             "tissue_area_mm2": 1.0, "results_uri": "x", "tiling_key": "k", "tumour_area_mm2": 0.5}
    marker = dict(sorted((fresh | {"slide_id": "a"}).items()))      # as store.complete() returns it
    store = OutputStore(tmp_path)
    write_slide_tables(store, store.path("fresh"), pd.DataFrame([fresh]), "m")
    write_slide_tables(store, store.path("resumed"), pd.DataFrame([marker, fresh]), "m")
    header = (tmp_path / "fresh" / "slides.csv").read_text().splitlines()[0]
    assert header.startswith("slide_id,status,error")
    assert (tmp_path / "resumed" / "slides.csv").read_text().splitlines()[0] == header


def test_manifest_over_a_folder_with_zeus_outputs_lists_only_the_slides(tmp_path):
    make_cohort(tmp_path / "data", n=1)
    res = tmp_path / "data" / "zeus_output" / "slides" / "syn-0" / "results" / "k" / "p"
    res.mkdir(parents=True)
    shutil.copy(tmp_path / "data" / "syn-0.svs", res / "mask.tiff")       # viewer TIFFs are real TIFFs
    shutil.copy(tmp_path / "data" / "syn-0.svs", res / "prob_tumor.tiff")
    for name in ("similarities.parquet", "result.json", "_COMPLETE.json"):
        (res / name).write_bytes(b"{}")
    build = build_manifest([str(tmp_path / "data")])
    assert [r["slide_id"] for r in build.rows] == ["syn-0"], build.rows


def test_mrxs_without_its_data_folder_says_so(tmp_path):
    (tmp_path / "m.mrxs").write_text("[GENERAL]\n")
    with pytest.raises(SlideError, match=r"needs its data folder m/ .* missing") as e:
        open_slide(str(tmp_path / "m.mrxs"), "m")
    assert e.value.reason == "missing"
    (tmp_path / "m").mkdir()                     # with the folder, OpenSlide's own verdict stands
    with pytest.raises(SlideError) as e:
        open_slide(str(tmp_path / "m.mrxs"), "m")
    assert "data folder" not in str(e.value)


def test_slide_id_message_lists_the_space_it_accepts():
    assert check_slide_id("My slide 1") == "My slide 1"
    with pytest.raises(ZeusError, match="letters, digits, spaces and"):
        check_slide_id("a/b")


def test_doctor_fails_an_annotation_wholly_outside_its_slide(tmp_path):
    from zeus_ray.doctor.checks import run_doctor
    d = make_cohort(tmp_path / "c", n=1).parent             # 2400 × 1800 px
    far = {"type": "Polygon", "coordinates": [[[90000, 90000], [91000, 90000], [91000, 91000], [90000, 91000],
                                               [90000, 90000]]]}
    (tmp_path / "far.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": far, "properties": {"classification": {"name": "Tumor"}}}]}))
    (tmp_path / "m.csv").write_text(f"slide_id,uri,annotation_uri\nfar,{d / 'syn-0.svs'},{tmp_path / 'far.geojson'}\n"
                                    f"near,{d / 'syn-0.svs'},{d / 'syn-0.geojson'}\n")
    lines: list[str] = []
    run_doctor(None, [f"input.manifest={tmp_path / 'm.csv'}", "model.id=random:vit_tiny_patch16_224",
                      f"output.root={tmp_path / 'o'}"], None, 5, echo=lines.append)
    far_line = next(ln for ln in lines if "annotation of slide far" in ln)
    assert far_line.startswith("fail") and "wholly outside the slide" in far_line and "2400 × 1800" in far_line
    assert next(ln for ln in lines if "annotation of slide near" in ln).startswith("ok")
