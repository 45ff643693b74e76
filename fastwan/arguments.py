"""argparse helpers shared by the commands and the benchmarks (torch-free, beside
:mod:`fastwan.choices`): both ``fastwan.commands`` and ``fastwan.bench`` import them from
here, so a benchmark never imports a command module."""

from __future__ import annotations

import argparse

from fastwan.choices import COMPILE_BACKENDS


def add_compile_argument(p: argparse.ArgumentParser, help: str) -> None:
    """``--compile [BACKEND]``: None when absent, ``inductor`` when given bare."""
    p.add_argument(
        "--compile",
        nargs="?",
        const="inductor",
        default=None,
        choices=COMPILE_BACKENDS,
        help=help,
    )
