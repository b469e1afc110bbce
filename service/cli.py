"""The ``lethe`` command: one argparse parser, one subcommand per module.

Each module listed below exposes ``add_parser(subparsers)``, which registers its subcommand and sets a
``handler(args) -> int`` default. Those modules must import nothing heavy at module level (the API process
never loads torch): a handler imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Sequence

SUBCOMMAND_MODULES: tuple[str, ...] = (
    "service.commands",
    "service.reports.cli",
    "service.clients.cli",
    "service.purges.cli",
    "worker.bench.cli",
    "worker.audit_command",
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lethe", description="Lethe: machine unlearning as a service.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.handler(args))
