"""``lethe purge replay``: re-apply the erasure ledger after a database restore (README, "Backups").

A database backup taken before a purge still names the purged checkpoints, rows and subjects; the ledger (in
the object store, beside what it describes, never in the database) lists every purge. Run this after any
restore, before the API and the workers start: it tombstones the versions again, pseudonymises the
identifiers, points datasets at their purged array generations and deletes whatever the restore brought back
into the store. Idempotent: running it twice changes nothing the second time. Torch-free.
"""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_parser(subparsers: Any) -> None:
    purge = subparsers.add_parser("purge", help="the erasure ledger: re-apply every purge after a restore")
    commands = purge.add_subparsers(dest="purge_command", required=True, metavar="PURGE_COMMAND")
    replay = commands.add_parser("replay", help="re-apply every purge the ledger lists (idempotent)")
    replay.set_defaults(handler=_replay)


def _replay(_args: argparse.Namespace) -> int:
    from service.core.database import make_engine, make_session_factory
    from service.core.settings import Settings
    from service.purges.service import replay
    from service.storage import open_store

    settings = Settings()
    engine = make_engine(settings.database_url)
    try:
        outcome = replay(make_session_factory(engine), open_store(settings.storage_url), settings)
    finally:
        engine.dispose()
    print(json.dumps(outcome, indent=2))
    return 0
