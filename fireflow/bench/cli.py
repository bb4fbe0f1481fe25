"""Mounts the benchmarks on the ``fireflow`` command (``fireflow.cli.EXTRA_COMMANDS``).

fireflow bench pie --data DIR --out DIR [--types ...] [editing and model options]
fireflow bench reconstruct --images DIR [--prompts FILE] --out DIR
fireflow bench synthetic --out DIR
fireflow bench batch [--images N --targets T]  (items/s of `fireflow batch`)
fireflow eval pie --data DIR --edits DIR

(The studies behind the README's tables run from a checkout: ``python -m research.<study>``.)
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``bench`` (pie, reconstruct, synthetic) and ``eval`` (pie) under ``subparsers``."""
    from fireflow.bench import batch_speed, pie, reconstruct, synthetic

    bench = subparsers.add_parser("bench", help="benchmarks: PIE-Bench edits, reconstruction, synthetic data")
    bench_sub = bench.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    pie.add_bench_parser(bench_sub)
    reconstruct.add_parser(bench_sub)
    synthetic.add_parser(bench_sub)
    batch_speed.add_parser(bench_sub)
    ev = subparsers.add_parser("eval", help="score benchmark outputs")
    ev_sub = ev.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")
    pie.add_eval_parser(ev_sub)
