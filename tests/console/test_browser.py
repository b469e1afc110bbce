"""The console in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright, against the
API served by uvicorn. Each page passes axe-core with no serious or critical violation and trips no
Content-Security-Policy report. Skipped when the browser or Playwright is not installed.

``LETHE_TEST_SCREENSHOTS=1`` writes docs/console-queue.png and docs/console-request.png (the README's
pictures).
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn
from sqlalchemy import text

from service.core.clock import utcnow
from tests.console import seed
from tests.console.conftest import Env

CHROMIUM = Path("/usr/bin/chromium")
if not CHROMIUM.exists():
    pytest.skip(f"no browser at {CHROMIUM} (Debian's chromium package)", allow_module_level=True)
sync_api = pytest.importorskip("playwright.sync_api", reason="Playwright's Python package is not installed")

pytestmark = pytest.mark.slow
AXE = (Path(__file__).parent / "axe.min.js").read_text()  # axe-core 4.14.1 (MPL-2.0), test-only
DOCS = Path(__file__).parents[2] / "docs"
SCREENSHOTS = os.environ.get("LETHE_TEST_SCREENSHOTS") == "1"
Page = Any  # playwright.sync_api.Page: the module may be absent, and the test is skipped then
sync_api.expect.set_options(timeout=15_000)  # two shared cores: a PDF rendered meanwhile can take seconds


@pytest.fixture(scope="module")
def server(env: Env) -> Iterator[str]:
    """The API (console included) on a free loopback port, in a thread of this process."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    served = uvicorn.Server(uvicorn.Config(env.app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=served.run, daemon=True)
    thread.start()
    while not served.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{port}"
    served.should_exit = True
    thread.join()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with sync_api.sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM),
            headless=True,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any, server: str) -> Iterator[Page]:
    context = browser.new_context(
        base_url=server, viewport={"width": 1280, "height": 900}, accept_downloads=True
    )
    opened = context.new_page()
    refused: list[str] = []
    opened.on(
        "console",
        lambda message: refused.append(message.text) if "Content Security Policy" in message.text else None,
    )
    yield opened
    context.close()
    assert not refused, f"the page broke its own Content-Security-Policy: {refused}"


def sign_in(page: Page, token: str, start: str = "/console/") -> None:
    """Sign in from the keyboard: the token field has the focus, Enter submits."""
    page.goto(start)
    assert page.locator("h1").inner_text() == "Sign in"
    assert page.evaluate("document.activeElement.id") == "token"
    page.keyboard.type(token)
    page.keyboard.press("Enter")
    page.wait_for_url(lambda url: "/sign-in" not in url)


def check_accessibility(page: Page) -> None:
    """axe-core on the page as it stands: no serious or critical violation (WCAG 2.x A and AA rules)."""
    page.evaluate(AXE)  # evaluated by the driver: the page's own CSP (script-src 'self') stays as it is
    results = page.evaluate("() => axe.run(document, {resultTypes: ['violations']})")
    serious = [
        f"{v['id']} ({v['impact']}): {v['help']} at {[node['target'] for node in v['nodes']]}"
        for v in results["violations"]
        if v["impact"] in ("serious", "critical")
    ]
    assert not serious, serious


def test_an_officer_finds_a_request_by_due_date(page: Page, env: Env) -> None:
    page.goto("/console/sign-in")
    check_accessibility(page)
    sign_in(page, env.acme.officer)
    if SCREENSHOTS:
        page.screenshot(path=str(DOCS / "console-queue.png"), full_page=True)
    page.keyboard.press("Tab")
    assert page.evaluate("document.activeElement.textContent") == "Skip to content"  # first in focus order
    assert page.locator("h1").inner_text() == "Deletion requests"
    assert page.get_by_role("link", name="Models").count() == 0  # an officer: no models:read
    rows = page.locator("table.queue tbody tr")
    assert rows.count() == 2  # the two open requests; the settled ones are not in the open queue
    first = rows.nth(0)
    assert env.acme.requests["soon"][:8] in first.inner_text() and "at risk" in first.inner_text()
    assert "at risk" not in rows.nth(1).inner_text()
    check_accessibility(page)
    day = (utcnow() + timedelta(days=2)).date().isoformat()
    page.get_by_label("Due from").fill(day)
    page.get_by_label("Due until").fill(day)
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**due_from=*")
    assert rows.count() == 1 and env.acme.requests["soon"][:8] in rows.nth(0).inner_text()
    page.get_by_label("State").select_option("all")
    page.get_by_label("Due from").fill("")
    page.get_by_label("Due until").fill("")
    page.get_by_label("Verdict").select_option("residual_membership")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**verdict=residual_membership*")
    assert rows.count() == 1
    rows.nth(0).get_by_role("link").click()
    assert page.url.endswith(f"/console/requests/{env.acme.requests['alice']}")


def test_an_officer_reads_the_evidence_downloads_the_pdf_and_sees_the_signature_verified(
    page: Page, env: Env
) -> None:
    sign_in(page, env.acme.officer, f"/console/requests/{env.acme.requests['alice']}")
    assert page.locator("h1").inner_text() == "Deletion request of subject alice"
    figures = page.locator("figure img")
    assert figures.count() == 3
    for image in range(figures.count()):  # each SVG drawn (its width known once it has loaded)
        sync_api.expect(figures.nth(image)).not_to_have_js_property("naturalWidth", 0)
    assert "checkpoint" not in page.content()  # no model download for an officer
    with page.expect_download() as pending:
        page.get_by_role("link", name="Report (PDF)").click()
    assert Path(pending.value.path()).read_bytes().startswith(b"%PDF")
    assert pending.value.suggested_filename == f"erasure-report-{env.acme.requests['alice']}.pdf"
    page.get_by_role("button", name="Verify the signature").focus()
    page.keyboard.press("Enter")  # from the keyboard
    result = page.locator("#verify-result")
    sync_api.expect(result).to_have_attribute("data-verified", "true")
    assert result.inner_text().startswith(f"Verified: signed by key {env.key_id}")
    assert " on 20" in result.inner_text()  # the signing date
    assert "Chain intact" in page.locator("#trail-check").inner_text()
    check_accessibility(page)
    if SCREENSHOTS:
        page.screenshot(path=str(DOCS / "console-request.png"), full_page=True)
    page.emulate_media(media="print")  # the printable page: the controls go, the content stays
    assert (
        page.locator("nav").is_hidden()
        and page.get_by_role("button", name="Verify the signature").is_hidden()
    )
    assert page.locator("#evidence-heading").is_visible()


def test_a_tampered_report_is_shown_as_not_verified(page: Page, env: Env, server: str) -> None:
    request_id = env.acme.requests["canceled"]
    headers = {"Authorization": f"Bearer {env.acme.officer}"}
    assert httpx.get(f"{server}/deletion-requests/{request_id}/report", headers=headers).status_code == 200
    with env.factory.begin() as session:  # someone edits the stored report after it was signed
        session.execute(
            text("UPDATE erasure_reports SET content = replace(content, '\"canceled\"', '\"completed\"') "
                 "WHERE request_id = :id"),
            {"id": request_id},
        )  # fmt: skip
    sign_in(page, env.acme.officer, f"/console/requests/{request_id}")
    page.get_by_role("button", name="Verify the signature").click()
    result = page.locator("#verify-result")
    sync_api.expect(result).to_have_attribute("data-verified", "false")
    assert result.inner_text().startswith("NOT verified: the signature does not match the report's bytes")


def test_a_report_file_is_verified_and_a_tampered_copy_is_not(
    page: Page, env: Env, server: str, tmp_path: Path
) -> None:
    request_id = env.acme.requests["alice"]
    headers = {"Authorization": f"Bearer {env.acme.officer}"}
    report = httpx.get(f"{server}/deletion-requests/{request_id}/report.json", headers=headers).content
    (tmp_path / "report.json").write_bytes(report)
    (tmp_path / "tampered.json").write_bytes(report.replace(b'"rejected"', b'"completed"'))
    signature = httpx.get(f"{server}/deletion-requests/{request_id}/report.sig", headers=headers).content
    (tmp_path / "report.sig").write_bytes(signature)
    sign_in(page, env.acme.officer)
    page.get_by_role("link", name="Verify a report").click()
    check_accessibility(page)
    result = page.locator("#verify-result")
    for name, verified in (("report.json", "true"), ("tampered.json", "false")):
        page.get_by_label("Report (signed JSON)").set_input_files(tmp_path / name)
        page.get_by_label("Signature").set_input_files(tmp_path / "report.sig")
        page.get_by_role("button", name="Verify").click()
        sync_api.expect(result).to_have_attribute("data-verified", verified)
    assert result.inner_text().startswith("NOT verified: the signature does not match the report's bytes")


def test_an_officer_is_refused_a_model_download(page: Page, env: Env) -> None:
    sign_in(page, env.acme.officer)
    answer = page.goto("/console/models/toy-model/versions/1/checkpoint")
    assert answer is not None and answer.status == 403
    assert (
        page.locator("h1").inner_text() == "Forbidden" and "models:read" in page.locator("main").inner_text()
    )
    check_accessibility(page)


def test_the_operator_sees_the_lineage_and_a_job_progressing(page: Page, env: Env) -> None:
    sign_in(page, env.acme.operator)
    page.get_by_role("link", name="Models").click()
    check_accessibility(page)
    page.get_by_role("link", name="toy-model").click()
    versions = page.locator("table.versions tbody tr")
    assert versions.count() == 2
    assert "active" in versions.nth(0).inner_text() and "imported" in versions.nth(0).inner_text()
    assert "rejected" in versions.nth(1).inner_text() and "v1" in versions.nth(1).inner_text()
    assert page.get_by_role("link", name="download v1").count() == 1
    progress = page.locator("progress")
    assert progress.get_attribute("value") == "3"
    check_accessibility(page)
    seed.report_progress(env.factory, env.running_job, 7, 10)
    sync_api.expect(progress).to_have_js_property("value", 7, timeout=10_000)  # polled every 2 s
    assert "step 7 of 10" in page.locator(".job-status").inner_text()


def test_another_tenant_sees_none_of_it(page: Page, env: Env) -> None:
    sign_in(page, env.globex.officer)
    rows = page.locator("table.queue tbody tr")
    assert rows.count() == 1 and env.globex.requests["open"][:8] in rows.nth(0).inner_text()
    page.get_by_label("State").select_option("all")
    page.get_by_role("button", name="Apply").click()
    page.wait_for_url("**state=all*")
    assert rows.count() == 1
    for request_id in env.acme.requests.values():
        answer = page.goto(f"/console/requests/{request_id}")
        assert answer is not None and answer.status == 404
        assert page.locator("h1").inner_text() == "Not Found"
    check_accessibility(page)
    page.goto(f"/console/requests/{env.globex.requests['open']}")  # its own, still open: no report yet
    assert "No report yet" in page.locator("main").inner_text()
    check_accessibility(page)


def test_a_broken_link_of_the_trail_is_named_and_sign_out_ends_the_session(page: Page, env: Env) -> None:
    request_id = env.acme.requests["alice"]
    with env.factory.begin() as session:
        seq = session.scalar(
            text("SELECT min(seq) FROM trail_events WHERE request_id = :id"), {"id": request_id}
        )
    edit = "UPDATE trail_events SET actor = :actor WHERE seq = :seq"
    toggle = "ALTER TABLE trail_events {} TRIGGER trail_events_append_only"
    with env.factory.begin() as session:  # an operator edits history behind the trigger's back
        actor = session.scalar(text("SELECT actor FROM trail_events WHERE seq = :seq"), {"seq": seq})
        session.execute(text(toggle.format("DISABLE")))
        session.execute(text(edit), {"actor": "nobody", "seq": seq})
        session.execute(text(toggle.format("ENABLE")))
    try:
        sign_in(page, env.acme.operator, f"/console/requests/{request_id}")
        assert (
            page.locator("#trail-check").inner_text().startswith(f"Chain BROKEN at event {seq}: its content")
        )
        assert f"BROKEN at event {seq}" in page.locator("#chain-check").inner_text()  # admin: the whole trail
        assert "broken" in page.locator("table.trail tr.broken").inner_text()
    finally:
        with env.factory.begin() as session:
            session.execute(text(toggle.format("DISABLE")))
            session.execute(text(edit), {"actor": actor, "seq": seq})
            session.execute(text(toggle.format("ENABLE")))
    page.get_by_role("button", name="Sign out").click()
    assert "You are signed out" in page.locator("main").inner_text()
    page.goto("/console/requests")
    assert page.locator("h1").inner_text() == "Sign in"
