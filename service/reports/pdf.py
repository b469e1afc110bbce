"""The report for people: a PDF rendered from the signed JSON (the JSON stays the source of truth).

matplotlib draws every page (its PDF backend is the PDF library: text, vector plots, fonts embedded), so the
API needs no second toolkit; figures are built object by object (no pyplot state) and drawn one at a time
(``_DRAWING``), safe in a threaded server. Page 1 is the summary a compliance officer reads in a minute;
page 2 the evidence: score distributions, the per-sample attack's ROC (log-log) and utility per class, before
and after, each drawn by one function the console uses too (``evidence_svg``).
Deterministic: the same report renders to the same bytes.
"""

from __future__ import annotations

import io
import itertools
import textwrap
import threading
from collections.abc import Callable
from typing import Any

from matplotlib.axes import Axes
from matplotlib.backends.backend_pdf import PdfPages
from matplotlib.figure import Figure

A4 = (8.27, 11.69)
VERDICT_WORDS = {
    "forgotten": "FORGOTTEN: the membership signal the model carried is gone",
    "no_measurable_signal": "NO MEASURABLE SIGNAL: not even the model before unlearning showed one",
    "insufficient_power": "INSUFFICIENT POWER: the test could not show a signal either way",
    "unverifiable": "NOT SHOWN: on the new version the test cannot flag samples it still holds",
    "residual_membership": "NOT ERASED: the model still treats the samples as members",
    "over_forgetting": "NOT ACCEPTED: the samples look less like members than never-seen data",
    "unchanged": "NOT ERASED: the model is unchanged",
    "insufficient_controls": "NOT SHOWN: too few never-seen samples to calibrate the test",
    "already_erased": "ALREADY ERASED: the model held none of the samples",
    None: "NOT AUDITED: the job ended before an audit",
}


def _lines(report: dict[str, Any], sha256: str, key_id: str) -> list[tuple[str, str]]:
    request, samples = report["request"], report["samples"]
    erasures = report["erasures"]
    completed = sum(1 for erasure in erasures if erasure["state"] == "completed")
    rows = [
        ("Request", f"{request['id']} ({request['state'].upper()}: {completed} of {len(erasures)} models "
                    f"completed); scope: {request['scope']}; reason: {request.get('reason') or '-'}"),
        ("Received / due", f"{request['received_at']} / {request['due_at']}"),
        ("Settled", f"{request.get('completed_at')}; due date met: {request['due_date_met']}"),
        ("What was erased", f"{samples['count']} training samples, committed as SHA-256 Merkle root "
                            f"{samples['commitment']['root'][:32]}... (no identifier is listed)"),
        ("Method", f"{report['method']} ({report['method_class']})"),
    ]  # fmt: skip
    for erasure in erasures:
        rows += _erasure_lines(erasure)
    rows.append(
        ("Integrity", f"report SHA-256 {sha256}; Ed25519 key {key_id}; verify with `lethe report verify`")
    )
    return rows


def _erasure_lines(erasure: dict[str, Any]) -> list[tuple[str, str]]:
    outcome = erasure["outcome"]
    evidence = erasure.get("evidence") or {}
    membership = evidence.get("membership", {})
    after, before = membership.get("after", {}), membership.get("before", {})
    base, new = erasure.get("base_version"), erasure.get("new_version")
    verdict = VERDICT_WORDS.get(outcome.get("verdict"), str(outcome.get("verdict")))
    rows = [
        (f"Model {erasure['model']['name']}", f"{verdict}; erasure {erasure['state']}"),
        ("Versions", f"v{base['number'] if base else '-'} -> v{new['number'] if new else '-'} "
                     f"({new['status'] if new else 'no new version'}); {erasure['samples_held']} samples "
                     f"held, {erasure['already_erased']} already erased; "
                     f"{len(erasure['attempts'])} attempt(s)"),
    ]  # fmt: skip
    if membership:
        rmia_before, rmia_after = before.get("rmia") or {}, after.get("rmia") or {}
        combined = after.get("combined") or {}
        rows += [
            ("Member-like share", f"LiRA {before.get('member_share')} before -> {after.get('member_share')} "
                                  f"after; RMIA {rmia_before.get('member_share')} -> "
                                  f"{rmia_after.get('member_share')} ({after.get('member_share_expected')} "
                                  f"expected of never-seen data)"),
            ("Over-forgetting share", f"LiRA {after.get('over_forgetting_share')}, RMIA "
                                      f"{rmia_after.get('over_forgetting_share')}"),
            ("The gate's test, after", f"residual membership p = {combined.get('residual_membership_p')}, "
                                       f"over-forgetting p = {combined.get('over_forgetting_p')} "
                                       f"({', '.join(combined.get('gating_attacks') or ['lira'])}; RMIA "
                                       f"is reported, not gating)"),
            ("Attack AUC, TPR@1%FPR", f"{before.get('auc')}, {before.get('tpr_at_1pct_fpr')} before -> "
                                      f"{after.get('auc')}, {after.get('tpr_at_1pct_fpr')} after (LiRA)"),
        ]  # fmt: skip
    scope = evidence.get("evidence") or {}
    if scope:
        rows.append(("Evidence", _scope_line(scope)))
    power = evidence.get("power") or {}
    if power:
        rows.append(("Power on this version", _power_line(power)))
    for failure in outcome.get("failures") or []:
        rows.append(("Failed rule", failure))
    if outcome.get("error"):
        rows.append(("Job error", f"{outcome['error']['reason']}: {outcome['error']['detail']}"))
    rows.append(("Limitations", erasure["limitations"]))
    return rows


def _scope_line(scope: dict[str, Any]) -> str:
    own = (f"this request's {scope.get('samples')} samples; the test flags a member-like share of "
           f"{scope.get('detectable_member_share')} or more")  # fmt: skip
    batch = scope.get("batch")
    if scope.get("scope") == "batch" and batch:
        return (f"pooled: its job's {batch['samples']} samples, this request's included ({batch['verdict']}; "
                f"detects a share of {batch['detectable_member_share']} or more); alone: {own}")  # fmt: skip
    return own


def _power_line(power: dict[str, Any]) -> str:
    return (
        f"the same test flags {power.get('held_member_share')} of {power.get('held_samples')} samples the "
        f"new model still holds, matched in difficulty (p = {power.get('held_residual_membership_p')}), and "
        f"{power.get('never_seen_member_share')} of {power.get('never_seen_samples')} never-seen samples: "
        + ("it can see membership on this version" if power.get("detects_held_members")
           else "it could NOT flag samples this version holds, so its silence certifies nothing")
    )  # fmt: skip


def _summary_pages(report: dict[str, Any], sha256: str, key_id: str) -> list[Figure]:
    """The summary, continued on further pages when the request spans many models."""
    figure = Figure(figsize=A4)
    figure.text(0.07, 0.95, "Erasure report", fontsize=20, weight="bold")
    figure.text(0.07, 0.925, "GDPR Art. 17 deletion request: outcome and evidence", fontsize=11, color="0.3")
    pages, y = [figure], 0.88
    for label, value in _lines(report, sha256, key_id):
        wrapped = textwrap.wrap(str(value), 72, break_long_words=True) or [""]
        height = 0.016 * len(wrapped) + 0.012
        if y - height < 0.05:
            figure = Figure(figsize=A4)
            figure.text(0.07, 0.95, "Erasure report (continued)", fontsize=14, weight="bold")
            pages.append(figure)
            y = 0.9
        figure.text(0.07, y, label, fontsize=9, weight="bold", va="top")
        figure.text(0.30, y, "\n".join(wrapped), fontsize=9, va="top", family="DejaVu Sans")
        y -= height
    return pages


def draw_score_distributions(ax: Axes, evidence: dict[str, Any]) -> None:
    distributions = evidence.get("score_distributions") or {}
    edges = distributions.get("edges")
    if edges:
        centres = [(a + b) / 2 for a, b in itertools.pairwise(edges)]
        styles = {"before": "--", "after": "-"}
        colours = {"forgotten": "tab:red", "remaining": "tab:blue", "never_seen": "tab:green"}
        for model, style in styles.items():
            for group, counts in distributions.get(model, {}).items():
                total = max(1, sum(counts))
                ax.plot(centres, [c / total for c in counts], style, color=colours.get(group, "k"),
                        label=f"{group.replace('_', '-')} ({model})")  # fmt: skip
        ax.set_xlabel("score: stable logit of the labelled class")
        ax.set_ylabel("share of samples")
        ax.legend(fontsize=7, ncol=2)
    ax.set_title("Score distributions before (dashed) and after (solid) unlearning", fontsize=10)


def draw_roc(ax: Axes, evidence: dict[str, Any]) -> None:
    for model, style in (("before", "--"), ("after", "-")):
        roc = evidence["membership"][model].get("roc")
        if roc:  # a true-positive rate of 0 has no place on a log axis: those points are left out
            points = [(f, t) for f, t in zip(roc["fpr"], roc["tpr"], strict=True) if t > 0]
            ax.loglog([f for f, _ in points], [t for _, t in points], style, label=f"{model}")
    ax.loglog([1e-3, 1], [1e-3, 1], ":", color="0.5", label="chance")
    ax.set_xlabel("false-positive rate (never-seen controls called members)")
    ax.set_ylabel("true-positive rate")
    ax.set_title("Per-sample membership attack on the forgotten samples (ROC, log-log)", fontsize=10)
    ax.legend(fontsize=8)


def draw_utility(ax: Axes, evidence: dict[str, Any]) -> None:
    per_class = evidence["utility"]["per_class"]
    labels = list(per_class)
    positions = range(len(labels))
    ax.bar([p - 0.2 for p in positions], [per_class[c]["before"] for c in labels], 0.4, label="before")
    ax.bar([p + 0.2 for p in positions], [per_class[c]["after"] for c in labels], 0.4, label="after")
    low = min(min(per_class[c]["before"], per_class[c]["after"]) for c in labels)
    ax.set_ylim(max(0, low - 10), 100)
    ax.set_xticks(list(positions), labels)
    ax.set_xlabel("class")
    ax.set_ylabel("accuracy on never-seen data (%)")
    ax.set_title("Utility per class, before and after", fontsize=10)
    ax.legend(fontsize=8)


# matplotlib's mathtext parser (the log axes' tick labels, 10^-3) is one shared object and not thread-safe:
# the server's threads draw one figure at a time (two drawn at once, its parse of a label fails).
_DRAWING = threading.Lock()

# The evidence figures, in page order: the PDF's evidence page and the console's pictures draw the same ones.
EVIDENCE_FIGURES: dict[str, Callable[[Axes, dict[str, Any]], None]] = {
    "scores": draw_score_distributions,
    "roc": draw_roc,
    "utility": draw_utility,
}


def evidence_svg(evidence: dict[str, Any], kind: str) -> bytes:
    """One evidence figure on its own, as SVG (``kind``: a key of ``EVIDENCE_FIGURES``): the console's."""
    with _DRAWING:
        figure = Figure(figsize=(7.5, 3.6))
        EVIDENCE_FIGURES[kind](figure.subplots(), evidence)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    return buffer.getvalue()


def _evidence_page(erasure: dict[str, Any]) -> Figure:
    figure = Figure(figsize=A4)
    axes = figure.subplots(len(EVIDENCE_FIGURES), 1)
    figure.suptitle(
        f"Evidence: model {erasure['model']['name']}", fontsize=14, weight="bold", x=0.1, ha="left"
    )
    for ax, draw in zip(axes, EVIDENCE_FIGURES.values(), strict=True):
        draw(ax, erasure["evidence"])
    figure.tight_layout(rect=(0, 0, 1, 0.96))
    return figure


def render_pdf(report: dict[str, Any], sha256: str, key_id: str) -> bytes:
    buffer = io.BytesIO()
    # No creation date: the same report renders to the same bytes.
    with (
        _DRAWING,
        PdfPages(
            buffer, metadata={"Title": f"Erasure report {report['request']['id']}", "CreationDate": None}
        ) as pdf,
    ):
        evidence = [_evidence_page(erasure) for erasure in report["erasures"] if erasure.get("evidence")]
        for figure in [*_summary_pages(report, sha256, key_id), *evidence]:
            pdf.savefig(figure)
    return buffer.getvalue()
