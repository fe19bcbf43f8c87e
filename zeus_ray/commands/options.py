"""Options shared by several subcommands."""
from __future__ import annotations

import argparse


def add_set_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set tiling.overlap=0.5 (repeatable)")
