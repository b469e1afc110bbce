"""``lethe report keygen | verify``: report-signing keys, and checking a downloaded report offline.

    lethe report keygen [--dir DIR] [--if-none]
    lethe report verify REPORT.json [--signature SIG] [--public-key KEY | --url API]

``verify`` exits 0 when the report's bytes are canonical JSON and the detached signature verifies under the
named key, 1 on any change, 2 on bad input. Torch-free, like every module that builds the ``lethe`` parser.
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import json
import sys
from pathlib import Path
from typing import Any


def add_parser(subparsers: Any) -> None:
    report = subparsers.add_parser("report", help="erasure reports: signing keys, offline verification")
    commands = report.add_subparsers(dest="report_command", required=True, metavar="REPORT_COMMAND")
    keygen = commands.add_parser("keygen", help="create a new Ed25519 signing key; it becomes the active one")
    keygen.add_argument("--dir", type=Path, default=None, help="default: LETHE_REPORT_KEY_DIR")
    keygen.add_argument("--if-none", action="store_true", help="only when the directory holds no key yet")
    keygen.set_defaults(handler=_keygen)
    verify = commands.add_parser("verify", help="verify a downloaded report against its detached signature")
    verify.add_argument("report", type=Path, help="the report's JSON, as downloaded")
    verify.add_argument("--signature", type=Path, default=None, help="default: REPORT with .sig for .json")
    keys = verify.add_mutually_exclusive_group(required=True)
    keys.add_argument(
        "--public-key", type=Path, help="the raw Ed25519 public key, base64 (from /report-keys)"
    )
    keys.add_argument("--url", help="the Lethe API's base URL: the key is fetched from its /report-keys")
    verify.set_defaults(handler=_verify)


def _keygen(args: argparse.Namespace) -> int:
    from service.core.settings import Settings
    from service.reports.keys import KeyRing

    directory = args.dir or Settings().report_key_dir
    ring = KeyRing(directory)
    if args.if_none and ring.signing_keys():
        print(f"{directory} holds a key already; none generated")
        return 0
    key = ring.generate()
    info = key.public_info(active=True)
    print(f"key {info['key_id']} (sha256 {info['fingerprint_sha256']}) written to {directory}; now active")
    return 0


def _fail(message: str, code: int) -> int:
    print(f"lethe report verify: {message}", file=sys.stderr)
    return code


def _public_key(args: argparse.Namespace, key_id: str) -> bytes:
    if args.public_key is not None:
        return base64.b64decode(args.public_key.read_text().strip(), validate=True)
    import httpx

    keys = httpx.get(f"{args.url.rstrip('/')}/report-keys", timeout=30).raise_for_status().json()["items"]
    for key in keys:
        if key["key_id"] == key_id:
            return base64.b64decode(key["public_key"])
    raise LookupError(f"{args.url} serves no key {key_id}")


def _verify(args: argparse.Namespace) -> int:
    from service.reports.builder import canonical_bytes
    from service.reports.keys import key_id_of, verify

    signature_path = args.signature or args.report.with_suffix(".sig")
    try:
        data = args.report.read_bytes()
        signature = json.loads(signature_path.read_text())
        public_raw = _public_key(args, str(signature.get("key_id")))
    except (OSError, ValueError, LookupError) as exc:
        return _fail(str(exc), 2)
    except Exception as exc:  # the API could not be reached or answered an error
        return _fail(f"cannot fetch the public key: {exc}", 2)
    try:
        canonical = canonical_bytes(json.loads(data)) == data
    except ValueError:
        canonical = False
    problems = []
    if not canonical:
        problems.append("the report is not the canonical JSON that was signed")
    if key_id_of(public_raw) != signature.get("key_id"):
        problems.append(f"the public key is not key {signature.get('key_id')}")
    named = (json.loads(data).get("signing") or {}).get("key_id") if canonical else None
    if canonical and named != signature.get("key_id"):
        problems.append(f"the report names key {named}, the signature key {signature.get('key_id')}")
    if signature.get("signed_sha256") not in (None, hashlib.sha256(data).hexdigest()):
        problems.append("the report's SHA-256 differs from the one signed")
    if not verify(public_raw, data, signature):
        problems.append("the signature does not verify")
    if problems:
        for problem in problems:
            print(f"FAILED: {problem}")
        return 1
    print(
        f"OK: {args.report} is signed by key {signature['key_id']} "
        f"(sha256 {hashlib.sha256(data).hexdigest()})"
    )
    return 0
