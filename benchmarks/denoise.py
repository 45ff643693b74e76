"""Dense vs VSA Wan transformer forward and the projected denoising speedup; same as
``fastwan bench denoise`` (see ``--help``)."""

import argparse
import sys

from fastwan.bench.denoise import add_arguments, run

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="benchmarks/denoise.py", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args()
    try:
        run(args)
    except ValueError as err:
        print(f"benchmarks/denoise.py: error: {err}", file=sys.stderr)
        sys.exit(2)
