"""The benchmark cohort shared by the overhead and side-by-side benchmarks (benchmarks/_overhead_cohort.py)
and the timing protocol every tool gets there (benchmarks/peers/_peer_common.py)."""
from __future__ import annotations

import csv
import sys
from pathlib import Path

import openslide
import pytest

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"
sys.path[:0] = [str(BENCH), str(BENCH / "peers")]

from _overhead_cohort import make_overhead_cohort  # noqa: E402
from _peer_common import read_manifest, time_slides  # noqa: E402


def test_cohort_slides_and_manifest(tmp_path):
    paths = make_overhead_cohort(n=2, width=1024, height=768, folder=tmp_path)
    assert [p.name for p in paths] == ["bench-0.svs", "bench-1.svs"]
    for p in paths:
        with openslide.OpenSlide(str(p)) as s:
            assert s.dimensions == (1024, 768)
            assert [round(d) for d in s.level_downsamples] == [1, 4, 16]
            assert float(s.properties[openslide.PROPERTY_NAME_MPP_X]) == pytest.approx(0.5)
    with (tmp_path / "manifest.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert rows == [{"slide_id": "bench-0", "uri": str(paths[0])}, {"slide_id": "bench-1", "uri": str(paths[1])}]
    assert read_manifest(tmp_path / "manifest.csv", 1) == [("bench-0", str(paths[0]))]
    assert not list(tmp_path.glob(".*tmp*"))

    # A slide already there is kept; one of another size is written again.
    mtime = paths[0].stat().st_mtime_ns
    make_overhead_cohort(n=2, width=1024, height=768, folder=tmp_path)
    assert paths[0].stat().st_mtime_ns == mtime
    make_overhead_cohort(n=1, width=960, height=768, folder=tmp_path)
    with openslide.OpenSlide(str(paths[0])) as s:
        assert s.dimensions == (960, 768)
    with (tmp_path / "manifest.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 1


def test_time_slides_protocol():
    """One untimed warm-up call on the first slide, then every slide once, in order."""
    calls = []

    def plan_one(sid, uri):
        calls.append(sid)
        return len(calls) * 10, 1.5, 2

    res = time_slides([("a", "a.svs"), ("b", "b.svs"), ("c", "c.svs")], plan_one)
    assert calls == ["a", "a", "b", "c"]
    assert res["slides"] == 3 and res["slide_ids"] == ["a", "b", "c"]
    assert res["tiles_per_slide"] == [20, 30, 40]
    assert len(res["seconds_per_slide"]) == 3 and res["median_s"] >= 0
    assert res["tissue_mm2_per_slide"] == [1.5, 1.5, 1.5] and res["tissue_pieces_per_slide"] == [2, 2, 2]
