"""The registry's web console in a real browser: headless Chromium (Debian's package,
driven by Playwright) against a real topology (registry, both security servers, backends).

As each kind of user, through the sign-in links `make demo` prints: DNIC's call to the
vaccination register is refused; DNIC's administrator finds the register in the catalogue
and requests an agreement from its page; MSP's administrator finds the request on the
home page and approves it, the registry administrator approves it too, and the call is allowed;
the registry administrator revokes it with a reason, and the call is refused again; an
auditor reads the agreement's timeline and the admin log, verified. Every page passes
axe-core with no serious or critical violation, and a screenshot of each is saved in
`var/console-screenshots/` (git-ignored) for people to look at.

The refusals (other members' items, CSRF, expiry) and the languages are tested in-process
in test_console.py; this file shows what only a browser can: cookies, the fragment
sign-in script under the Content Security Policy, forms, redirects and rendering.
"""

from __future__ import annotations

import base64
import json
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509

from gateway.evidence import verify_bundle
from gateway_demo.client import routing_metadata
from gateway_demo.demo import console_links
from gateway_demo.generated import vaccination_pb2 as vaccination
from gateway_demo.runner import Runner
from security_server.evidence import read_zip

playwright_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
axe_module = pytest.importorskip("axe_playwright_python.sync_playwright")

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (scripts/debian-packages installs it as root)",
)

DNIC = "UY/GOV/DNIC/ss1"
IDENTITY = "UY/GOV/DNIC/identity"
VACCINATION = "UY/GOV/MSP/clinics/vaccination/v1"
GET_RECORD = "/demo.vaccination.v1.VaccinationRegister/GetRecord"
SCREENSHOTS = Path(__file__).resolve().parents[2] / "var" / "console-screenshots"


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    # batches stamped every 0.2 s: the trace shows each record's time-stamp sooner
    runner = Runner(
        tmp_path_factory.mktemp("console-browser") / "run", timestamping={"interval_seconds": 0.2}
    )
    runner.prepare()
    try:
        runner.start_all()
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright_api.sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            yield chromium
        finally:
            chromium.close()


SUBJECT = "1.234.567-8"
ANSWERED: list[str] = []  # the message ids of the calls answered


def call(runner: Runner) -> str:
    """DNIC's identity subsystem reads one person's vaccination record: "ok" or the
    refusal's code."""
    body = vaccination.GetRecordRequest(national_id=SUBJECT).SerializeToString()
    metadata = routing_metadata(
        client=IDENTITY, service=VACCINATION, purpose="identity-check", subject=SUBJECT
    )
    with grpc.insecure_channel(runner.consumers[DNIC]) as channel:
        method: Any = channel.unary_unary(GET_RECORD, None, None)
        try:
            _, answered = method.with_call(body, metadata=tuple(metadata), timeout=10)
        except grpc.RpcError as exc:
            failed: Any = exc  # a grpc.Call as well
            trailing = {k: str(v) for k, v in failed.trailing_metadata() or ()}
            return trailing.get("gateway-error", str(failed.code()))
    ANSWERED.append(dict(answered.trailing_metadata())["gateway-id"])
    return "ok"


def until(runner: Runner, expected: str, seconds: float = 15.0) -> str:
    """Call until the outcome is `expected` (the registry pushes each change to the servers)."""
    deadline = time.monotonic() + seconds
    outcome = call(runner)
    while outcome != expected and time.monotonic() < deadline:
        time.sleep(0.1)
        outcome = call(runner)
    return outcome


class Session:
    """One user's browser context, signed in through a `make demo` sign-in link."""

    def __init__(self, browser: Any, link: str, name: str) -> None:
        self.context = browser.new_context(locale="en-GB")
        self.page = self.context.new_page()
        self.name = name
        self.problems: list[str] = []
        self.page.on("console", self._console_message)
        self.page.goto(link)
        # the link fills the form and says whose it is; signing in takes a press
        subject = link.split("#token=")[1].split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(subject + "=" * (-len(subject) % 4)))
        assert self.page.locator("#token-subject").inner_text() == claims["sub"]
        assert "#token" not in self.page.url
        self.page.get_by_role("button", name="Sign in").click()
        self.page.wait_for_url("**/console/")

    def _console_message(self, message: Any) -> None:
        if message.type == "error":  # a resource refused by the policy, a script error...
            self.problems.append(message.text)

    def check(self, label: str, *, axe: bool = True) -> None:
        """Screenshot, then axe-core (`axe`: a page whose template another check already
        ran it on skips it, axe being most of this test's time): no serious or critical
        violation; nothing blocked."""
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        self.page.screenshot(path=str(SCREENSHOTS / f"{self.name}-{label}.png"), full_page=True)
        assert not self.problems, (self.name, label, self.problems)  # e.g. a CSP violation
        if not axe:
            return
        results = axe_module.Axe().run(self.page)
        serious = [
            f"{v['id']} ({v['impact']}): {v['help']}"
            for v in results.response["violations"]
            if v["impact"] in ("serious", "critical")
        ]
        assert not serious, (self.name, label, serious)
        assert not self.problems, (self.name, label, self.problems)  # e.g. a CSP violation

    def close(self) -> None:
        self.context.close()


def test_approve_from_the_home_page_see_the_call_allowed_then_revoke(
    runner: Runner, browser: Any
) -> None:
    assert call(runner) == "no_agreement"
    links = {who.split(" ")[0]: link for who, link in console_links(runner).items()}

    # DNIC's administrator finds the vaccination register in the catalogue and asks for it
    dnic = Session(browser, links["DNIC"], "dnic-admin")
    dnic.page.get_by_role("link", name="Catalogue").click()
    dnic.page.get_by_label("Search").fill("vaccination")
    dnic.page.get_by_role("button", name="Filter").click()
    dnic.check("catalogue")
    dnic.page.get_by_role("link", name=VACCINATION).click()
    dnic.page.get_by_label("Purposes").fill("identity-check")
    dnic.page.get_by_label("Kind of legal basis").select_option("law")
    dnic.page.get_by_label("Legal basis (").fill("Ley 18.331, art. 9")
    dnic.check("service")
    dnic.page.get_by_role("button", name="Request").click()
    dnic.page.wait_for_url("**?done=request")
    agreement = dnic.page.url.split("/agreements/")[1].split("?")[0]
    assert "requested" in dnic.page.inner_text("main")
    dnic.check("agreement-requested", axe=False)

    msp = Session(browser, links["MSP"], "msp-admin")
    # the session is in an HttpOnly cookie
    # (a `__Host-` cookie: only this host may set it, no sibling subdomain)
    cookie = next(c for c in msp.context.cookies() if c["name"] == "__Host-gateway_console")
    assert cookie["httpOnly"] and cookie["secure"] and cookie["sameSite"] == "Strict"
    msp.check("home")
    msp.page.get_by_role("link", name=agreement).first.click()
    msp.check("agreement-to-approve")
    msp.page.get_by_label("Reason").fill("the register may be read for this")
    msp.page.get_by_role("button", name="Approve").click()
    msp.page.wait_for_url(f"**/agreements/{agreement}?done=approve")
    assert "approved by the provider" in msp.page.inner_text("main")
    msp.check("agreement-approved-by-provider", axe=False)
    assert until(runner, "no_agreement") == "no_agreement"  # the registry has not approved

    registry = Session(browser, links["registry"], "registry-admin")
    registry.page.get_by_role("link", name=agreement).first.click()
    registry.page.get_by_role("button", name="Approve").click()
    registry.page.wait_for_url(f"**/agreements/{agreement}?done=approve")
    assert "active" in registry.page.inner_text("main")
    registry.check("agreement-active", axe=False)
    assert until(runner, "ok") == "ok"

    registry.page.get_by_label("Reason").fill("the legal basis was withdrawn")
    registry.page.get_by_role("button", name="Revoke").click()
    registry.page.wait_for_url(f"**/agreements/{agreement}?done=revoke")
    main = registry.page.inner_text("main")
    assert "revoked" in main and "the legal basis was withdrawn" in main
    registry.check("agreement-revoked", axe=False)
    assert until(runner, "agreement_revoked") == "agreement_revoked"
    registry.page.get_by_role("link", name="Agreements").click()
    registry.page.get_by_label("State").select_option("revoked")
    registry.page.get_by_role("button", name="Filter").click()
    assert agreement in registry.page.inner_text("main")
    registry.check("agreements-revoked")

    auditor = Session(browser, links["auditor"], "auditor")
    auditor.check("home", axe=False)
    auditor.page.goto(f"{runner.api_url}/console/agreements/{agreement}")
    timeline = auditor.page.inner_text("#history ~ ol")
    for step in ("Request", "Approve", "Revoke"):
        assert step.lower() in timeline.lower(), timeline
    auditor.check("agreement-timeline", axe=False)
    # the last day's exchanges, charted per service from the servers' logs
    auditor.page.get_by_role("link", name="Audit").click()
    chart = auditor.page.locator("figure", has_text=VACCINATION)
    totals = re.search(r"(\d+) answered and (\d+) refused", chart.inner_text())
    assert totals is not None and int(totals.group(1)) >= 1 and int(totals.group(2)) >= 2
    assert (chart.locator("svg[role=img] title").text_content() or "").startswith(VACCINATION)
    auditor.check("audit")

    # the allowed call, traced across both servers, then the person's report
    message_id = ANSWERED[-1]
    auditor.page.get_by_label("Message id").fill(message_id)
    auditor.page.get_by_role("button", name="Filter").click()
    assert "4 records" in auditor.page.inner_text("main")  # request and response, both sides
    auditor.check("audit-search")
    auditor.page.get_by_role("link", name=message_id).first.click()
    auditor.page.wait_for_url(f"**/audit/trace/{message_id}")
    deadline = time.monotonic() + 15  # until the batch time-stamps cover every record
    while auditor.page.inner_text("main").count("time-stamped at") < 4:
        assert time.monotonic() < deadline, auditor.page.inner_text("main")
        time.sleep(0.3)
        auditor.page.reload()
    trace = auditor.page.inner_text("main")
    assert trace.count("consumer and provider logged the same signed header") == 2, trace
    assert trace.count("the record verifies") == 4 and "NOT" not in trace, trace
    auditor.check("audit-trace")
    with auditor.page.expect_download() as downloading:
        auditor.page.get_by_role("link", name=f"Download the evidence bundle from {DNIC}").click()
    bundle = downloading.value
    assert bundle.suggested_filename == f"evidence-{message_id}.zip"
    # the same verification as `gateway audit verify-bundle`, against the instance's CA
    ca = x509.load_pem_x509_certificate((runner.pki / "ca.crt").read_bytes())
    report = verify_bundle(read_zip(str(bundle.path())), trusted=[ca])
    assert report.message_id == message_id and len(report.records) == 2
    auditor.page.get_by_role("link", name="Audit").click()
    auditor.page.get_by_role("link", name="Data-subject report").click()
    auditor.page.get_by_label("Data subject").fill(SUBJECT)
    auditor.page.get_by_role("button", name="Report").click()
    report = auditor.page.inner_text("main")
    assert "answered (ok)" in report and agreement in report, report
    assert "refused: agreement_revoked" in report and "refused: no_agreement" in report, report
    auditor.check("audit-subject")

    auditor.page.get_by_role("link", name="Admin log").click()
    assert "The admin log's chain verifies" in auditor.page.inner_text("main")
    auditor.check("admin-log")

    # the languages, chosen by the switch and kept
    auditor.page.get_by_role("link", name="Español").click()
    assert auditor.page.locator("html").get_attribute("lang") == "es"
    assert "La cadena del registro verifica" in auditor.page.inner_text("main")
    auditor.check("admin-log-es", axe=False)
    auditor.page.get_by_role("link", name="Inicio").click()
    assert "Lo que espera por usted" in auditor.page.inner_text("main")

    # an error page: an agreement that does not exist
    auditor.page.goto(f"{runner.api_url}/console/agreements/AGR-1999-0000")
    assert "No existe" in auditor.page.inner_text("main")  # still in Spanish
    auditor.problems.clear()  # the browser reports the 404 of the page itself
    auditor.check("error-es")

    # signing out ends the session: the next page asks to sign in
    msp.page.get_by_role("button", name="Sign out").click()
    msp.page.wait_for_url("**/console/sign-in?signed-out=1")
    msp.check("signed-out")
    msp.page.goto(f"{runner.api_url}/console/")
    assert msp.page.url.endswith("/console/sign-in")
    for session in (dnic, msp, registry, auditor):
        session.close()
