"""The calibration study's table: every (dataset, seed, K) run of ``worker.bench.audit_calibration`` side by
side, each seed's rates shown, and one JSON holding them all.

    python -m worker.bench.audit_table results/audit/*.json --json docs/results/audit-calibration.json
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from worker.audit.gate import AuditRules

RULES = AuditRules()
# A subject counts as memorised when the base model predicts at least this many of its wrong labels.
MEMORISED = 5


def _passed(record: dict[str, Any], k: str) -> bool:
    return bool(record["audits"][k]["passed"])


def _verdict(record: dict[str, Any], k: str) -> str:
    return str(record["audits"][k]["verdict"])


MEMBERSHIP_FAILURES = ("residual membership", "over-forgetting", "unverifiable")


def _passed_with(record: dict[str, Any], k: str, attack: str) -> bool:
    """Would the gate have passed with ``attack``'s test alone (at one direction's level, no Bonferroni
    factor), every other rule as it was?"""
    audit = record["audits"][k]
    level = RULES.direction_level
    after = audit["membership"]["after"][attack]
    others = [f for f in audit["failures"] if not f.startswith(MEMBERSHIP_FAILURES)]
    return not others and after["residual_p"] >= level and after["over_forgetting_p"] >= level


def _count(records: list[dict[str, Any]], test: Any) -> str:
    return f"{sum(1 for r in records if test(r))}/{len(records)}" if records else "-"


def rows_of(run: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per K of one run: the rates the bars name."""
    study, records = run["study"], run["records"]
    by_way: dict[str, list[dict[str, Any]]] = {}
    for record in records:
        by_way.setdefault(record["way"], []).append(record)
    retrain = {r["subject"]: r for r in by_way.get("retrain", [])}
    retrain_s = sum(r["unlearn_seconds"] for r in retrain.values()) / max(1, len(retrain))
    rows = []
    for k, summary in run["summary"].items():
        row: dict[str, Any] = {
            "dataset": study["dataset"], "seed": study["seed"], "k": int(k),
            "references_over_retrain": summary.get("reference_build_over_retrain"),
        }  # fmt: skip
        for way, group in by_way.items():
            atypical = [r for r in group if r["atypical"]]
            clean = [r for r in group if not r["atypical"]]
            memorised = [r for r in group if r["memorised_wrong_labels"] >= MEMORISED]
            row[way] = {
                "accepted": _count(group, lambda r, k=k: _passed(r, k)),
                "accepted_atypical": _count(atypical, lambda r, k=k: _passed(r, k)),
                "accepted_clean": _count(clean, lambda r, k=k: _passed(r, k)),
                "rejected_memorised": _count(memorised, lambda r, k=k: not _passed(r, k)),
                "rejected_atypical": _count(atypical, lambda r, k=k: not _passed(r, k)),
                "over_forgetting": _count(group, lambda r, k=k: _verdict(r, k) == "over_forgetting"),
                "accepted_lira_alone": _count(group, lambda r, k=k: _passed_with(r, k, "lira")),
                "accepted_rmia_alone": _count(group, lambda r, k=k: _passed_with(r, k, "rmia")),
                "power_detects": _count(
                    group, lambda r, k=k: r["audits"][k]["power"]["detects_held_members"]
                ),
                "seconds_over_retrain": round(
                    sum(r["unlearn_seconds"] for r in group) / len(group) / retrain_s, 3
                )
                if retrain_s
                else None,
            }
            if way != "retrain" and retrain:
                # Of the subjects exact retraining passes, how many this way passes too.
                both = [r for r in group if r["subject"] in retrain and _passed(retrain[r["subject"]], k)]
                row[way]["accepted_where_retrain_is"] = {
                    "atypical": _count([r for r in both if r["atypical"]], lambda r, k=k: _passed(r, k)),
                    "clean": _count([r for r in both if not r["atypical"]], lambda r, k=k: _passed(r, k)),
                }
        rows.append(row)
    return rows


def markdown(rows: list[dict[str, Any]], ways: list[str]) -> str:
    header = ["dataset", "seed", "K", "refs / retrain", "retrain accepted (atypical, clean)"]
    header += ["retrain accepted: LiRA alone, RMIA alone", "retrain over-forgetting"]
    header += ["no-op rejected: memorised", "no-op rejected: atypical", "no-op rejected: clean"]
    for way in ways:
        header += [f"{way} accepted (atypical, clean)", f"{way} where retrain is", f"{way} time / retrain"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for row in rows:
        retrain, noop = row.get("retrain", {}), row.get("noop", {})
        cells = [row["dataset"], str(row["seed"]), str(row["k"]), str(row["references_over_retrain"])]
        cells += [
            f"{retrain.get('accepted', '-')} "
            f"({retrain.get('accepted_atypical')}, {retrain.get('accepted_clean')})",
            f"{retrain.get('accepted_lira_alone', '-')}, {retrain.get('accepted_rmia_alone', '-')}",
            retrain.get("over_forgetting", "-"),
        ]
        clean_rejected = "-"
        if noop:
            accepted, total = noop["accepted_clean"].split("/")
            clean_rejected = f"{int(total) - int(accepted)}/{total}"
        cells += [noop.get("rejected_memorised", "-"), noop.get("rejected_atypical", "-"), clean_rejected]
        for way in ways:
            block = row.get(way)
            if not block:
                cells += ["-", "-", "-"]
                continue
            where = block.get("accepted_where_retrain_is", {})
            cells += [
                f"{block['accepted']} ({block['accepted_atypical']}, {block['accepted_clean']})",
                f"{where.get('atypical', '-')}, {where.get('clean', '-')}",
                str(block["seconds_over_retrain"]),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("runs", type=Path, nargs="+", help="JSON files written by audit_calibration")
    parser.add_argument(
        "--ways", default="mixunlearn", help="comma list of ways to tabulate beside retrain and the no-op"
    )
    parser.add_argument("--json", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = [json.loads(path.read_text()) for path in args.runs]
    rows = [row for run in runs for row in rows_of(run)]
    rows.sort(key=lambda row: (row["dataset"], row["seed"], row["k"]))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"rows": rows, "runs": runs}, indent=1) + "\n")
    print(markdown(rows, [w for w in args.ways.split(",") if w and w not in ("retrain", "noop")]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
