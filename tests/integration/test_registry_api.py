"""The registry's admin REST API, against a real registry process on loopback.

Who may call what (every operation of the OpenAPI document, for every kind of token),
tokens that must be refused, malformed input, and a property-based run of schemathesis
over the live OpenAPI document. Only the registry is started: the API needs nothing else.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.client
import itertools
import json
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import quote, urlsplit

import jwt
import pytest
import schemathesis
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openapi_spec_validator import OpenAPIV31SpecValidator, validate
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from certs.pki import issue, load_issued
from gateway.workflow import Action
from gateway_demo.runner import Runner
from gateway_ops.auth import Role, TokenIssuer, load_or_create_token_key
from registry.api import AdminApi, openapi_document

from .conftest import CLINICS, POPULATION

MSP, DNIC, BPS = "UY/GOV/MSP", "UY/GOV/DNIC", "UY/GOV/BPS"
MSP_SS1 = "UY/GOV/MSP/ss1"
SEEDED_AGREEMENT = "AGR-2026-0001"
FOREIGN = "AR"  # another instance, federated by the outbound approval rows of the matrix
ISSUER = AUDIENCE = "gateway-registry:UY"

# The kinds of caller, in the column order of MATRIX.
ROLES = (
    "none",
    "registry",
    "consumer",
    "provider",
    "unrelated",
    "auditor-msp",
    "auditor",
    "server",
)
TOKENS: dict[str, dict[str, str]] = {
    "registry": {"role": "registry-admin"},
    "consumer": {"role": "member-admin", "member": MSP},  # consumes POPULATION
    "provider": {"role": "member-admin", "member": DNIC},  # provides POPULATION
    "unrelated": {"role": "member-admin", "member": BPS},
    "auditor-msp": {"role": "auditor", "member": MSP},
    "auditor": {"role": "auditor"},
    "server": {"role": "security-server", "server": MSP_SS1},
}


@dataclass(frozen=True, slots=True)
class Answer:
    status: int
    headers: http.client.HTTPMessage
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


class Api:
    """A blocking HTTP client of the admin API that sends each role's token."""

    def __init__(self, runner: Runner) -> None:
        self.runner = runner
        url = urlsplit(runner.api_url)
        self.host, self.port = url.hostname or "", url.port or 80
        self.tokens = {
            name: runner.token(kw["role"], member=kw.get("member"), server=kw.get("server"))
            for name, kw in TOKENS.items()
        }
        self._ids = itertools.count(1)

    def call(
        self,
        method: str,
        path: str,
        *,
        role: str = "none",
        body: Any = None,
        raw: bytes | None = None,
        token: str | None = None,
    ) -> Answer:
        headers = {"Content-Type": "application/json"}
        token = token or self.tokens.get(role)
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = raw if raw is not None else None if body is None else json.dumps(body).encode()
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request(method, path, body=data, headers=headers)
            response = conn.getresponse()
            return Answer(response.status, response.headers, response.read())
        finally:
            conn.close()

    def ok(self, method: str, path: str, body: Any = None, role: str = "registry") -> Any:
        """Call as `role` and return the JSON answer, which must be a success."""
        answer = self.call(method, path, role=role, body=body)
        assert 200 <= answer.status < 300, (method, path, answer.status, answer.body)
        return answer.json()

    def unique(self) -> int:
        return next(self._ids)

    def agreement(self, state: str = "requested") -> str:
        """A new CLINICS -> POPULATION agreement brought to `state` by its administrators."""
        agreement_id: str = self.ok("POST", "/v1/agreements", new_agreement())["id"]
        if state in ("active", "suspended"):
            self.ok("POST", f"/v1/agreements/{agreement_id}/approve", {}, role="provider")
            self.ok("POST", f"/v1/agreements/{agreement_id}/approve", {"reason": "checked"})
        if state == "suspended":
            self.ok("POST", f"/v1/agreements/{agreement_id}/suspend", {"reason": "incident"})
        assert self.ok("GET", f"/v1/agreements/{agreement_id}")["state"] == state
        return agreement_id


def new_agreement(**changes: Any) -> dict[str, Any]:
    return {
        "client": CLINICS,
        "service": POPULATION,
        "purposes": ["matrix-test"],
        "legal_basis": {"kind": "law", "reference": "Ley 18.331 art. 9"},
        **changes,
    }


def start_registry(workdir: Any) -> Iterator[Runner]:
    runner = Runner(workdir)
    runner.prepare()
    try:
        runner.start("registry")
        yield runner
    finally:
        runner.close()


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """A registry seeded with the demo topology, alone on loopback."""
    yield from start_registry(tmp_path_factory.mktemp("registry-api") / "run")


@pytest.fixture(scope="module")
def api(runner: Runner) -> Api:
    """The API client, once the unrelated member UY/GOV/BPS is registered."""
    client = Api(runner)
    client.ok("POST", "/v1/members", {"id": BPS, "name": "Banco de Previsión Social"})
    return client


def pem(runner: Runner, common_name: str = "submitted server") -> str:
    """A new authentication certificate from the instance CA, PEM (each server needs its own)."""
    cert = issue(
        common_name=common_name,
        issuer=load_issued(runner.pki, "ca"),
        now=datetime.now(UTC),
        days=30,
        kind="auth",
    ).certificate
    return cert.public_bytes(serialization.Encoding.PEM).decode("ascii")


# ---- the authorisation matrix --------------------------------------------------------------

# What each operation needs before each call: (path, body), fresh for every role so that an
# allowed call succeeds instead of tripping over the previous role's change.
Setup = Callable[[Api], tuple[str, Any]]


def _fixed(path: str, body: Any = None) -> Setup:
    return lambda api: (path, body)


def _new_member(api: Api) -> tuple[str, Any]:
    return "/v1/members", {"id": f"UY/GOV/M{api.unique()}", "name": "Test member"}


def _new_subsystem(api: Api) -> tuple[str, Any]:
    return "/v1/subsystems", {"id": f"{MSP}/sub{api.unique()}"}


def _server_body(api: Api) -> dict[str, Any]:
    server = f"{MSP}/ss-new{api.unique()}"
    return {
        "id": server,
        "address": "127.0.0.1:9",
        "auth_certificate": pem(api.runner, server),
        "subsystems": [CLINICS],
    }


def _new_server(api: Api) -> tuple[str, Any]:
    return "/v1/security-servers", _server_body(api)


def _pending_server(api: Api) -> tuple[str, Any]:
    server = api.ok("POST", "/v1/security-servers", _server_body(api))
    assert server["status"] == "pending"
    return f"/v1/security-servers/{server['id']}/approve", {"reason": "certificate checked"}


RENEWALS = f"/v1/security-servers/{MSP_SS1}/auth-certificates"


def _renewal(api: Api) -> tuple[str, Any]:
    return RENEWALS, {"auth_certificate": pem(api.runner, MSP_SS1), "reason": "renewal"}


def _pending_renewal(api: Api) -> tuple[str, Any]:
    submitted = api.ok("POST", *_renewal(api), role="consumer")
    assert submitted["state"] == "pending"
    return f"{RENEWALS}/{submitted['sha256']}/approve", {"reason": "fingerprint checked"}


def _approved_renewal(api: Api) -> tuple[str, Any]:
    submitted = api.ok("POST", *_renewal(api))
    assert submitted["state"] == "approved"
    return f"{RENEWALS}/{submitted['sha256']}/retire", {"reason": "not needed"}


def _new_service(api: Api) -> tuple[str, Any]:
    return "/v1/services", {
        "id": f"{CLINICS}/svc{api.unique()}/v1",
        "description": "A test service",
        "methods": ["/test.v1.Test/Get"],
    }


def _new_agreement(api: Api) -> tuple[str, Any]:
    return "/v1/agreements", new_agreement()


def _act(action: str, state: str) -> Setup:
    def setup(api: Api) -> tuple[str, Any]:
        return f"/v1/agreements/{api.agreement(state)}/{action}", {"reason": f"matrix {action}"}

    return setup


def _anchor(api: Api, instance: str) -> dict[str, Any]:
    """An anchor of another instance (its certificate issued by our CA, which is enough here)."""
    cert = issue(
        common_name=f"{instance} configuration signing",
        issuer=load_issued(api.runner.pki, "ca"),
        now=datetime.now(UTC),
        days=30,
        kind="config",
    ).certificate
    return {
        "instance": instance,
        "configuration_signing_certificates": [
            cert.public_bytes(serialization.Encoding.PEM).decode("ascii")
        ],
        "addresses": [f"registry.{instance.lower()}.example:7000"],
    }


def _new_federation(api: Api) -> tuple[str, Any]:
    return "/v1/federations", {"anchor": _anchor(api, f"ZZ-F{api.unique()}"), "reason": "matrix"}


def _federation_to_end(api: Api) -> tuple[str, Any]:
    path, body = _new_federation(api)
    instance = api.ok("POST", path, body)["instance"]
    return f"/v1/federations/{instance}/end", {"reason": "matrix end"}


def _new_outbound(api: Api) -> tuple[str, Any]:
    """A request for CLINICS to call a service of FOREIGN (federated once, for the module)."""
    if FOREIGN not in {f["instance"] for f in api.ok("GET", "/v1/federations")}:
        api.ok("POST", "/v1/federations", {"anchor": _anchor(api, FOREIGN), "reason": "tests"})
    return "/v1/outbound-approvals", {
        "client": CLINICS,
        "service": f"{FOREIGN}/GOB/MINSAL/clinicas/svc{api.unique()}/v1",
        "purposes": ["matrix-test"],
        "agreement": "AGR-AR-0001",
    }


def _act_outbound(action: str) -> Setup:
    def setup(api: Api) -> tuple[str, Any]:
        path, body = _new_outbound(api)
        approval_id = api.ok("POST", path, body, role="consumer")["id"]
        return f"/v1/outbound-approvals/{approval_id}/{action}", {"reason": f"matrix {action}"}

    return setup


# Expected status per role, in the order of ROLES. Every operation of the OpenAPI document
# has a row (test_the_matrix_covers_every_operation). Where a member administrator is not a
# party to an agreement, acting on it answers 404 like reading it does, so that neither
# reveals that the agreement exists; outbound approvals are scoped to the client's member
# the same way.
#                                     none reg  cons prov unrel aud-m aud  server
MATRIX: dict[tuple[str, str], tuple[tuple[int, ...], Setup]] = {
    ("GET", "/openapi.json"): ((200, 200, 200, 200, 200, 200, 200, 200), _fixed("/openapi.json")),
    ("GET", "/.well-known/jwks.json"): (
        (200, 200, 200, 200, 200, 200, 200, 200),
        _fixed("/.well-known/jwks.json"),
    ),
    ("GET", "/healthz"): ((200, 200, 200, 200, 200, 200, 200, 200), _fixed("/healthz")),
    ("GET", "/v1/members"): ((401, 200, 200, 200, 200, 200, 200, 200), _fixed("/v1/members")),
    ("POST", "/v1/members"): ((401, 201, 403, 403, 403, 403, 403, 403), _new_member),
    ("POST", "/v1/subsystems"): ((401, 201, 201, 403, 403, 403, 403, 403), _new_subsystem),
    ("GET", "/v1/security-servers"): (
        (401, 200, 200, 200, 200, 200, 200, 200),
        _fixed("/v1/security-servers"),
    ),
    ("POST", "/v1/security-servers"): ((401, 201, 201, 403, 403, 403, 403, 403), _new_server),
    ("POST", "/v1/security-servers/{id}/approve"): (
        (401, 200, 403, 403, 403, 403, 403, 403),
        _pending_server,
    ),
    ("POST", "/v1/security-servers/{id}/auth-certificates"): (
        (401, 201, 201, 403, 403, 403, 403, 201),
        _renewal,
    ),
    ("POST", "/v1/security-servers/{id}/auth-certificates/{sha256}/approve"): (
        (401, 200, 403, 403, 403, 403, 403, 403),
        _pending_renewal,
    ),
    ("POST", "/v1/security-servers/{id}/auth-certificates/{sha256}/retire"): (
        (401, 200, 200, 403, 403, 403, 403, 200),
        _approved_renewal,
    ),
    ("GET", "/v1/services"): ((401, 200, 200, 200, 200, 200, 200, 200), _fixed("/v1/services")),
    ("POST", "/v1/services"): ((401, 201, 201, 403, 403, 403, 403, 403), _new_service),
    ("GET", "/v1/agreements"): (
        (401, 200, 200, 200, 200, 200, 200, 200),
        _fixed("/v1/agreements"),
    ),
    ("POST", "/v1/agreements"): ((401, 201, 201, 403, 403, 403, 403, 403), _new_agreement),
    ("GET", "/v1/agreements/{id}"): (
        (401, 200, 200, 200, 404, 200, 200, 404),
        _fixed(f"/v1/agreements/{SEEDED_AGREEMENT}"),
    ),
    ("POST", "/v1/agreements/{id}/approve"): (
        (401, 200, 403, 200, 404, 403, 403, 403),
        _act("approve", "requested"),
    ),
    ("POST", "/v1/agreements/{id}/reject"): (
        (401, 200, 200, 200, 404, 403, 403, 403),
        _act("reject", "requested"),
    ),
    ("POST", "/v1/agreements/{id}/suspend"): (
        (401, 200, 403, 200, 404, 403, 403, 403),
        _act("suspend", "active"),
    ),
    ("POST", "/v1/agreements/{id}/resume"): (
        (401, 200, 403, 200, 404, 403, 403, 403),
        _act("resume", "suspended"),
    ),
    ("POST", "/v1/agreements/{id}/revoke"): (
        (401, 200, 200, 200, 404, 403, 403, 403),
        _act("revoke", "active"),
    ),
    ("GET", "/v1/federations"): (
        (401, 200, 200, 200, 200, 200, 200, 200),
        _fixed("/v1/federations"),
    ),
    ("POST", "/v1/federations"): ((401, 201, 403, 403, 403, 403, 403, 403), _new_federation),
    ("POST", "/v1/federations/{instance}/end"): (
        (401, 200, 403, 403, 403, 403, 403, 403),
        _federation_to_end,
    ),
    ("GET", "/v1/outbound-approvals"): (
        (401, 200, 200, 200, 200, 200, 200, 200),
        _fixed("/v1/outbound-approvals"),
    ),
    ("POST", "/v1/outbound-approvals"): ((401, 201, 201, 403, 403, 403, 403, 403), _new_outbound),
    ("POST", "/v1/outbound-approvals/{id}/approve"): (
        (401, 200, 403, 404, 404, 403, 403, 403),
        _act_outbound("approve"),
    ),
    ("POST", "/v1/outbound-approvals/{id}/revoke"): (
        (401, 200, 200, 404, 404, 403, 403, 403),
        _act_outbound("revoke"),
    ),
    ("GET", "/v1/admin-log"): ((401, 200, 200, 200, 200, 200, 200, 403), _fixed("/v1/admin-log")),
    ("GET", "/v1/admin-log/verify"): (
        (401, 200, 403, 403, 403, 403, 200, 403),
        _fixed("/v1/admin-log/verify"),
    ),
    ("GET", "/v1/checkpoints"): (
        (401, 200, 403, 403, 403, 200, 200, 403),
        _fixed("/v1/checkpoints"),
    ),
}


def _matrix_param(key: tuple[str, str]) -> Any:
    return pytest.param(key, id=f"{key[0]} {key[1]}")


@pytest.mark.parametrize("operation", [_matrix_param(k) for k in MATRIX])
def test_authorisation_matrix(api: Api, operation: tuple[str, str]) -> None:
    """Each kind of token gets exactly the status of the table; refusals carry error bodies."""
    method, _ = operation
    expected_statuses, setup = MATRIX[operation]
    expected, actual = {}, {}
    for role, status in zip(ROLES, expected_statuses, strict=True):
        path, body = setup(api)
        answer = api.call(method, path, role=role, body=body)
        expected[role], actual[role] = status, answer.status
        if answer.status >= 400:
            assert set(answer.json()) == {"error", "message"}, (role, answer.body)
        if answer.status == 401:
            assert answer.headers["WWW-Authenticate"].startswith("Bearer ")
    assert actual == expected


def test_the_matrix_covers_every_operation_of_the_openapi_document(api: Api) -> None:
    """The live OpenAPI document lists exactly the operations of the matrix."""
    document = api.ok("GET", "/openapi.json", role="none")
    operations = {
        (method.upper(), path) for path, item in document["paths"].items() for method in item
    }
    assert operations == set(MATRIX)


def test_every_route_served_is_in_the_openapi_document() -> None:
    """The API's router serves no route that the OpenAPI document leaves out."""
    none = cast(Any, None)
    app = AdminApi(none, none, none, max_body_bytes=1, clock=lambda: datetime.now(UTC)).app()
    served = {
        (route.method, route.resource.canonical)
        for route in app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    actions = [a.value for a in Action if a is not Action.EXPIRE]
    paths = openapi_document()["paths"]
    acting = {f"/v1/agreements/{{id}}/{action}" for action in actions}
    assert acting <= set(paths)
    certificates = "/v1/security-servers/{id}/auth-certificates"
    renewing = {f"{certificates}/{{sha256}}/{action}" for action in ("approve", "retire")}
    assert renewing <= set(paths)

    def served_as(path: str) -> str:
        if path in acting:
            return "/v1/agreements/{id}/{action}"
        return f"{certificates}/{{sha256}}/{{action}}" if path in renewing else path

    documented = {
        (method.upper(), served_as(path)) for path, item in paths.items() for method in item
    }
    assert served == documented


# ---- member administrators stay within their member ------------------------------------


def test_member_admin_cannot_act_for_another_member(api: Api) -> None:
    """Requests, services, subsystems and servers of another member are refused with 403."""
    refusals = [
        ("consumer", "/v1/agreements", new_agreement(client="UY/GOV/DNIC/identity"), DNIC),
        (
            "provider",
            "/v1/services",
            {"id": f"{CLINICS}/stolen/v1", "description": "not theirs"},
            MSP,
        ),
        ("consumer", "/v1/subsystems", {"id": f"{DNIC}/extra"}, DNIC),
        ("unrelated", "/v1/security-servers", _server_body(api), MSP),
        ("server", "/v1/security-servers", _server_body(api), MSP_SS1),
    ]
    for role, path, body, named in refusals:
        answer = api.call("POST", path, role=role, body=body)
        assert answer.status == 403, (role, path, answer.body)
        assert answer.json()["error"] == "forbidden"
        assert named in answer.json()["message"], answer.json()


def test_one_person_cannot_give_both_approvals(api: Api) -> None:
    """Four eyes: the provider's member administrator and a registry administrator must be
    two people. One subject holding both roles (two tokens) approves once; the second
    approval is refused 409 and the agreement stays where it was. (Found by a red-team
    review.)"""
    agreement_id: str = api.ok("POST", "/v1/agreements", new_agreement())["id"]
    as_provider = api.runner.token("member-admin", member=DNIC, subject="ana@dnic")
    as_registry = api.runner.token("registry-admin", subject="ana@dnic")
    path = f"/v1/agreements/{agreement_id}/approve"
    first = api.call("POST", path, body={}, token=as_provider)
    assert first.status == 200, first.body
    second = api.call("POST", path, body={"reason": "checked"}, token=as_registry)
    assert second.status == 409, second.body
    assert "ana@dnic approved it already" in second.json()["message"]
    state = api.ok("GET", f"/v1/agreements/{agreement_id}")["state"]
    assert state == first.json()["state"] != "active"
    api.ok("POST", path, {"reason": "checked"})  # another person: active
    assert api.ok("GET", f"/v1/agreements/{agreement_id}")["state"] == "active"


def test_an_unrelated_member_cannot_tell_that_an_agreement_exists(api: Api) -> None:
    """Reading or approving another members' agreement answers as if it did not exist."""
    agreement_id = api.agreement("requested")
    missing_id = "AGR-1999-9999"
    for method, suffix, body in (("GET", "", None), ("POST", "/approve", {})):
        existing = api.call(
            method, f"/v1/agreements/{agreement_id}{suffix}", role="unrelated", body=body
        )
        missing = api.call(
            method, f"/v1/agreements/{missing_id}{suffix}", role="unrelated", body=body
        )
        assert existing.status == missing.status == 404
        assert existing.json() == {
            "error": "not_found",
            "message": f"agreement {agreement_id} does not exist",
        }
        assert missing.json()["message"] == f"agreement {missing_id} does not exist"
    after = api.ok("GET", f"/v1/agreements/{agreement_id}")
    assert (after["state"], after["revision"]) == ("requested", 1)


def test_agreement_lists_are_scoped_to_the_callers_member(api: Api) -> None:
    """Each member lists only the agreements it is a party to; the member filter cannot widen that."""
    api.ok("POST", "/v1/members", {"id": "UY/GOV/AGESIC", "name": "AGESIC"})
    api.ok("POST", "/v1/subsystems", {"id": "UY/GOV/AGESIC/portal"})
    theirs = api.ok("POST", "/v1/agreements", new_agreement(client="UY/GOV/AGESIC/portal"))["id"]

    def listed(role: str, query: str = "") -> set[str]:
        return {a["id"] for a in api.ok("GET", f"/v1/agreements{query}", role=role)}

    everything = listed("registry")
    assert theirs in everything and len(everything) >= 2
    assert listed("auditor") == listed("provider") == everything  # DNIC provides them all
    for role in ("consumer", "auditor-msp"):
        assert listed(role) == everything - {theirs}, role
    assert listed("server") == set(), "security-server tokens read the catalogue only"
    assert listed("unrelated") == set()
    assert listed("unrelated", f"?member={quote(MSP)}") == set()
    assert listed("consumer", f"?member={quote('UY/GOV/AGESIC')}") == set()


def test_admin_log_is_scoped_to_the_callers_member(api: Api) -> None:
    """A member administrator reads only the admin log entries that concern its member."""
    entries = api.ok("GET", "/v1/admin-log?limit=1000", role="unrelated")
    assert [(e["action"], e["target"]) for e in entries] == [("add_member", BPS)]
    consumer = api.ok("GET", "/v1/admin-log?limit=1000", role="consumer")
    assert consumer and all(BPS not in e["target"] for e in consumer)


# ---- tokens that must be refused ---------------------------------------------------------


def _segment(value: dict[str, Any]) -> str:
    raw = json.dumps(value, separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _claims(now: datetime) -> dict[str, Any]:
    return {
        "iss": ISSUER,
        "aud": AUDIENCE,
        "sub": "mallory",
        "iat": int(now.timestamp()),
        "nbf": int(now.timestamp()),
        "exp": int((now + timedelta(hours=1)).timestamp()),
        "gateway_role": "registry-admin",
        "gateway_member": None,
        "gateway_server": None,
    }


def _registry_issuer(runner: Runner) -> TokenIssuer:
    key = load_or_create_token_key(runner.pki / "registry-token.key")
    return TokenIssuer(key, issuer=ISSUER, audience=AUDIENCE)


def _expired(runner: Runner) -> str:
    past = datetime.now(UTC) - timedelta(hours=2)
    return _registry_issuer(runner).issue(
        subject="late", role=Role.REGISTRY_ADMIN, now=past, ttl=timedelta(seconds=60)
    )


def _wrong_signature(runner: Runner) -> str:
    other = ec.generate_private_key(ec.SECP256R1())
    kid = _registry_issuer(runner).key_id
    return jwt.encode(_claims(datetime.now(UTC)), other, algorithm="ES256", headers={"kid": kid})


def _alg_none(runner: Runner) -> str:
    header = {"alg": "none", "typ": "JWT", "kid": _registry_issuer(runner).key_id}
    return f"{_segment(header)}.{_segment(_claims(datetime.now(UTC)))}."


def _hs256_with_public_key(runner: Runner) -> str:
    issuer = _registry_issuer(runner)
    secret = issuer.public_key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    header = {"alg": "HS256", "typ": "JWT", "kid": issuer.key_id}
    signing_input = f"{_segment(header)}.{_segment(_claims(datetime.now(UTC)))}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{base64.urlsafe_b64encode(mac).rstrip(b'=').decode()}"


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(_expired, "token expired at", id="expired"),
        pytest.param(_wrong_signature, "token signature does not verify", id="wrong-signature"),
        pytest.param(_alg_none, "algorithm 'none' is not accepted", id="alg-none"),
        pytest.param(_hs256_with_public_key, "algorithm 'HS256' is not accepted", id="hs256"),
        pytest.param(lambda r: "not.a.token", "token is malformed", id="garbage"),
    ],
)
def test_bad_tokens_are_refused_with_401(
    api: Api, make: Callable[[Runner], str], message: str
) -> None:
    """Expired, forged, unsigned and HMAC tokens: 401, a message saying why, WWW-Authenticate."""
    for method, path, body in (("GET", "/v1/members", None), ("POST", "/v1/members", {})):
        answer = api.call(method, path, token=make(api.runner), body=body)
        assert answer.status == 401, answer.body
        assert answer.json()["error"] == "unauthenticated"
        assert message in answer.json()["message"]
        assert answer.headers["WWW-Authenticate"].startswith("Bearer ")


def test_missing_or_non_bearer_credentials_are_refused_with_401(api: Api) -> None:
    """No Authorization header, or a Basic one, answers 401 asking for a bearer token."""
    conn = http.client.HTTPConnection(api.host, api.port, timeout=30)
    for headers in ({}, {"Authorization": "Basic YWRtaW46YWRtaW4="}, {"Authorization": "Bearer "}):
        conn.request("GET", "/v1/members", headers=headers)
        response = conn.getresponse()
        body = json.loads(response.read())
        assert response.status == 401, headers
        assert "send a bearer token" in body["message"]
        assert response.headers["WWW-Authenticate"].startswith("Bearer ")
    conn.close()


# ---- malformed input ---------------------------------------------------------------------


def _json(value: Any) -> bytes:
    return json.dumps(value).encode()


SERVICE = {"id": f"{CLINICS}/bad/v1", "description": "bad"}
BAD_INPUT = [
    # (id, method, path, raw body, status, what the message must name)
    ("malformed-json", "POST", "/v1/members", b'{"id": "UY/GOV/X", ', 400, "not valid JSON"),
    ("not-utf8", "POST", "/v1/members", b"\xff\xfe{}", 400, "not valid JSON"),
    ("deep-nesting", "POST", "/v1/members", b"[" * 30000 + b"]" * 30000, 400, "not valid JSON"),
    ("array", "POST", "/v1/members", b"[]", 400, "is not of type 'object'"),
    (
        "date-out-of-range",
        "POST",
        "/v1/agreements",
        _json(
            {
                "client": CLINICS,
                "service": POPULATION,
                "purposes": ["x"],
                "legal_basis": {"kind": "law", "reference": "r"},
                "valid_until": "0001-01-01T00:00:00+01:00",
            }
        ),
        400,
        "valid_until: '0001-01-01T00:00:00+01:00' is out of range",
    ),
    ("nul-in-path", "GET", "/v1/agreements/x%00y", b"", 400, "path: NUL"),
    (
        "nul-character",
        "POST",
        "/v1/members",
        _json({"id": "UY/GOV/NUL", "name": "A\u0000B"}),
        400,
        "body.name: NUL",
    ),
    (
        "lone-surrogate",
        "POST",
        "/v1/members",
        b'{"id": "UY/GOV/SUR", "name": "x\\ud800"}',
        400,
        "body.name: holds a lone UTF-16 surrogate",
    ),
    (
        "lone-surrogate-in-a-key",
        "POST",
        "/v1/members",
        b'{"id": "UY/GOV/SUR", "name": "X", "\\udfff": 1}',
        400,
        "",
    ),
    (
        "unknown-field",
        "POST",
        "/v1/members",
        _json({"id": "UY/GOV/X", "name": "X", "colour": "red"}),
        400,
        "'colour'",
    ),
    ("wrong-type", "POST", "/v1/members", _json({"id": 7, "name": "X"}), 400, "body.id"),
    ("missing-field", "POST", "/v1/members", _json({"id": "UY/GOV/X"}), 400, "'name'"),
    ("empty-id-part", "POST", "/v1/members", _json({"id": "UY//X", "name": "X"}), 400, "id:"),
    ("not-an-id", "POST", "/v1/members", _json({"id": "not an id", "name": "X"}), 400, "id:"),
    (
        "foreign-instance",
        "POST",
        "/v1/members",
        _json({"id": "AR/GOV/X", "name": "X"}),
        400,
        "AR/GOV/X",
    ),
    (
        "bad-client",
        "POST",
        "/v1/agreements",
        _json(new_agreement(client="UY//X")),
        400,
        "client:",
    ),
    (
        "bad-service",
        "POST",
        "/v1/agreements",
        _json(new_agreement(service="not an id")),
        400,
        "service:",
    ),
    (
        "purposes-not-a-list",
        "POST",
        "/v1/agreements",
        _json(new_agreement(purposes="care")),
        400,
        "body.purposes",
    ),
    (
        "no-purpose",
        "POST",
        "/v1/agreements",
        _json(new_agreement(purposes=[])),
        400,
        "body.purposes",
    ),
    (
        "purpose-with-spaces",
        "POST",
        "/v1/agreements",
        _json(new_agreement(purposes=["fraud check"])),
        400,
        "purpose 'fraud check'",
    ),
    (
        "invalid-date",
        "POST",
        "/v1/agreements",
        _json(new_agreement(valid_from="yesterday")),
        400,
        "valid_from",
    ),
    (
        "date-without-timezone",
        "POST",
        "/v1/agreements",
        _json(new_agreement(valid_from="2026-01-01T00:00:00")),
        400,
        "valid_from",
    ),
    (
        "until-before-from",
        "POST",
        "/v1/agreements",
        _json(new_agreement(valid_from="2026-02-01T00:00:00Z", valid_until="2026-01-01T00:00:00Z")),
        400,
        "valid_until",
    ),
    (
        "rate-limit-zero",
        "POST",
        "/v1/agreements",
        _json(new_agreement(rate_limit={"requests": 0, "per_seconds": 60})),
        400,
        "body.rate_limit.requests",
    ),
    (
        "rate-limit-per-zero-seconds",
        "POST",
        "/v1/agreements",
        _json(new_agreement(rate_limit={"requests": 10, "per_seconds": 0})),
        400,
        "body.rate_limit.per_seconds",
    ),
    (
        "unknown-legal-basis",
        "POST",
        "/v1/agreements",
        _json(new_agreement(legal_basis={"kind": "whim", "reference": "x"})),
        400,
        "body.legal_basis.kind",
    ),
    (
        "bad-hosted-subsystem",
        "POST",
        "/v1/security-servers",
        _json({"id": f"{MSP}/ss9", "address": "h:1", "auth_certificate": "x", "subsystems": ["x"]}),
        400,
        "subsystems[0]",
    ),
    (
        "not-a-certificate",
        "POST",
        "/v1/security-servers",
        _json({"id": f"{MSP}/ss9", "address": "h:1", "auth_certificate": "x", "subsystems": []}),
        400,
        "auth_certificate",
    ),
    (
        "bad-method",
        "POST",
        "/v1/services",
        _json({**SERVICE, "methods": ["GetPerson"]}),
        400,
        "method 'GetPerson'",
    ),
    ("transition-unknown-field", "POST", "/v1/agreements/X/approve", b'{"why": 1}', 400, "'why'"),
    ("reason-not-text", "POST", "/v1/agreements/X/revoke", b'{"reason": 5}', 400, "body.reason"),
    (
        "bad-server-id",
        "POST",
        "/v1/security-servers/nope/approve",
        b"{}",
        400,
        "security server id",
    ),
    (
        "unknown-action",
        "POST",
        f"/v1/agreements/{SEEDED_AGREEMENT}/expire",
        b"{}",
        404,
        "Not Found",
    ),
    (
        "anchor-not-a-certificate",
        "POST",
        "/v1/federations",
        _json(
            {
                "anchor": {
                    "instance": "AR",
                    "configuration_signing_certificates": ["not a PEM"],
                    "addresses": ["h:1"],
                },
                "reason": "r",
            }
        ),
        400,
        "anchor is malformed",
    ),
    (
        "anchor-unknown-field",
        "POST",
        "/v1/federations",
        _json(
            {
                "anchor": {
                    "instance": "AR",
                    "configuration_signing_certificates": ["x"],
                    "addresses": ["h:1"],
                    "colour": "red",
                },
                "reason": "r",
            }
        ),
        400,
        "'colour'",
    ),
    ("federate-without-anchor", "POST", "/v1/federations", b'{"reason": "r"}', 400, "'anchor'"),
    ("end-without-reason", "POST", "/v1/federations/AR/end", b"{}", 400, "'reason'"),
    ("end-unknown", "POST", "/v1/federations/QQ/end", b'{"reason": "r"}', 404, "QQ"),
    (
        "outbound-bad-service",
        "POST",
        "/v1/outbound-approvals",
        _json({"client": CLINICS, "service": "x", "purposes": ["p"], "agreement": "A"}),
        400,
        "service:",
    ),
    (
        "outbound-without-agreement",
        "POST",
        "/v1/outbound-approvals",
        _json({"client": CLINICS, "service": POPULATION, "purposes": ["p"]}),
        400,
        "'agreement'",
    ),
    (
        "outbound-own-instance",
        "POST",
        "/v1/outbound-approvals",
        _json({"client": CLINICS, "service": POPULATION, "purposes": ["p"], "agreement": "A"}),
        400,
        "belongs to this instance",
    ),
    ("outbound-unknown", "POST", "/v1/outbound-approvals/OUT-1/approve", b"{}", 404, "OUT-1"),
    ("limit-zero", "GET", "/v1/admin-log?limit=0", None, 400, "limit"),
    ("after-not-a-number", "GET", "/v1/admin-log?after=x", None, 400, "after"),
    ("unknown-state", "GET", "/v1/agreements?state=bogus", None, 400, "state"),
    ("bad-member-filter", "GET", "/v1/agreements?member=UY//X", None, 400, "member"),
    ("bad-service-member", "GET", "/v1/services?member=not%20an%20id", None, 400, "member"),
    (
        "oversized",
        "POST",
        "/v1/members",
        _json({"id": "UY/GOV/BIG", "name": "x" * 70000}),
        413,
        "65536 bytes",
    ),
]


@pytest.mark.parametrize(
    ("method", "path", "raw", "status", "names"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUT],
)
def test_bad_input_is_a_4xx_naming_the_problem(
    api: Api, method: str, path: str, raw: bytes | None, status: int, names: str
) -> None:
    """Malformed bodies, identifiers, dates and queries: a 4xx whose message names the field."""
    answer = api.call(method, path, role="registry", raw=raw)
    assert answer.status == status, answer.body
    error = answer.json()
    assert set(error) == {"error", "message"}
    assert names in error["message"]
    assert api.call("GET", "/healthz").status == 200


# ---- the OpenAPI document and a property-based run over it ------------------------------


def test_openapi_document_is_valid_openapi_3_1(api: Api) -> None:
    """The served document is valid OpenAPI 3.1 and is the one the code describes."""
    document = api.ok("GET", "/openapi.json", role="none")
    validate(document, cls=OpenAPIV31SpecValidator)
    assert document["openapi"] == "3.1.0"
    assert document == json.loads(json.dumps(openapi_document()))


@pytest.fixture(scope="module")
def fuzz_runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """A registry of its own, so that what the fuzzer creates cannot disturb the other tests."""
    yield from start_registry(tmp_path_factory.mktemp("registry-fuzz") / "run")


@pytest.fixture(scope="module")
def fuzz_token(fuzz_runner: Runner) -> str:
    return fuzz_runner.token("registry-admin")


@pytest.fixture(scope="module")
def fuzz_schema(fuzz_runner: Runner) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(f"{fuzz_runner.api_url}/openapi.json")


# Examples per fuzzed operation and mode. `make test` keeps the suite within its time budget
# with 12 (each example is a real HTTP request to the registry); a deeper run sets
# GATEWAY_FUZZ_EXAMPLES=500, say, before a release. The arbitrary-JSON test draws three times
# as many, over every POST operation at once.
FUZZ_EXAMPLES = int(os.environ.get("GATEWAY_FUZZ_EXAMPLES", "12"))


def _fuzzed_operations() -> list[Any]:
    """(method, path, mode) for every operation; negative only where there is input to spoil."""
    params = []
    for path, item in openapi_document()["paths"].items():
        for method, operation in item.items():
            has_input = "requestBody" in operation or "parameters" in operation
            for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
                if mode is GenerationMode.POSITIVE or has_input:
                    name = f"{method.upper()} {path} {mode.value}"
                    params.append(pytest.param(method.upper(), path, mode, id=name))
    return params


# the longest request line aiohttp reads (a longer one is refused with 400 before the API
# sees it; hypothesis once generated a query of 8,190 bytes of repeated `limit=false`)
MAX_LINE = 8190 - len("GET  HTTP/1.1")


@pytest.mark.parametrize(("method", "path", "mode"), _fuzzed_operations())
def test_no_generated_request_gets_a_server_error(
    fuzz_schema: schemathesis.BaseSchema,
    fuzz_token: str,
    method: str,
    path: str,
    mode: GenerationMode,
) -> None:
    """Schemathesis requests generated from the live document, valid or not: never a 5xx."""
    operation = fuzz_schema[path][method]
    auth = {"Authorization": f"Bearer {fuzz_token}"}

    @settings(max_examples=FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case[Any]) -> None:
        response = case.call_and_validate(headers=auth, checks=[not_a_server_error])
        if response.status_code == 400 and len(response.request.url or "") > MAX_LINE:
            return  # refused by aiohttp's HTTP parser, before the API: its own plain text
        if response.status_code >= 400:
            assert set(response.json()) == {"error", "message"}

    run()


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4)
    ),
    max_leaves=12,
)
POSTS = [path for path, item in openapi_document()["paths"].items() if "post" in item]


@settings(max_examples=3 * FUZZ_EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
@given(path=st.sampled_from(POSTS), doc=JSON, agreement=st.sampled_from(["X", SEEDED_AGREEMENT]))
def test_arbitrary_json_to_any_post_is_never_a_server_error(
    fuzz_runner: Runner, fuzz_token: str, path: str, doc: Any, agreement: str
) -> None:
    """Any JSON value sent to any POST operation is answered below 500 with an error body."""
    path = path.replace("{id}", agreement if "agreements" in path else MSP_SS1)
    url = urlsplit(fuzz_runner.api_url)
    conn = http.client.HTTPConnection(url.hostname or "", url.port or 80, timeout=30)
    headers = {"Authorization": f"Bearer {fuzz_token}", "Content-Type": "application/json"}
    conn.request("POST", path, body=json.dumps(doc).encode(), headers=headers)
    response = conn.getresponse()
    body = json.loads(response.read())
    conn.close()
    assert response.status < 500, body
    if response.status >= 400:
        assert set(body) == {"error", "message"}


def test_the_console_is_served_beside_the_api(runner: Runner) -> None:
    """`gateway registry serve` mounts the web console at /console/ on the API's address
    (its pages are tested in-process in test_console.py)."""
    host, port = runner.api_address.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=10)
    try:
        conn.request("GET", "/console/")
        answer = conn.getresponse()
        answer.read()
        assert (answer.status, answer.headers["Location"]) == (303, "/console/sign-in")
        conn.request("GET", "/console/sign-in", headers={"Accept-Language": "pt-BR"})
        answer = conn.getresponse()
        page = answer.read().decode()
    finally:
        conn.close()
    assert answer.status == 200 and '<html lang="pt">' in page and "Entrar" in page
    assert "default-src 'none'" in answer.headers["Content-Security-Policy"]
    assert "HttpOnly" in answer.headers["Set-Cookie"] and "Secure" in answer.headers["Set-Cookie"]
