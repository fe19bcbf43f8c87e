"""Per-slide segmentation metrics and the paper's cohort tables (pure numpy / pandas).

Metrics are counted on the cell grid inside the tissue mask: prediction and ground truth outside
`valid` are ignored, so the true tumour area is the annotated tumour that lies on detected tissue.
"""
from __future__ import annotations

import io
import math
import os
from collections.abc import Mapping

import fsspec
import numpy as np
import pandas as pd

from ..errors import ZeusError

METRICS = ("dice", "precision", "recall")
_LABELS = {"dice": "DSC", "precision": "Precision", "recall": "Recall"}


def cell_area_mm2(cell0: float, mpp0: float) -> float:
    """Area of one grid cell of `cell0` level-0 px at `mpp0` µm/px, in mm²."""
    return (float(cell0) * float(mpp0) / 1000.0) ** 2


def _ratio(num: int, den: int) -> float:
    return num / den if den else math.nan


CONVENTIONS = ("zeus", "reference")
REFERENCE_SMOOTH = 1e-6   # the published evaluation's smoothing term (see segmentation_metrics)


def segmentation_metrics(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None, *,
                         cell_area_mm2: float | None = None, convention: str = "zeus") -> dict:
    """Dice, precision, recall and IoU of bool masks on the same grid, inside `valid` (tissue).

    Returns tp, fp, fn (cell counts), dice = 2tp/(2tp+fp+fn), precision = tp/(tp+fp),
    recall = tp/(tp+fn), iou = tp/(tp+fp+fn), and pred_area_mm2 / true_area_mm2 (NaN when
    cell_area_mm2 is not given).

    Empty cases (as MONAI's DiceMetric with ignore_empty=False, and Decathlon-style evaluation):
    - no true and no predicted tumour: dice = iou = precision = recall = 1.0 (perfect agreement);
    - no true tumour, some predicted: dice = iou = precision = 0.0, recall = NaN (0/0: there is no
      tumour to find);
    - no predicted tumour, some true: dice = iou = recall = 0.0, precision = NaN (0/0: nothing was
      predicted).
    NaNs are skipped (and counted) by `cohort_tables`.

    convention="reference" follows the published ZEUS evaluation instead (smoreno18/ZEUS
    evaluation/eval_segmentation.py at 4e3b85d, lines 11-79, read, not copied; `postprocess:
    reference`): every ratio gets a 1e-6 term on both sides, dice = (2tp + e)/(2tp + fp + fn + e),
    precision = (tp + e)/(tp + fp + e), recall = (tp + e)/(tp + fn + e) (iou likewise, ours). So
    nothing is NaN: no truth and no prediction gives 1, 1, 1; no truth gives recall 1 and dice =
    precision = e/(fp + e) (about 0); no prediction gives precision 1 and dice = recall ≈ 0. Our
    counts are cells of the metric grid, the reference's pixels: the e terms differ by the ratio
    of the areas, far below the printed digits. The result says which convention it used
    (`metric_convention`).
    """
    if convention not in CONVENTIONS:
        raise ValueError(f"metric convention {convention!r}: use one of {', '.join(CONVENTIONS)}")
    pred, truth = np.asarray(pred, dtype=bool), np.asarray(truth, dtype=bool)
    if pred.shape != truth.shape or (valid is not None and np.shape(valid) != pred.shape):
        raise ValueError(f"mask shapes differ: pred {pred.shape}, truth {truth.shape}, "
                         f"valid {None if valid is None else np.shape(valid)}")
    if valid is not None:
        valid = np.asarray(valid, dtype=bool)
        pred, truth = pred & valid, truth & valid
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    if convention == "reference":
        e = REFERENCE_SMOOTH
        dice, iou = (2 * tp + e) / (2 * tp + fp + fn + e), (tp + e) / (tp + fp + fn + e)
        precision, recall = (tp + e) / (tp + fp + e), (tp + e) / (tp + fn + e)
    elif tp + fp + fn == 0:
        dice = iou = precision = recall = 1.0
    else:
        dice, iou = 2 * tp / (2 * tp + fp + fn), tp / (tp + fp + fn)
        precision, recall = _ratio(tp, tp + fp), _ratio(tp, tp + fn)
    area = math.nan if cell_area_mm2 is None else float(cell_area_mm2)
    return {"tp": tp, "fp": fp, "fn": fn, "dice": dice, "precision": precision, "recall": recall,
            "iou": iou, "pred_area_mm2": (tp + fp) * area, "true_area_mm2": (tp + fn) * area,
            "metric_convention": convention}


def _summary(df: pd.DataFrame, keys: list[str], ddof: int) -> pd.DataFrame:
    rows = []
    for key, g in df.groupby(keys, sort=True, dropna=False):
        row = dict(zip(keys, key if isinstance(key, tuple) else (key,)))
        row["n_slides"] = len(g)
        for m in METRICS:
            v = pd.to_numeric(g[m], errors="coerce").to_numpy(dtype=float) if m in g else np.full(len(g), np.nan)
            v = v[~np.isnan(v)]
            row[f"{m}_mean"] = float(v.mean()) if len(v) else math.nan
            row[f"{m}_std"] = float(v.std(ddof=ddof)) if len(v) > ddof else math.nan
            row[f"{m}_n"] = len(v)
            row[f"{m}_nan"] = len(g) - len(v)
        rows.append(row)
    cols = keys + ["n_slides"] + [f"{m}_{s}" for m in METRICS for s in ("mean", "std", "n", "nan")]
    return pd.DataFrame(rows, columns=cols)


def cohort_tables(df: pd.DataFrame, *, ddof: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The paper's Table 1 (dataset × model) and Table 2 (dataset × model × center) from per-slide rows.

    df: one row per slide and model with columns dice, precision, recall and optionally dataset,
    model, center (missing columns or empty values become "all"). Per group: n_slides (rows) and,
    per metric, mean, std, n (values used) and nan (NaN values skipped: failed slides and the
    undefined empty cases). std is the population std (ddof=0, numpy's default and what a numpy
    evaluation script reports; the reference code's evaluation script is not published, so this is
    an assumption); pass ddof=1 for the sample std. A std from fewer than ddof+1 values is NaN.
    """
    if not any(m in df.columns for m in METRICS):
        raise ZeusError(f"metrics table has none of the columns {list(METRICS)} (columns: {list(df.columns)}); "
                        "run the evaluation first")
    df = df.copy()
    for k in ("dataset", "model", "center"):
        df[k] = df[k].fillna("all").astype(str) if k in df.columns else "all"
    return _summary(df, ["dataset", "model"], ddof), _summary(df, ["dataset", "model", "center"], ddof)


def format_mean_std(mean: float, std: float, digits: int = 3) -> str:
    """'0.845 ± 0.230'; 'n/a' when the mean is undefined, '0.845 ± n/a' for a single value with ddof=1."""
    if mean is None or math.isnan(mean):
        return "n/a"
    s = "n/a" if std is None or math.isnan(std) else f"{std:.{digits}f}"
    return f"{mean:.{digits}f} ± {s}"


def to_markdown(table: pd.DataFrame) -> str:
    """A Markdown table with one 'mean ± std' column per metric (NaN counts noted in the cell)."""
    keys = [k for k in ("dataset", "model", "center") if k in table.columns]
    head = [k.capitalize() for k in keys] + ["Slides"] + [_LABELS[m] for m in METRICS]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for _, r in table.iterrows():
        cells = [str(r[k]) for k in keys] + [str(int(r["n_slides"]))]
        for m in METRICS:
            cell = format_mean_std(r[f"{m}_mean"], r[f"{m}_std"])
            if r[f"{m}_nan"]:
                cell += f" ({int(r[f'{m}_nan'])} NaN skipped)"
            cells.append(cell)
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines) + "\n"


def write_tables(tables, out_dir: str, store=None) -> dict[str, list[str]]:
    """Write each table as <name>.csv, <name>.parquet and <name>.md under out_dir (path or URI;
    with `store`, an OutputStore, a path in it, written with its storage options).

    tables: the (table1, table2) tuple from cohort_tables, or a {name: DataFrame} mapping.
    Returns {name: [written paths]}.
    """
    if not isinstance(tables, Mapping):
        tables = dict(zip(("table1", "table2"), tables))
    out_dir = os.fspath(out_dir).rstrip("/")
    if store is None:
        fs, root = fsspec.core.url_to_fs(out_dir)
        fs.makedirs(root, exist_ok=True)
    written = {}
    for name, table in tables.items():
        paths = [f"{out_dir}/{name}.{ext}" for ext in ("csv", "parquet", "md")]
        parquet = io.BytesIO()
        table.to_parquet(parquet, index=False, engine="pyarrow")
        for path, data in zip(paths, (table.to_csv(index=False).encode(), parquet.getvalue(),
                                      to_markdown(table).encode("utf-8"))):
            if store is not None:   # the output root's storage options and whole-file writes
                store.write_bytes(path, data)
            else:
                with fsspec.open(path, "wb") as f:
                    f.write(data)
        written[name] = paths
    return written
