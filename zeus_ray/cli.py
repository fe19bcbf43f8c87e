"""`zeus` command line. Each subcommand lives in `zeus_ray/commands/<name>.py` and exposes
`register(subparsers)`; handlers return an exit status. User errors (ZeusError) print one line
and exit 2; --debug shows the traceback."""
from __future__ import annotations

import argparse
import importlib
import logging
import sys

from .errors import ZeusError

# Subcommand modules, in the order `zeus --help` lists them. A module that is absent (a stage
# not built yet) is skipped, so the CLI works at every stage of the project.
COMMANDS = ["run", "manifest", "reprompt", "tiles", "models", "doctor", "prompts", "evaluate", "report", "studio", "config"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="zeus", description="Zero-shot WSI tumour segmentation on Ray")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        try:
            module = importlib.import_module(f"zeus_ray.commands.{name}")
        except ModuleNotFoundError as e:
            if e.name == f"zeus_ray.commands.{name}":
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # Our own INFO lines; libraries (botocore, urllib3, ...) only from WARNING unless --debug.
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("zeus_ray").setLevel(logging.DEBUG if args.debug else logging.INFO)
    try:
        return int(args.handler(args) or 0)
    except ZeusError as e:
        if args.debug:
            raise
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
