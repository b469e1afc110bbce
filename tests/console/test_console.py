"""The console without a browser: sign-in and its cookie, CSRF, scopes, tenants, the queue's counts against
``/metrics``, the evidence figures (the browser drives the pages: test_browser.py)."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta
from xml.etree import ElementTree

import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from service.clients.service import Principal, authenticate, revoke, rotate
from service.clients.tables import ApiClient
from service.console import service, sessions
from service.console.routes import CONTENT_SECURITY_POLICY, templates
from service.core.clock import utcnow
from service.reports.keys import KeyRing
from tests.console import seed
from tests.console.conftest import OFFICER_SCOPES, Env
from tests.service.conftest import checkpoint_bytes, issue_token

CSRF = re.compile(r'name="csrf" value="([^"]+)"')
FORM_TOKEN = re.compile(r'name="form_token" value="([^"]+)"')


def signed_in(env: Env, token: str) -> TestClient:
    """A browser-like client (cookies, no Authorization header) signed in to the console with ``token``."""
    browser = TestClient(env.app, follow_redirects=False)
    form = browser.get("/console/sign-in")
    answer = browser.post(
        "/console/sign-in",
        data={"token": token, "form_token": FORM_TOKEN.findall(form.text)[0], "next": "/console/requests"},
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/console/requests", answer.text
    return browser


def test_sign_in_keeps_a_signed_httponly_cookie_not_the_token(env: Env) -> None:
    browser = TestClient(env.app, follow_redirects=False)
    first = browser.get("/console/requests")
    assert first.status_code == 303 and first.headers["location"].startswith("/console/sign-in?next=")
    form = browser.get("/console/sign-in")
    assert form.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
    assert "script-src 'self'" in CONTENT_SECURITY_POLICY and "unsafe-inline" not in CONTENT_SECURITY_POLICY
    answer = browser.post(
        "/console/sign-in",
        data={
            "token": env.acme.officer,
            "form_token": FORM_TOKEN.findall(form.text)[0],
            "next": "//evil.test/x",
        },
    )
    assert answer.status_code == 303 and answer.headers["location"] == "/console/requests"  # no open redirect
    cookie = next(
        c for c in answer.headers.get_list("set-cookie") if c.startswith(sessions.SESSION_COOKIE + "=")
    )
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie and "Path=/console" in cookie
    secret = env.acme.officer.rsplit(".", 1)[1]
    assert secret not in cookie and env.acme.officer not in cookie
    assert browser.get("/console/requests").status_code == 200


def test_a_wrong_token_a_forged_form_or_a_forged_cookie_signs_nobody_in(env: Env) -> None:
    browser = TestClient(env.app, follow_redirects=False)
    token = FORM_TOKEN.findall(browser.get("/console/sign-in").text)[0]
    wrong = browser.post("/console/sign-in", data={"token": env.acme.officer + "x", "form_token": token})
    assert wrong.status_code == 401 and "not valid" in wrong.text
    forged_form = browser.post("/console/sign-in", data={"token": env.acme.officer, "form_token": "guess"})
    assert forged_form.status_code == 403
    cross_site = browser.post(
        "/console/sign-in",
        data={"token": env.acme.officer, "form_token": token},
        headers={"Origin": "https://evil.test"},
    )
    assert cross_site.status_code == 403
    real = signed_in(env, env.acme.officer)
    client_id, expires, nonce, mac = real.cookies[sessions.SESSION_COOKIE].split(".")
    for forged in (
        f"{client_id}.{int(expires) + 3600}.{nonce}.{mac}",
        f"{client_id}.{expires}.{nonce}.{'0' * 64}",
    ):
        other = TestClient(env.app, follow_redirects=False, cookies={sessions.SESSION_COOKIE: forged})
        assert other.get("/console/requests").status_code == 303


def test_sign_out_needs_the_csrf_token_and_rotation_ends_sessions(env: Env) -> None:
    token = issue_token(env.factory, tenant="acme", scopes=("deletions:read",))
    browser = signed_in(env, token)
    page = browser.get("/console/requests")
    assert browser.post("/console/sign-out", data={"csrf": "forged"}).status_code == 403
    assert browser.get("/console/requests").status_code == 200  # still signed in
    with env.factory.begin() as session:
        name = session.query(ApiClient.name).filter(ApiClient.id == token.split(".")[1]).scalar()
        rotate(session, name)
    assert browser.get("/console/requests").status_code == 303  # the old token's sessions end with it
    browser = signed_in(env, env.acme.officer)
    page = browser.get("/console/requests")
    out = browser.post("/console/sign-out", data={"csrf": CSRF.findall(page.text)[0]})
    assert out.status_code == 303 and out.headers["location"] == "/console/sign-in?signed-out"
    assert browser.get("/console/requests").status_code == 303


def test_downloads_start_only_from_the_consoles_own_pages(env: Env) -> None:
    officer = signed_in(env, env.acme.officer)
    report = f"/console/requests/{env.acme.requests['alice']}/report.pdf"
    assert officer.get(report, headers={"Sec-Fetch-Site": "cross-site"}).status_code == 403
    answer = officer.get(report, headers={"Sec-Fetch-Site": "same-origin"})
    assert answer.status_code == 200 and answer.content.startswith(b"%PDF")
    assert answer.headers["cross-origin-resource-policy"] == "same-origin"


def test_an_officer_sees_no_models_and_gets_no_checkpoint(env: Env) -> None:
    officer = signed_in(env, env.acme.officer)
    page = officer.get(f"/console/requests/{env.acme.requests['alice']}")
    assert (
        page.status_code == 200
        and "/checkpoint" not in page.text
        and 'href="/console/models' not in page.text
    )
    assert officer.get("/console/models").status_code == 403
    refused = officer.get("/console/models/toy-model/versions/1/checkpoint")
    assert refused.status_code == 403 and "models:read" in refused.text
    operator = signed_in(env, env.acme.operator)
    download = operator.get("/console/models/toy-model/versions/1/checkpoint")
    assert download.status_code == 200 and download.content == checkpoint_bytes()


def test_another_tenant_sees_none_of_it(env: Env) -> None:
    globex = signed_in(env, env.globex.officer)
    queue = globex.get("/console/requests")
    assert env.globex.requests["open"] in queue.text
    for request_id in env.acme.requests.values():
        assert request_id not in queue.text
        assert globex.get(f"/console/requests/{request_id}").status_code == 404
        assert globex.get(f"/console/requests/{request_id}/report.json").status_code == 404
        assert globex.get(f"/console/requests/{request_id}/evidence/0/roc.svg").status_code == 404
    operator = signed_in(env, env.globex.operator)
    assert operator.get("/console/models/toy-model").status_code == 200  # its own model of that name
    assert operator.get(f"/console/jobs/{env.running_job}/progress").status_code == 404
    progress = signed_in(env, env.acme.operator).get(f"/console/jobs/{env.running_job}/progress").json()
    assert progress == {"id": env.running_job, "state": "running", "done": False, "value": 3, "max": 10,
                        "text": "running: unlearning, step 3 of 10"}  # fmt: skip


def _metrics(env: Env) -> dict[tuple[str, str], float]:
    text = TestClient(env.app).get("/metrics").text
    return {
        (sample.name, next(iter(sample.labels.values()), "")): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name
        in ("lethe_deletion_requests", "lethe_open_requests_by_days_left", "lethe_audit_verdicts")
    }


def _counts(html: str, attribute: str) -> dict[str, int]:
    return {key: int(value) for key, value in re.findall(rf'data-{attribute}="([^"]+)">(\d+)<', html)}


def test_the_queues_counts_add_up_to_metrics(env: Env) -> None:
    metrics = _metrics(env)
    pages = [
        signed_in(env, officer).get("/console/requests").text
        for officer in (env.acme.officer, env.globex.officer)
    ]
    series_of = {"state": "lethe_deletion_requests", "bucket": "lethe_open_requests_by_days_left",
                 "verdict": "lethe_audit_verdicts"}  # fmt: skip
    for attribute, series in series_of.items():
        total: dict[str, int] = {}
        for html in pages:
            for key, count in _counts(html, attribute).items():
                total[key] = total.get(key, 0) + count
        expected = {key: int(value) for (name, key), value in metrics.items() if name == series and value}
        assert {key: count for key, count in total.items() if count} == expected, attribute
    acme = _counts(pages[0], "bucket")
    assert acme["1-3"] == 1 and acme["14-30"] == 1  # the request due in two days, the one due in twenty
    assert _counts(pages[0], "state")["rejected"] == 1 and _counts(pages[0], "verdict") == {
        "residual_membership": 1
    }


def test_the_queue_orders_by_due_date_and_filters(env: Env) -> None:
    officer = signed_in(env, env.acme.officer)
    html = officer.get("/console/requests").text
    soon, later = env.acme.requests["soon"], env.acme.requests["later"]
    assert html.index(soon) < html.index(later) and "at risk" in html
    assert env.acme.requests["alice"] not in html and env.acme.requests["canceled"] not in html  # settled
    day = (utcnow() + timedelta(days=2)).date().isoformat()
    only = officer.get("/console/requests", params={"due_from": day, "due_to": day}).text
    assert soon in only and later not in only
    rejected = officer.get(
        "/console/requests", params={"state": "all", "verdict": "residual_membership"}
    ).text
    assert env.acme.requests["alice"] in rejected and env.acme.requests["canceled"] not in rejected
    assert officer.get("/console/requests", params={"due_from": "soon"}).status_code == 422


@pytest.mark.parametrize("kind", ["scores", "roc", "utility"])
def test_evidence_figures_are_the_reports_own(env: Env, kind: str) -> None:
    officer = signed_in(env, env.acme.officer)
    figure = officer.get(f"/console/requests/{env.acme.requests['alice']}/evidence/0/{kind}.svg")
    assert figure.status_code == 200 and figure.headers["content-type"] == "image/svg+xml"
    assert figure.content.startswith(b"<?xml") and b"<svg" in figure.content
    assert (
        officer.get(f"/console/requests/{env.acme.requests['alice']}/evidence/0/nope.svg").status_code == 404
    )
    assert (
        officer.get(f"/console/requests/{env.acme.requests['soon']}/evidence/0/{kind}.svg").status_code == 404
    )


def test_a_purge_record_is_shown(env: Env) -> None:
    """Issue 19's purge as ``GET /deletion-requests/{id}`` shows it on an erasure, rendered on the page."""
    officer = Principal("id", "acme-dpo", "acme", frozenset(OFFICER_SCOPES))
    with env.factory() as session:
        page = service.request_page(session, env.acme.requests["alice"], officer)
    checkpoint = {"number": 1, "sha256": "a" * 64, "size": 10, "reason": "holds erased samples"}
    reference_set = {"sha256": "b" * 64, "size": 5, "kind": "reference_set", "reason": "superseded"}
    page.request["erasures"][0]["purge"] = {
        "state": "done", "job_id": "j", "not_before": None, "purged_at": utcnow().isoformat(),
        "record": {"checkpoints": [checkpoint], "objects": [reference_set], "kept": [],
                   "dataset_rows_purged": 3, "subjects_pseudonymised": 1},
    }  # fmt: skip
    html = templates.get_template("request.html").render(
        base="/console", api_root="", principal=officer, csrf_token="t", path="/console/requests",
        can=officer.allows, page=page, now=utcnow(), verdict_words=service.verdict_words(),
    )  # fmt: skip
    assert "Purge done on" in html and "3 dataset rows purged" in html
    assert "checkpoint of v1" in html and "b" * 64 in html and "reference_set" in html


def test_request_metrics_name_the_consoles_full_paths(env: Env) -> None:
    signed_in(env, env.acme.officer).get(f"/console/requests/{env.acme.requests['alice']}")
    text = TestClient(env.app).get("/metrics").text
    assert 'route="/console/requests/{request_id}",status="200"' in text


def test_the_queue_pages(env: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(service, "QUEUE_PAGE", 1)
    officer = signed_in(env, env.acme.officer)
    first = officer.get("/console/requests", params={"model": "toy-model"}).text
    assert env.acme.requests["soon"] in first and env.acme.requests["later"] not in first
    assert "1 to 1 listed" in first and "Previous page" not in first
    second = officer.get(re.findall(r'href="([^"]+)" rel="next"', first)[0].replace("&amp;", "&")).text
    assert env.acme.requests["later"] in second and "2 to 2 listed" in second
    assert "model=toy-model" in second and "Next page" not in second and "Previous page" in second
    assert officer.get("/console/requests", params={"page": "0"}).status_code == 422


def test_figures_drawn_at_once_by_the_servers_threads_come_out_whole() -> None:
    """matplotlib's mathtext parser is shared: drawn concurrently, log-axis tick labels failed to parse."""
    from service.reports.pdf import evidence_svg

    evidence = seed.audit("residual_membership", ("s0",))
    with ThreadPoolExecutor(max_workers=6) as pool:
        drawn = list(pool.map(lambda kind: evidence_svg(evidence, kind), ["roc", "scores", "utility"] * 4))
    assert all(ElementTree.fromstring(svg).tag.endswith("svg") for svg in drawn)  # each one whole


def test_a_session_ends_at_its_expiry_and_with_its_client(env: Env) -> None:
    token = issue_token(env.factory, tenant="acme", scopes=("deletions:read",))
    secret = b"k" * 32
    with env.factory() as session:
        principal = authenticate(session, token)
        assert principal is not None
        cookie = sessions.issue(secret, session, principal, now=1000.0)
        assert sessions.read(secret, session, cookie, now=1000.0 + sessions.SESSION_SECONDS - 1) is not None
        assert sessions.read(secret, session, cookie, now=1000.0 + sessions.SESSION_SECONDS) is None
        assert sessions.read(b"x" * 32, session, cookie, now=1000.0) is None  # another server secret
    with env.factory.begin() as session:
        revoke(session, principal.name)
    with env.factory() as session:
        assert sessions.read(secret, session, cookie, now=1000.0) is None


def test_sessions_outlive_a_key_rotation(env: Env) -> None:
    """Every replica derives the session secret from the first report key, which a rotation keeps."""
    before = sessions.server_secret(env.settings.report_key_dir)
    KeyRing(env.settings.report_key_dir).generate()
    assert sessions.server_secret(env.settings.report_key_dir) == before
