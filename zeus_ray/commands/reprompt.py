"""`zeus reprompt --results ROOT --prompts FILE [--model ID]`: new prompts on stored embeddings.

Encodes only the new prompts, recomputes similarities, maps, masks, metrics and the report under
the new prompt key; earlier results stay. Reads no slide and encodes no image."""
from __future__ import annotations

from .options import add_set_option
from ..config import load_config
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


def stored_run_config(root: str, model_id: str | None = None) -> dict:
    """The config of the newest run under `root` (for `model_id` when given)."""
    from ..results.evaluate import cohort_runs   # the one lookup of stored runs (newest first)
    store = OutputStore(root)
    for pk, _ in cohort_runs(store):
        info = store.read_json(store.path("cohort", pk, "run.json"))
        if model_id is None or info["config"]["model"]["id"] == model_id:
            return info["config"]
    which = f" with model {model_id!r}" if model_id else ""
    raise ConfigError(f"--results {root}: no earlier run{which} found (no cohort/*/run.json); run `zeus run` first")


def reprompt_config(root: str, prompts: str, model_id: str | None, overrides: list[str], address: str | None):
    base = stored_run_config(root, model_id)
    extra = {"prompts": {"file": prompts}, "output": {"root": root}}
    if address:
        extra["ray"] = {"address": address}
    return load_config(None, overrides, extra, base=base)


def _run(args) -> int:
    cfg = reprompt_config(args.results, args.prompts, args.model, args.overrides, args.address)
    from ..engine.driver import run_cohort
    summary = run_cohort(cfg, progress=not args.no_progress, reprompt=True)
    for row in summary.rows:
        if row["status"] == "failed":
            print(f"failed: {row['error']}")
    print(summary.line().replace("zeus run:", "zeus reprompt:"), flush=True)
    return 1 if summary.failed else 0
