"""spotmesh benchmarks (``spotmesh bench ...``): each prints a table, writes JSON, and measures
its baseline in the same run."""

from __future__ import annotations

import argparse


def add_parsers(sub: argparse._SubParsersAction) -> None:
    from cli.bench import cache, load, prefix, prefix_sim, serve

    bench = sub.add_parser("bench", help="benchmarks").add_subparsers(dest="sub", required=True)
    for module in (serve, cache, prefix_sim, load, prefix):
        module.add_parser(bench)
