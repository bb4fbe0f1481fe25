"""Standalone entry points (``python -m fireflow.bench.pie ...``) with the CLI's error handling."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any


def run_main(parser: argparse.ArgumentParser, argv: list[str] | None) -> int:
    """Run ``args.func``; bad input is one line on stderr and exit status 2, as ``fireflow`` does."""
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except (ValueError, FileNotFoundError) as e:  # FileNotFoundError: fireflow's ModelNotFoundError
        print(f"{parser.prog}: error: {e}", file=sys.stderr)
        return 2
    return 0


def run_command(command: str, add_parser: Callable[[Any], object], argv: list[str] | None) -> int:
    """``python -m fireflow.bench.<command> ARGS``: the same as ``fireflow bench <command> ARGS``."""
    parser = argparse.ArgumentParser(prog=f"python -m fireflow.bench.{command}")
    add_parser(parser.add_subparsers(dest="command"))
    return run_main(parser, [command, *(sys.argv[1:] if argv is None else argv)])
