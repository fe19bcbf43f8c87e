"""`zeus reprompt --results ROOT --prompts FILE [--model ID]`: new prompts on stored embeddings.

Encodes only the new prompts, recomputes similarities, maps, masks, metrics and the report under
the new prompt key; earlier results stay. Reads no slide and encodes no image."""
from __future__ import annotations

from ..config import load_config, output_storage_options
from .options import add_set_option
from ..errors import ConfigError
from ..storage.store import OutputStore


def register(sub) -> None:
    p = sub.add_parser("reprompt", help="apply a new prompt file to stored embeddings (no slide read)")
    p.add_argument("--results", required=True, help="output root of an earlier `zeus run`")
    p.add_argument("--prompts", required=True, help="prompt ensemble YAML")
    p.add_argument("--model", help="model id whose embeddings to use (default: the one of the latest run)")
    p.add_argument("--address", help="existing Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true")
    add_set_option(p)
    p.set_defaults(handler=_run)


def stored_run_config(root: str, model_id: str | None = None, storage_options: dict | None = None) -> dict:
    """The config of the newest run under `root` (for `model_id` when given)."""
    return _stored_run(root, model_id, storage_options)[0]


def recorded_rows(root: str, model_id: str | None = None, storage_options: dict | None = None) -> dict:
    """slide_id → the row (status, error, reason) the newest run recorded, from its slides table;
    empty when it has none."""
    store = OutputStore(root, storage_options)
    path = store.path("cohort", _stored_run(root, model_id, storage_options)[1], "slides.parquet")
    if not store.exists(path):
        return {}
    df = store.read_parquet(path, columns=None).to_pandas()
    return {r["slide_id"]: r for r in df.to_dict("records")}


def _stored_run(root: str, model_id: str | None, storage_options: dict | None) -> tuple[dict, str]:
    from ..results.evaluate import cohort_runs   # the one lookup of stored runs (newest first)
    store = OutputStore(root, storage_options)
    for pk, _ in cohort_runs(store):
        info = store.read_json(store.path("cohort", pk, "run.json"))
        if model_id is None or info["config"]["model"]["id"] == model_id:
            return info["config"], pk
    which = f" with model {model_id!r}" if model_id else ""
    raise ConfigError(f"--results {root}: no earlier run{which} found (no cohort/*/run.json); run `zeus run` first")


def reprompt_config(root: str, prompts: str, model_id: str | None, overrides: list[str], address: str | None):
    opts = output_storage_options(overrides)   # never stored with the run: given again here
    base = stored_run_config(root, model_id, opts)
    extra = {"prompts": {"file": prompts}, "output": {"root": root, "storage_options": opts}}
    if address:
        extra["ray"] = {"address": address}
    return load_config(None, overrides, extra, base=base)


def _run(args) -> int:
    cfg = reprompt_config(args.results, args.prompts, args.model, args.overrides, args.address)
    recorded = recorded_rows(args.results, args.model, cfg.output.storage_options)
    from ..engine.driver import run_cohort
    from ..results.class_decision import decision_lines
    summary = run_cohort(cfg, progress=not args.no_progress, reprompt=True, recorded=recorded)
    new = 0
    for row in summary.rows:
        was = recorded.get(row["slide_id"]) or {}
        if row["status"] == "ok":
            continue
        if row.get("recorded"):   # the run's own outcome, carried over: not re-prompted, not new
            what = "no tissue" if row["status"] == "no_tissue" else f"failed: {row['error']}"
            print(f"not re-prompted: slide {row['slide_id']!r} in the run: {what}")
        elif row["status"] == "failed":
            new += 1
            print(f"failed: {row['error']}" + (" (ok in the run)" if was.get("status") == "ok" else ""))
    for line in decision_lines(summary.rows):
        print(line)
    print(summary.line().replace("zeus run:", "zeus reprompt:"), flush=True)
    return 1 if new else 0
