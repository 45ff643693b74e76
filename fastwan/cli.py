"""``fastwan`` command line: one subcommand per module in ``fastwan.commands``.

Each module defines ``register(subparsers)``, which adds its parser and sets ``func``;
heavy imports stay inside the command functions so ``fastwan --help`` is instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order ``--help`` lists them.
COMMAND_MODULES = [
    "fastwan.commands.demo",
    "fastwan.commands.generate",
    "fastwan.commands.preprocess",
    "fastwan.commands.synthesize",
    "fastwan.commands.train",
    "fastwan.commands.plan",
    "fastwan.commands.bench",
    "fastwan.commands.ui",
    "fastwan.commands.serve",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastwan",
        description="Sparse distillation (DMD2 + VSA) for Wan video diffusion transformers.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # A command may explain arguments no option took (``unknown_args``: raises ValueError,
    # e.g. a misspelt recipe field with the valid ones); others get argparse's error.
    unknown_args = getattr(args, "unknown_args", None)
    if extra and unknown_args is None:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if extra:
            unknown_args(extra)
        return int(args.func(args) or 0)
    except ValueError as err:  # bad input: a clear message, no traceback
        print(f"fastwan {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a failed write or read: the path and the reason, no traceback
        print(f"fastwan {args.command}: error: {err}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
