"""``persedit``: edit preferences into an adapter, ask it questions, show what it holds, group users, evaluate.

The commands live in :mod:`.adapters`, :mod:`.groups` and :mod:`.eval`; each registers its subparsers with
``add_commands(sub)`` and imports only from :mod:`.common` (imports point one way: this package → command
modules → common).
"""

from __future__ import annotations

import argparse
import sys
from importlib.metadata import PackageNotFoundError, version

from . import adapters, eval, groups
from .common import EPILOG, USER_ERRORS, error_message

__all__ = ["build_parser", "main", "parse"]

#: the command modules, in the order their commands are listed by ``persedit --help``
COMMAND_MODULES = (adapters, groups, eval)


def build_parser() -> argparse.ArgumentParser:
    """The ``persedit`` parser with every command registered."""
    parser = argparse.ArgumentParser(prog="persedit", description="LLM personalization as model editing "
                                     "(PEFT adapter type PERSEDIT).", epilog=EPILOG)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")  # required: checked in parse (see there)
    for module in COMMAND_MODULES:
        module.add_commands(sub)
    return parser


def _version() -> str:
    try:
        return version("peft-persedit")
    except PackageNotFoundError:
        return "(not installed)"


def parse(argv: list[str] | None = None) -> argparse.Namespace:
    """Parse; an unknown option is named as such (argparse's required subcommand would hide it)."""
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    if args.command is None:
        parser.error("a command is required (see persedit --help)")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run ``persedit`` with ``argv`` (default: the command line); a user error prints one line, exit status 2."""
    args = parse(argv)
    try:
        return args.func(args)
    except USER_ERRORS as err:
        print(error_message(err), file=sys.stderr)
        return 2
