"""Benchmarks behind ``fastwan bench``: each module has ``add_arguments(parser)`` and
``run(args) -> dict``; every speed ratio is against a baseline measured in the same run."""
