"""Subcommands of the ``fastwan`` CLI (see ``fastwan.cli``)."""
