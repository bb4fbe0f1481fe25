"""Standalone entry points (``python -m fireflow.bench.pie ...``) with the CLI's error handling."""

from __future__ import annotations

import argparse
import sys


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Run ``args.func``; bad input is one line on stderr and exit status 2, as ``fireflow`` does."""
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: fireflow's ModelNotFoundError
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0
