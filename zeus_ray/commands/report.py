"""`zeus report RESULTS_DIR [--prompt-key K] [--out FILE]`: the cohort's self-contained HTML report."""
from __future__ import annotations

from .options import add_set_option


def register(sub) -> None:
    p = sub.add_parser("report", help="write the cohort's self-contained HTML report")
    p.add_argument("results", metavar="RESULTS_DIR", help="output.root of a `zeus run` (local path or bucket URI)")
    p.add_argument("--prompt-key", help="which run (cohort/<prompt_key>/); default: the only one, else the newest")
    p.add_argument("--out", metavar="FILE", help="where to write it (default: <root>/cohort/<prompt_key>/report.html)")
    add_set_option(p)   # only output.storage_options.<key>=value (a bucket root's endpoint, profile)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    from ..results.evaluate import resolve_prompt_key
    from ..results.report import write_report
    from ..config import output_storage_options
    from ..errors import ConfigError
    from ..storage.store import OutputStore
    other = [p for p in args.overrides if not p.strip().startswith("output.storage_options.")]
    if other:
        raise ConfigError(f"--set {other[0]!r}: zeus report takes only output.storage_options.<key>=value")
    store = OutputStore(args.results, output_storage_options(args.overrides))
    print(write_report(store, resolve_prompt_key(store, args.prompt_key), args.out))
    return 0
