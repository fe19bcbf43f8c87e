"""`zeus doctor CONFIG [--set k=v] [--address ADDR] [--sample N]`: preflight checks of a job
(config, cohort, slides, µm/px, annotations, weights, token, tokenizer, output root, devices, Ray
cluster, slide cache) in seconds, one `ok`/`warn`/`fail` line each; exit status 1 on any fail."""
from __future__ import annotations

import argparse

from .options import add_set_option


def _count(text: str) -> int:
    n = int(text)
    if n < 0:
        raise argparse.ArgumentTypeError("must be 0 or more")
    return n


def register(sub) -> None:
    p = sub.add_parser("doctor", help="preflight check of a job config: slides, µm/px, weights, token, output, devices")
    p.add_argument("config", metavar="CONFIG", help="job config YAML")
    p.add_argument("--address", help="Ray cluster to check (default: ray.address or RAY_ADDRESS; none: local Ray)")
    p.add_argument("--sample", type=_count, default=5, metavar="N",
                   help="slides to open and check for µm/px, spread over the manifest (default 5; 0: none)")
    add_set_option(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    import logging

    from ..doctor.checks import FAIL, run_doctor
    if not args.debug:   # the check lines say it all; readers' INFO notes would interleave
        logging.getLogger("zeus_ray").setLevel(logging.WARNING)
    counts = run_doctor(args.config, args.overrides, args.address, args.sample,
                        echo=lambda line: print(line, flush=True))
    return 1 if counts[FAIL] else 0
