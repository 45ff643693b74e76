"""Dense SDPA vs VSA benchmark; same as ``fastwan bench attention`` (see ``--help``)."""

import sys

from fastwan.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", "attention", *sys.argv[1:]]))
