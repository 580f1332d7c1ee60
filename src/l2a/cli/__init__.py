"""`l2a` command line: thin parsers that call the library.

Each module in this package defines `register(subparsers)`, which adds one sub-command and sets
`func(args) -> int | None` as its handler. Building the parser imports no torch or transformers (the
handlers import the library), so `l2a --help` is instant. Every handler runs under
`l2a.cli._common.run_command`: a user's mistake is one line `l2a <command>: error: ...` with exit code 2.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from l2a import __version__
from l2a.cli._common import run_command


class _Parser(argparse.ArgumentParser):
    """argparse's usage mistakes as one line too (argparse prints the whole usage block first)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="l2a",
        description="Conditional long-range attention (L2A) toolkit.",
        epilog="Errors are one line with exit code 2; set L2A_DEBUG=1 for a traceback.",
    )
    parser.add_argument("--version", action="version", version=f"l2a {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_command(args.command, args.func, args)


if __name__ == "__main__":
    sys.exit(main())
