"""`zeus report RESULTS_DIR [--prompt-key K] [--out FILE]`: the cohort's self-contained HTML report."""
from __future__ import annotations


def register(sub) -> None:
    p = sub.add_parser("report", help="write the cohort's self-contained HTML report")
    p.add_argument("results", metavar="RESULTS_DIR", help="output.root of a `zeus run` (local path or bucket URI)")
    p.add_argument("--prompt-key", help="which run (cohort/<prompt_key>/); default: the only one, else the newest")
    p.add_argument("--out", metavar="FILE", help="where to write it (default: <root>/cohort/<prompt_key>/report.html)")
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from ..results.evaluate import resolve_prompt_key
    from ..results.report import write_report
    from ..storage.store import OutputStore
    store = OutputStore(args.results)
    print(write_report(store, resolve_prompt_key(store, args.prompt_key), args.out))
    return 0
