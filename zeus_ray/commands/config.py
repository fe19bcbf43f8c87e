"""`zeus config [FILE] [--set k=v]`: validate a config and print the resolved values, or list
every key with its default."""
from __future__ import annotations

import yaml

from .options import add_set_option
from ..config import config_reference, load_config


def register(sub) -> None:
    p = sub.add_parser("config", help="validate a job config (or list every key and its default)")
    p.add_argument("file", nargs="?", help="job config YAML; without it, list all keys")
    add_set_option(p)
    p.set_defaults(handler=_run)


def _run(args) -> int:
    if args.file is None and not args.overrides:
        print(config_reference())
        return 0
    cfg = load_config(args.file, args.overrides)
    print(yaml.safe_dump(cfg.model_dump(), sort_keys=False).rstrip())
    return 0
