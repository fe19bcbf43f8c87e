"""Per-slide metrics against hand-computed and independently computed values; cohort tables."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from zeus_ray.errors import ZeusError
from zeus_ray.truth.metrics import (cell_area_mm2, cohort_tables, format_mean_std, segmentation_metrics,
                              to_markdown, write_tables)


def square(shape, r0, r1, c0, c1):
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


def test_identical():
    t = square((10, 10), 2, 6, 2, 6)
    r = segmentation_metrics(t, t.copy(), cell_area_mm2=0.01)
    assert (r["tp"], r["fp"], r["fn"]) == (16, 0, 0)
    assert r["dice"] == r["precision"] == r["recall"] == r["iou"] == 1.0
    assert r["pred_area_mm2"] == pytest.approx(0.16) and r["true_area_mm2"] == pytest.approx(0.16)


def test_disjoint():
    r = segmentation_metrics(square((10, 10), 0, 2, 0, 2), square((10, 10), 5, 8, 5, 8))
    assert (r["tp"], r["fp"], r["fn"]) == (0, 4, 9)
    assert r["dice"] == r["precision"] == r["recall"] == r["iou"] == 0.0
    assert math.isnan(r["pred_area_mm2"])  # no cell area given


def test_nested_prediction_inside_truth():
    truth = square((10, 10), 2, 6, 2, 6)     # 16 cells
    pred = square((10, 10), 3, 5, 3, 5)      # 4 cells inside
    r = segmentation_metrics(pred, truth)
    assert (r["tp"], r["fp"], r["fn"]) == (4, 0, 12)
    assert r["dice"] == pytest.approx(8 / 20) and r["precision"] == 1.0
    assert r["recall"] == pytest.approx(0.25) and r["iou"] == pytest.approx(0.25)
    r = segmentation_metrics(truth, pred)    # truth inside prediction
    assert r["precision"] == pytest.approx(0.25) and r["recall"] == 1.0 and r["dice"] == pytest.approx(0.4)


def test_empty_cases():
    z, t = np.zeros((5, 5), bool), square((5, 5), 1, 3, 1, 3)
    both = segmentation_metrics(z, z)
    assert both["dice"] == both["precision"] == both["recall"] == both["iou"] == 1.0
    no_truth = segmentation_metrics(t, z)
    assert no_truth["dice"] == 0.0 and no_truth["iou"] == 0.0 and no_truth["precision"] == 0.0
    assert math.isnan(no_truth["recall"])
    no_pred = segmentation_metrics(z, t)
    assert no_pred["dice"] == 0.0 and no_pred["recall"] == 0.0 and math.isnan(no_pred["precision"])


def test_valid_mask_restricts_counting():
    pred, truth = square((6, 6), 0, 6, 0, 3), square((6, 6), 0, 6, 2, 6)
    valid = square((6, 6), 0, 3, 0, 6)
    r = segmentation_metrics(pred, truth, valid, cell_area_mm2=cell_area_mm2(112, 0.5))
    # rows 0-2 only: pred cols 0-2 (9 cells), truth cols 2-5 (12 cells), overlap col 2 (3 cells)
    assert (r["tp"], r["fp"], r["fn"]) == (3, 6, 9)
    assert r["dice"] == pytest.approx(6 / 21)
    assert cell_area_mm2(112, 0.5) == pytest.approx(0.056 ** 2)
    assert r["true_area_mm2"] == pytest.approx(12 * 0.056 ** 2)


def test_random_masks_match_set_arithmetic():
    rng = np.random.default_rng(3)
    for _ in range(20):
        shape = tuple(rng.integers(1, 40, 2))
        pred, truth, valid = (rng.random(shape) < p for p in rng.uniform(0.05, 0.95, 3))
        cells = lambda m: {tuple(ix) for ix in np.argwhere(m & valid)}  # noqa: E731
        p, t = cells(pred), cells(truth)
        r = segmentation_metrics(pred, truth, valid)
        assert (r["tp"], r["fp"], r["fn"]) == (len(p & t), len(p - t), len(t - p))
        if p or t:
            assert r["dice"] == pytest.approx(2 * len(p & t) / (len(p) + len(t)))
            assert r["iou"] == pytest.approx(len(p & t) / len(p | t))


def test_shape_mismatch():
    with pytest.raises(ValueError, match="shapes differ"):
        segmentation_metrics(np.zeros((3, 3), bool), np.zeros((3, 4), bool))


def slides():
    return pd.DataFrame({
        "slide_id": list("abcdefg"),
        "dataset": ["AI4SKIN"] * 5 + ["ASSIST"] * 2,
        "model": ["conch"] * 3 + ["keep"] * 2 + ["conch"] * 2,
        "center": ["HCUV", "HUSC", "HUSC", "HCUV", "HUSC", None, None],
        "dice": [0.5, 0.7, 0.9, 0.2, 0.4, 0.1, np.nan],
        "precision": [0.6, np.nan, 0.8, 1.0, 1.0, 0.3, np.nan],
        "recall": [1.0, 0.5, 0.0, 0.25, 0.75, 0.6, np.nan],
    })


def test_cohort_tables_hand_computed():
    t1, t2 = cohort_tables(slides())
    row = t1.set_index(["dataset", "model"]).loc[("AI4SKIN", "conch")]
    assert row["n_slides"] == 3
    assert row["dice_mean"] == pytest.approx(0.7)
    assert row["dice_std"] == pytest.approx(math.sqrt(0.08 / 3))       # population std (ddof=0)
    assert row["precision_mean"] == pytest.approx(0.7) and row["precision_std"] == pytest.approx(0.1)
    assert row["precision_n"] == 2 and row["precision_nan"] == 1
    assert row["recall_mean"] == pytest.approx(0.5)
    assist = t1.set_index(["dataset", "model"]).loc[("ASSIST", "conch")]
    assert assist["dice_n"] == 1 and assist["dice_nan"] == 1 and assist["dice_std"] == 0.0
    t2i = t2.set_index(["dataset", "model", "center"])
    assert t2i.loc[("AI4SKIN", "conch", "HUSC"), "dice_mean"] == pytest.approx(0.8)
    assert t2i.loc[("AI4SKIN", "conch", "HCUV"), "n_slides"] == 1
    assert t2i.loc[("ASSIST", "conch", "all"), "n_slides"] == 2   # missing centre → "all"
    s1, _ = cohort_tables(slides(), ddof=1)
    assert s1.set_index(["dataset", "model"]).loc[("AI4SKIN", "conch"), "dice_std"] == pytest.approx(0.2)
    assert math.isnan(s1.set_index(["dataset", "model"]).loc[("ASSIST", "conch"), "dice_std"])


def test_cohort_tables_without_grouping_columns_and_bad_input():
    t1, t2 = cohort_tables(pd.DataFrame({"dice": [0.2, 0.4]}))
    assert list(t1["dataset"]) == ["all"] and t1["dice_mean"][0] == pytest.approx(0.3) and len(t2) == 1
    with pytest.raises(ZeusError, match="none of the columns"):
        cohort_tables(pd.DataFrame({"slide_id": ["a"]}))


def test_markdown_and_format():
    assert format_mean_std(0.8451, 0.23) == "0.845 ± 0.230"
    assert format_mean_std(float("nan"), float("nan")) == "n/a"
    t1, _ = cohort_tables(slides())
    md = to_markdown(t1)
    assert md.splitlines()[0] == "| Dataset | Model | Slides | DSC | Precision | Recall |"
    assert "| AI4SKIN | conch | 3 | 0.700 ± 0.163 | 0.700 ± 0.100 (1 NaN skipped) | 0.500 ± 0.408 |" in md


def test_write_tables_local(tmp_path):
    t1, t2 = cohort_tables(slides())
    written = write_tables((t1, t2), tmp_path / "tables")
    assert set(written) == {"table1", "table2"}
    back = pq.read_table(tmp_path / "tables" / "table1.parquet").to_pandas()
    pd.testing.assert_frame_equal(back, t1)
    csv = pd.read_csv(tmp_path / "tables" / "table2.csv")
    assert len(csv) == len(t2) and list(csv.columns) == list(t2.columns)
    assert (tmp_path / "tables" / "table2.md").read_text(encoding="utf-8") == to_markdown(t2)


def test_write_tables_to_bucket(s3_bucket):
    import s3fs
    t1, _ = cohort_tables(slides())
    write_tables({"summary": t1}, f"s3://{s3_bucket}/run1/tables")
    fs = s3fs.S3FileSystem()
    assert sorted(p.rsplit("/", 1)[1] for p in fs.ls(f"{s3_bucket}/run1/tables")) == \
        ["summary.csv", "summary.md", "summary.parquet"]
    with fs.open(f"{s3_bucket}/run1/tables/summary.parquet", "rb") as f:
        pd.testing.assert_frame_equal(pd.read_parquet(f), t1)
