"""`zeus evaluate RESULTS_DIR [--prompt-key K] [--annotations MANIFEST_OR_DIR] [--set evaluation.k=v]`:
recompute metrics, tables and the report from stored results (no slide read, no model loaded).
Exit status 1 when any slide's annotation could not be used (its metrics are then missing)."""
from __future__ import annotations

from .options import add_set_option


def register(sub) -> None:
    p = sub.add_parser("evaluate", help="recompute metrics and tables for existing results (no slide read, no model)")
    p.add_argument("results", metavar="RESULTS_DIR", help="output.root of a `zeus run` (local path or bucket URI)")
    p.add_argument("--prompt-key", help="which run (cohort/<prompt_key>/); default: the only one, else the newest")
    p.add_argument("--annotations", metavar="MANIFEST_OR_DIR",
                   help="manifest (CSV/Parquet with slide_id, annotation_uri) or a folder of <slide_id>.geojson/"
                        ".xml/.png; default: the annotation_uri column of the run's manifest")
    p.add_argument("--no-report", action="store_true", help="do not rewrite report.html")
    add_set_option(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from ..results.evaluate import evaluate_results
    s = evaluate_results(args.results, args.prompt_key, args.annotations, args.overrides, report=not args.no_report)
    for sid, msg in s.errors_list:
        print(f"no metrics for {sid}: {msg}")
    for line in s.class_lines:
        print(line)
    print(s.line())
    print(s.table1_md.rstrip() if s.table1_md else "no slide has a Dice: no cohort tables")
    return 1 if s.errors else 0
