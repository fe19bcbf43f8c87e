"""Cohort outputs of a run: the slide results table, the errors table, the paper's tables."""
from __future__ import annotations

import logging
import time

import pandas as pd
import pyarrow as pa

from ..storage.keys import ERROR_STATUSES
from ..maps.postprocess import postprocess_label
from ..storage.store import OutputStore

log = logging.getLogger(__name__)


def write_cohort_outputs(store: OutputStore, summary, cfg, prompt_set) -> str:
    """slides/errors tables, Table 1/2, run.json and the report; run.json records how long the
    tables and the report took."""
    out = store.cohort_dir(summary.prompt_key)
    t0 = time.perf_counter()
    write_slide_tables(store, out, pd.DataFrame(summary.rows), cfg.model.id)
    run = {"config": cfg.model_dump(), "prompt_key": summary.prompt_key, "prompt_file": cfg.prompts.file,
           "classes": prompt_set.class_names, "tumour_class": prompt_set.class_names[prompt_set.tumour_index],
           "summary": summary.line(), "pool": summary.pool, **postprocess_label(cfg),
           "stage_seconds": {k: [round(v[0], 3), round(v[1], 3)] for k, v in summary.timing.items()},
           "driver_seconds": summary.phases,
           "cohort_seconds": {"tables": round(time.perf_counter() - t0, 3)}}
    store.write_json(f"{out}/run.json", run)
    t0 = time.perf_counter()
    try:
        from .report import write_report
        write_report(store, summary.prompt_key)
        run["cohort_seconds"]["report"] = round(time.perf_counter() - t0, 3)
        store.write_json(f"{out}/run.json", run)
    except Exception as e:  # noqa: BLE001 - the report is a view; the committed results stand without it
        log.warning("cohort report not written: %s: %s", type(e).__name__, e)
    return out


# The slides table's leading columns, in this order whatever order the rows' keys came in (a resumed
# run's rows are stored markers, whose keys are sorted); any other column follows in its own order.
LEADING_COLUMNS = ("slide_id", "status", "error", "reason", "dataset", "center", "n_tiles", "n_tiles_full",
                   "tissue_area_mm2", "tumour_area_mm2", "mask_mpp", "results_uri", "model_key", "prompt_key",
                   "tiling_key", "source")


def write_slide_tables(store: OutputStore, out: str, df: pd.DataFrame, model_id: str) -> pd.DataFrame:
    """slides.csv/.parquet, errors.csv/.parquet and Table 1/2 under `out` (also used by zeus evaluate)."""
    lead = [c for c in LEADING_COLUMNS if c in df]
    df = df[lead + [c for c in df.columns if c not in lead]]
    df = df.sort_values("slide_id").reset_index(drop=True)
    for col in ("dataset", "center", "error", "reason"):
        if col in df:
            df[col] = df[col].astype("string")
    store.write_parquet(f"{out}/slides.parquet", pa.Table.from_pandas(df, preserve_index=False))
    store.write_bytes(f"{out}/slides.csv", df.to_csv(index=False).encode())
    errors = df[df["status"].isin(ERROR_STATUSES)][[c for c in ("slide_id", "status", "reason", "error") if c in df]]
    store.write_bytes(f"{out}/errors.csv", errors.to_csv(index=False).encode())
    store.write_parquet(f"{out}/errors.parquet", pa.Table.from_pandas(errors.reset_index(drop=True), preserve_index=False))
    _write_tables(store, out, df, model_id)
    return df


def _write_tables(store: OutputStore, out: str, df: pd.DataFrame, model_id: str) -> None:
    """Table 1 / Table 2 layouts from per-slide metrics, when any slide has ground truth."""
    if "dice" not in df or df["dice"].notna().sum() == 0:
        for stale in (f"{out}/{t}.{ext}" for t in ("table1", "table2") for ext in ("csv", "parquet", "md")):
            if store.exists(stale):   # an earlier evaluation's tables no longer hold
                store.rm(stale)
        return
    from ..truth.metrics import cohort_tables, write_tables
    ok = df[df["status"] == "ok"].copy()
    ok["model"] = model_id
    write_tables(cohort_tables(ok), out, store=store)
