"""Dense SDPA vs VSA, and with ``--peer fastvideo`` FastVideo's own VSA beside fastwan's;
same as ``fastwan bench attention`` (see ``--help``). Imports only the benchmark, not the
whole CLI (whose training options need pydantic), so it runs on a bare GPU image."""

import argparse
import sys

from fastwan.bench.attention import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmarks/attention.py", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    try:
        run(args)
    except ValueError as err:
        print(f"benchmarks/attention.py: error: {err}", file=sys.stderr)
        sys.exit(2)
