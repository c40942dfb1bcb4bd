"""flannelctl: admin and lab tool.  Each subcommand is a module of this package defining register(subparsers)."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from flannelpy.errors import FlannelError


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flannelctl", description="flannelpy admin and lab tool")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name.startswith("_"):  # __main__ runs flannelctl itself
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        register = getattr(module, "register", None)
        if register is not None:
            register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except FlannelError as err:
        print(f"flannelctl: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130

