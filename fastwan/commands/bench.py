"""``fastwan bench {attention,...}``: speed benchmarks that print ratios and JSON."""

from __future__ import annotations

import importlib

BENCHMARKS = {
    "attention": ("fastwan.bench.attention", "dense SDPA vs VSA, forward and backward"),
    "denoise": (
        "fastwan.bench.denoise",
        "one Wan transformer forward, dense vs VSA; projected 3-step VSA vs 50-step CFG",
    ),
}


def register(subparsers) -> None:
    parser = subparsers.add_parser("bench", help="speed benchmarks (ratios + JSON)")
    sub = parser.add_subparsers(dest="benchmark", metavar="BENCHMARK", required=True)
    for name, (module, help_text) in BENCHMARKS.items():
        p = sub.add_parser(name, help=help_text)
        importlib.import_module(module).add_arguments(p)
        p.set_defaults(func=_runner(module))


def _runner(module: str):
    def run(args) -> int:
        importlib.import_module(module).run(args)
        return 0

    return run
