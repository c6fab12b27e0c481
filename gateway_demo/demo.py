"""`gateway demo` (`make demo`): the whole product on one machine, as real processes.

Generates a development PKI, starts the registry, two security servers and two sample
backends, then shows: an allowed call, a call refused for want of an agreement, a call
refused for a purpose the agreement does not cover, a subscription requested, approved
by both sides, used, revoked and refused again through the registry's admin API with the
admin log of those steps, the log records of both sides for the allowed call, and both
logs verified by the auditor's command. With `--keep-running`, it leaves the topology up,
describes it in `WORKDIR/topology.json` and lists its processes' metrics for Prometheus in
`WORKDIR/prometheus-targets.json`.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import subprocess
import sys
import time
import tomllib
from pathlib import Path
from typing import Any

from certs.pki import slug, write_atomically
from gateway.identifiers import MemberId, ServiceId
from gateway.settings import database_url
from gateway_client.admin import AdminClient
from gateway_demo import federation
from gateway_demo.client import Outcome, call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.generated import vaccination_pb2 as vaccination
from gateway_demo.runner import DEMO_BACKENDS, Runner
from gateway_demo.scrape import TARGETS_FILE, prometheus_hint, write_scrape_targets
from security_server.audit import read_records

PROTOS = Path(__file__).resolve().parent / "protos"
MSP, DNIC = "UY/GOV/MSP/ss1", "UY/GOV/DNIC/ss1"
CLINICS, IDENTITY = "UY/GOV/MSP/clinics", "UY/GOV/DNIC/identity"
POPULATION, VACCINATION = "UY/GOV/DNIC/identity/population/v1", "UY/GOV/MSP/clinics/vaccination/v1"
GET_PERSON = "/demo.population.v1.PopulationRegistry/GetPerson"
EXPORT_PEOPLE = "/demo.population.v1.PopulationRegistry/ExportPeople"
GET_RECORD = "/demo.vaccination.v1.VaccinationRegister/GetRecord"

EXAMPLES: dict[str, tuple[str, dict[str, Any]]] = {
    GET_PERSON: ("population.proto", {"national_id": "1.234.567-8"}),
    "/demo.population.v1.PopulationRegistry/Echo": ("population.proto", {"payload": "aGVsbG8="}),
    GET_RECORD: ("vaccination.proto", {"national_id": "1.234.567-8"}),
    # streaming methods: the first request message
    EXPORT_PEOPLE: ("population.proto", {"born_since": "1950-01-01"}),
    "/demo.population.v1.PopulationRegistry/Download": (
        "population.proto",
        {"count": 3, "size": 16},
    ),
    "/demo.population.v1.PopulationRegistry/Upload": ("population.proto", {"payload": "aGVsbG8="}),
    "/demo.population.v1.PopulationRegistry/Chat": ("population.proto", {"payload": "aGVsbG8="}),
}


def _title(text: str) -> None:
    print(f"\n== {text}")


def _show(outcome: Outcome) -> None:
    if outcome.ok:
        print(f"   status OK, message id {outcome.message_id}")
    else:
        print(f"   refused: {outcome.code.name} [{outcome.error}] {outcome.details}")
        print(f"   message id {outcome.message_id}")


async def _calls(runner: Runner) -> tuple[Outcome, Outcome, Outcome, bool]:
    async with (
        runner.consumer_channel(MSP, CLINICS) as msp,
        runner.consumer_channel(DNIC, IDENTITY) as dnic,
    ):
        person_request = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
        _title("1. A clinic verifies a patient's identity at the population registry (allowed)")
        print(
            "   (the clinic's backend authenticates to its security server with a TLS client certificate)"
        )
        print(f"   {CLINICS} -> {POPULATION}  purpose=healthcare-identification")
        allowed = await call_raw(
            msp,
            GET_PERSON,
            person_request,
            routing_metadata(
                client=CLINICS,
                service=POPULATION,
                purpose="healthcare-identification",
                user_id="dr.rodriguez",
                subject="1.234.567-8",
            ),
        )
        _show(allowed)
        if allowed.ok and allowed.body is not None:
            person = population.Person.FromString(allowed.body)
            print(f"   answer: {person.given_name} {person.family_name}, born {person.birth_date}")
            print(
                f"   timings: total {allowed.trailing.get('gateway-total-us')} us, provider "
                f"{allowed.trailing.get('gateway-provider-us')} us, backend {allowed.trailing.get('gateway-backend-us')} us"
            )

        _title(
            "1b. The clinic streams the population registry's export (server streaming: every "
            "message hash-chained, each direction's end signed and logged by both servers)"
        )
        streamed = await _export(msp)

        _title("2. The population registry reads the vaccination register (no agreement)")
        print(f"   {IDENTITY} -> {VACCINATION}  purpose=identity-check")
        no_agreement = await call_raw(
            dnic,
            GET_RECORD,
            vaccination.GetRecordRequest(national_id="1.234.567-8").SerializeToString(),
            routing_metadata(client=IDENTITY, service=VACCINATION, purpose="identity-check"),
        )
        _show(no_agreement)

        _title("3. The clinic asks the population registry for marketing (purpose not covered)")
        print(f"   {CLINICS} -> {POPULATION}  purpose=marketing")
        wrong_purpose = await call_raw(
            msp,
            GET_PERSON,
            person_request,
            routing_metadata(client=CLINICS, service=POPULATION, purpose="marketing"),
        )
        _show(wrong_purpose)
    return allowed, no_agreement, wrong_purpose, streamed


async def _export(channel: Any) -> bool:
    """The people born since 1950, streamed with the population registry's own stub kind."""
    call = channel.unary_stream(
        EXPORT_PEOPLE,
        request_serializer=population.ExportRequest.SerializeToString,
        response_deserializer=population.Person.FromString,
    )(
        population.ExportRequest(born_since="1950-01-01"),
        metadata=routing_metadata(
            client=CLINICS, service=POPULATION, purpose="healthcare-identification"
        ),
        timeout=30,
    )
    try:
        people = [person async for person in call]
    except Exception as exc:  # shown, and the demo fails
        print(f"   stream failed: {exc}")
        return False
    for person in people:
        print(f"   {person.national_id:<12} {person.given_name} {person.family_name}")
    trailing = dict(await call.trailing_metadata() or ())
    print(f"   {len(people)} people, stream closed OK, message id {trailing.get('gateway-id')}")
    return len(people) == 3


async def _subscription(runner: Runner) -> bool:
    """Step 4: a subscription requested, approved, used, revoked; True when all went as expected."""
    url = runner.api_url
    dnic_admin = AdminClient(
        url, runner.token("member-admin", member="UY/GOV/DNIC", subject="lucia.silva@dnic")
    )
    msp_admin = AdminClient(
        url, runner.token("member-admin", member="UY/GOV/MSP", subject="martin.garcia@msp")
    )
    registry_admin = AdminClient(url, runner.token("registry-admin", subject="ana.perez@agesic"))
    record = vaccination.GetRecordRequest(national_id="1.234.567-8").SerializeToString()
    metadata = routing_metadata(client=IDENTITY, service=VACCINATION, purpose="identity-check")
    ok = True

    def expect(condition: bool) -> None:
        nonlocal ok
        ok = ok and condition

    async with runner.consumer_channel(DNIC, IDENTITY) as dnic:

        async def call() -> Outcome:
            return await call_raw(dnic, GET_RECORD, record, metadata)

        async def until(predicate: Any) -> Outcome:
            # the registry pushes the new configuration; a few round trips at most
            for _ in range(100):
                outcome = await call()
                if predicate(outcome):
                    break
            return outcome

        print(f"   {IDENTITY} -> {VACCINATION}  purpose=identity-check")
        before = await call()
        _show(before)
        expect(before.error == "no_agreement")
        print(
            f"   admin API: {url}/openapi.json  (the same steps with `gateway admin agreements ...`)"
        )
        created = dnic_admin.request_agreement(
            client=IDENTITY,
            service=VACCINATION,
            purposes=["identity-check"],
            legal_basis_kind="law",
            legal_basis_reference="Ley 18.331, art. 9 lit. C (demo)",
            reason="check vaccination status when issuing identity documents",
        )
        agreement = str(created["id"])
        print(f"   DNIC's administrator requests {agreement}: state {created['state']}")
        state = msp_admin.act(agreement, "approve", reason="the register may be read for this")
        print(f"   MSP's administrator (provider) approves: state {state['state']}")
        state = registry_admin.act(agreement, "approve", reason="legal basis checked")
        print(f"   the registry administrator approves: state {state['state']}")
        expect(state["state"] == "active")
        allowed = await until(lambda o: o.ok)
        _show(allowed)
        expect(allowed.ok)
        state = msp_admin.act(agreement, "revoke", reason="end of the pilot")
        print(f"   MSP's administrator revokes {agreement}: state {state['state']}")
        refused = await until(lambda o: o.error == "agreement_revoked")
        _show(refused)
        expect(refused.error == "agreement_revoked")

    print(f"   admin log of {agreement}:")
    for e in registry_admin.admin_log(limit=1000):
        if e["target"] == agreement:
            print(
                f"     #{e['seq']:<3} {e['logged_at']}  {e['actor']:<20} {e['action']:<8} "
                f'{e["from_state"] or "-"} -> {e["to_state"]}  "{e["reason"]}"'
            )
    verdict = registry_admin.verify_admin_log()
    print(f"   admin log verified: {verdict['verified']} ({verdict['entries']} entries)")
    expect(bool(verdict["verified"]))
    return ok


async def _print_records(runner: Runner, message_id: str) -> None:
    for server in (MSP, DNIC):
        url = database_url(str(runner.log_db(server)), base=Path.cwd())
        print(f"   {server} ({runner.log_db(server)})")
        for r in await read_records(url, message_id):
            f = {k: v for k, v in r.fields.items() if not isinstance(v, bytes)}
            print(
                f"     #{r.seq:<3} {f['kind']:<8} {f['role']:<8} {f['logged_at']}  status={f['status']}  "
                f"purpose={f['purpose']}  user={f['user_id']}  hash={r.hash.hex()[:16]}…"
            )


def _wait_for_stamps(runner: Runner, timeout: float = 10.0) -> None:
    """Wait (bounded) until each log's newest record is covered by a batch time-stamp."""
    deadline = time.monotonic() + timeout
    for server in (MSP, DNIC):
        while time.monotonic() < deadline:
            stamped, total = runner.stamped(server)
            if stamped >= total:
                break
            time.sleep(0.2)


def _verify(runner: Runner) -> bool:
    _wait_for_stamps(runner)
    ok = True
    token = runner.token("auditor")
    anchor = runner.pki / "anchor.json"
    for server in (MSP, DNIC):
        # against the instance anchor and the checkpoints the registry received so far
        result = _gateway(
            "audit", "verify", "--quiet", "--db", str(runner.log_db(server)),
            "--anchor", str(anchor), "--check-stamps",
            "--checkpoints", runner.api_url, "--server", server, "--token", token,
        )  # fmt: skip
        print(
            f"   $ gateway audit verify --db {runner.log_db(server)} --anchor {anchor} "
            f"--check-stamps --checkpoints {runner.api_url} --server {server} --token …"
        )
        for line in (result.stdout.strip() or result.stderr.strip()).splitlines():
            print(f"     {line}")
        ok = ok and result.returncode == 0
    return ok


def _gateway(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "gateway_cli.main", *args],
        capture_output=True,
        text=True,
        check=False,
    )


def _evidence(runner: Runner, message_id: str) -> bool:
    bundle = runner.workdir / f"evidence-{message_id}.zip"
    deadline = time.monotonic() + 15
    while True:  # the records' batch is stamped within a second or two
        export = _gateway(
            "audit", "export", "--db", str(runner.log_db(MSP)), "--message-id", message_id,
            "--out", str(bundle),
        )  # fmt: skip
        if export.returncode == 0 or time.monotonic() > deadline:
            break
        time.sleep(0.3)
    print(f"   $ gateway audit export --db {runner.log_db(MSP)} --message-id {message_id} \\")
    print(f"       --out {bundle}")
    print(f"     {(export.stdout or export.stderr).strip()}")
    if export.returncode != 0:
        return False
    check = _gateway("audit", "verify-bundle", str(bundle), "--ca", str(runner.pki / "ca.crt"))
    print(f"   $ gateway audit verify-bundle {bundle.name} --ca {runner.pki / 'ca.crt'}")
    for line in check.stdout.strip().splitlines():
        print(f"     {line}")
    print("   the OpenSSL commands that check each piece by hand are in the bundle's VERIFY.md")
    return check.returncode == 0


def _audit(runner: Runner, message_id: str) -> bool:
    """`gateway audit trace` and `gateway audit subject` over both servers' auditor APIs."""
    import os

    env = {**os.environ, "GATEWAY_TOKEN": runner.token("auditor", subject="carla.mendez@auditoria")}
    urls = [arg for server in (MSP, DNIC) for arg in ("--url", runner.auditor_url(server))]
    ok = True
    for args in (("trace", message_id, *urls), ("subject", "1.234.567-8", *urls)):
        result = subprocess.run(
            [sys.executable, "-m", "gateway_cli.main", "audit", *args],
            capture_output=True,
            text=True,
            check=False,
            env=env,
        )
        shown = " ".join(a for a in args if not a.startswith("http"))
        print(
            f"   $ GATEWAY_TOKEN=<auditor token> gateway audit {shown.replace('--url', '--url …')}"
        )
        for line in (result.stdout.strip() or result.stderr.strip()).splitlines():
            print(f"     {line}")
        ok = ok and result.returncode == 0
    print("   (each of these queries is itself in the servers' logs, as an audit-query record)")
    return ok


def console_links(runner: Runner) -> dict[str, str]:
    """A sign-in link to the registry's web console for each kind of user of the demo: the
    token travels in the fragment, which the browser never sends (see registry.console)."""
    base = f"{runner.api_url}/console/sign-in#token="
    return {
        "registry administrator (ana.perez@agesic)": base
        + runner.token("registry-admin", subject="ana.perez@agesic"),
        "MSP administrator (martin.garcia@msp)": base
        + runner.token("member-admin", member="UY/GOV/MSP", subject="martin.garcia@msp"),
        "DNIC administrator (lucia.silva@dnic)": base
        + runner.token("member-admin", member="UY/GOV/DNIC", subject="lucia.silva@dnic"),
        "auditor (carla.mendez@auditoria)": base
        + runner.token("auditor", subject="carla.mendez@auditoria"),
    }


def _console(runner: Runner) -> bool:
    """Step 13: the clinics ask for statistics from the population registry; DNIC's
    administrator signs in to the console (as a browser would, over HTTP) and finds the
    request waiting on the home page. True when it does."""
    msp_admin = AdminClient(
        runner.api_url,
        runner.token("member-admin", member="UY/GOV/MSP", subject="martin.garcia@msp"),
    )
    created = msp_admin.request_agreement(
        client=CLINICS,
        service=POPULATION,
        purposes=["statistics"],
        legal_basis_kind="law",
        legal_basis_reference="Ley 18.331, art. 9 (demo)",
        reason="monthly vaccination coverage by department",
    )
    agreement = str(created["id"])
    print(f"   MSP's administrator requests {agreement} (statistics): it waits for DNIC")
    home = _console_home(
        runner, runner.token("member-admin", member="UY/GOV/DNIC", subject="lucia.silva@dnic")
    )
    waiting = agreement in home.split('id="awaiting"', 1)[-1].split("</section>", 1)[0]
    print(
        f"   DNIC's administrator signs in to the console: {agreement} "
        + ("waits for their approval on the home page" if waiting else "is NOT on the home page")
    )
    print(f"   console: {runner.api_url}/console/  (sign-in links, each valid for an hour:)")
    for who, link in console_links(runner).items():
        print(f"     {who}:\n       {link}")
    return waiting


def _console_home(runner: Runner, token: str) -> str:
    """The console's home page, signed in with `token` as a browser would."""
    import http.client
    import re
    from http.cookies import SimpleCookie
    from urllib.parse import urlencode

    host, port = runner.api_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    cookies: dict[str, str] = {}

    def request(method: str, path: str, form: dict[str, str] | None = None) -> str:
        headers = {
            "Accept-Language": "es",
            "Cookie": "; ".join(f"{k}={v}" for k, v in cookies.items()),
        }
        body = None
        if form is not None:
            body = urlencode(form)
            headers["Content-Type"] = "application/x-www-form-urlencoded"
        conn.request(method, path, body=body, headers=headers)
        answer = conn.getresponse()
        for header in answer.headers.get_all("Set-Cookie") or []:
            jar: SimpleCookie = SimpleCookie()
            jar.load(header)
            cookies.update({name: morsel.value for name, morsel in jar.items()})
        return answer.read().decode()

    try:
        form = request("GET", "/console/sign-in")
        nonce = re.search(r'name="nonce" value="([^"]+)"', form)
        request(
            "POST", "/console/sign-in", {"nonce": nonce.group(1) if nonce else "", "token": token}
        )
        return request("GET", "/console/")
    finally:
        conn.close()


def describe(runner: Runner) -> dict[str, Any]:
    """The content of `topology.json`: what a local client needs to call the demo."""
    topology = tomllib.loads((runner.workdir / "topology.toml").read_text())
    services = []
    for s in topology["services"]:
        methods = []
        streams = s.get("streams", {})
        for m in s["methods"]:
            _, example = EXAMPLES[m]
            methods.append(
                {"method": m, "kind": streams.get(m, "unary"), "example_request": example}
            )
        proto_file = EXAMPLES[s["methods"][0]][0]
        provider = next(
            x["id"]
            for x in topology["servers"]
            if str(ServiceId.parse(s["id"]).subsystem) in x["subsystems"]
        )
        services.append(
            {
                "id": s["id"],
                "description": s["description"],
                "proto": str(PROTOS / proto_file),
                "provider_server": provider,
                "backend": runner.backends[DEMO_BACKENDS[s["id"]]],
                "methods": methods,
            }
        )
    return {
        "console": {"url": f"{runner.api_url}/console/", "sign_in": console_links(runner)},
        "instance": MemberId.parse(topology["members"][0]["id"]).instance,
        "registry": runner.registry_address,
        "registry_api": runner.api_url,
        "consumer_endpoints": [
            {
                "server": s["id"],
                "address": runner.consumers[s["id"]],
                "clients": s["subsystems"],
                "tls": _tls_paths(runner, s["id"], s["subsystems"]),
                "metadata": ["gateway-client", "gateway-service", "gateway-purpose"],
            }
            for s in topology["servers"]
        ],
        "services": services,
        "agreements": [
            {
                "id": a["id"],
                "client": a["client"],
                "service": a["service"],
                "purposes": a["purposes"],
                "valid_from": str(a["valid_from"]),
                "valid_until": str(a.get("valid_until")) if a.get("valid_until") else None,
            }
            for a in topology.get("agreements", [])
        ],
        "message_logs": {s["id"]: str(runner.log_db(s["id"])) for s in topology["servers"]},
        "auditor_apis": {s["id"]: runner.auditor_url(s["id"]) for s in topology["servers"]},
        # /metrics, /healthz and /readyz of every process, by process name
        "ops": runner.ops_urls(),
    }


def _tls_paths(runner: Runner, server_id: str, clients: list[str]) -> dict[str, Any] | None:
    folder = runner.local_tls(server_id)
    if folder is None:
        return None
    return {
        "ca": str(folder / "ca.crt"),
        "clients": {
            c: {
                "certificate": str(folder / "clients" / f"{slug(c)}.crt"),
                "key": str(folder / "clients" / f"{slug(c)}.key"),
            }
            for c in clients
        },
    }


def run_demo(*, workdir: Path, keep_running: bool) -> int:
    if workdir.exists():
        shutil.rmtree(workdir)
    # the Ministry of Health's backends authenticate to their security server with TLS
    # client certificates; the other agency's endpoint is plain gRPC on loopback
    # bodies are kept in the logs so that the evidence bundle of step 7 includes them
    # the servers' local policy allows exchanges with Argentina (steps 9 to 12)
    # the CA's OCSP responder and TSA run as two processes, each with its operations port
    runner = Runner(
        workdir,
        consumer_tls=frozenset({MSP}),
        store_bodies=True,
        federation_allowed=("AR",),
        separate_trust_services=True,
        separate_backends=True,
    )
    ar: Runner | None = None
    print(f"Interoperability gateway demo (workdir {runner.workdir})")
    _title("Generating a development PKI and starting the registry, 2 security servers, 2 backends")
    runner.prepare()
    try:
        runner.start_all()
        for name, proc in runner.processes.items():
            print(f"   {name:<20} pid {proc.ready.get('pid')}  {_addresses(proc.ready)}")
        allowed, no_agreement, wrong_purpose, streamed = asyncio.run(_calls(runner))
        _title(
            "4. The population registry subscribes to the vaccination register, live: "
            "refused, requested, approved by both sides, allowed, revoked, refused"
        )
        subscribed = asyncio.run(_subscription(runner))
        _title(
            "5. The message logs of both security servers for the allowed call (same message id)"
        )
        if allowed.message_id:
            asyncio.run(_print_records(runner, allowed.message_id))
        _title("6. Auditors verify both logs: hash chains and RFC 3161 batch time-stamps")
        verified = _verify(runner)
        _title(
            "7. The evidence of the allowed call, exported and verified offline "
            "(signatures, OCSP answers, Merkle proofs, time-stamp tokens)"
        )
        proven = allowed.message_id is not None and _evidence(runner, allowed.message_id)
        _title(
            "8. An auditor traces the allowed call across both servers' auditor APIs, and "
            "reports every access to the patient's data"
        )
        traced = allowed.message_id is not None and _audit(runner, allowed.message_id)
        _title(
            "9. A second country: Argentina's instance starts (its own registry, CA, OCSP "
            "responder, TSA and security server), and the registries federate by importing "
            "each other's anchor"
        )
        ar = federation.start_ar(runner.workdir / "ar")
        federated = federation.federate(runner, ar)
        _title(
            "10. The Uruguayan clinics call the Argentine population registry: refused, "
            "Argentina (the provider's country) holds no agreement for them"
        )
        cross_refused = federation.refused_without_agreement(runner)
        _title(
            "11. Argentina records the cross-border agreement (requested, approved by RENAPER "
            "and by its registry): the same call is allowed"
        )
        cross = federation.agree_and_call(runner, ar)
        _title("12. Each country's auditor traces the cross-border call over both countries' logs")
        cross_traced = cross.message_id is not None and federation.trace_both_countries(
            runner, ar, cross.message_id
        )
        _title("13. The registry's web console: what waits for each administrator")
        console = _console(runner)
        expected = (
            console
            and allowed.ok
            and streamed
            and no_agreement.error == "no_agreement"
            and wrong_purpose.error == "purpose_not_covered"
            and subscribed
            and verified
            and proven
            and traced
            and federated
            and cross_refused.error == "no_agreement"
            and cross.ok
            and cross_traced
        )
        if keep_running:
            path = runner.workdir / "topology.json"
            # owner-only, its sign-in links holding tokens (a registry administrator's among
            # them), and whole when it appears
            write_atomically(path, json.dumps(describe(runner), indent=2).encode(), 0o600)
            # both instances' processes, for Prometheus (deploy/prometheus/prometheus.yml)
            targets = runner.workdir / TARGETS_FILE
            write_scrape_targets(targets, [r for r in (runner, ar) if r is not None])
            _title(f"The topology keeps running; it is described in {path}. Press Ctrl-C to stop.")
            print(f"   {prometheus_hint(targets)}")
            # Ctrl-C (and SIGTERM) stop it even when the demo was started with SIGINT ignored,
            # as a shell does for a command it runs in the background
            for number in (signal.SIGINT, signal.SIGTERM):
                signal.signal(number, signal.default_int_handler)
            try:
                while all(
                    p.popen is not None and p.popen.poll() is None
                    for p in runner.processes.values()
                ):
                    time.sleep(1.0)
                print("   a process stopped by itself; see the logs in", runner.workdir / "logs")
            except KeyboardInterrupt:
                pass
        _title("Stopping every process")
    finally:
        if ar is not None:
            ar.close()
        runner.close()
    print(
        "\ndemo "
        + ("succeeded" if expected else "FAILED: an outcome differed from the expected one")
    )
    return 0 if expected else 1


def _addresses(ready: dict[str, Any]) -> str:
    shown = [
        f"{k}={v}" for k, v in ready.items() if k in ("listen", "provider", "consumer", "auditor")
    ]
    if "ops" in ready:  # the operations port: Prometheus scrapes /metrics there
        shown.append(f"metrics={ready['ops']}/metrics")
    return "  ".join(shown)
