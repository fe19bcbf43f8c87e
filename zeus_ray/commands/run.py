"""`zeus run CONFIG [--set key=value ...] [--address ADDR]`: the cohort job."""
from __future__ import annotations

from .options import add_set_option
from ..config import load_config


def register(sub) -> None:
    p = sub.add_parser("run", help="segment a cohort (manifest or glob) on Ray")
    p.add_argument("config", nargs="?", help="job config YAML (defaults apply to missing keys)")
    p.add_argument("--address", help="existing Ray cluster (default: RAY_ADDRESS, else a local Ray)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_set_option(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    extra = {"ray": {"address": args.address}} if args.address else None
    cfg = load_config(args.config, args.overrides, extra)
    from ..engine.driver import run_cohort
    summary = run_cohort(cfg, progress=not args.no_progress)
    for row in summary.rows:
        if row["status"] == "failed":
            print(f"failed: {row['error']}")
    from ..results.class_decision import decision_lines   # from the result rows, not the workers' logs
    for line in decision_lines(summary.rows):
        print(line)
    print(summary.line(), flush=True)
    return 1 if summary.failed else 0
