"""The registry's admin REST API (aiohttp), and its OpenAPI document at `/openapi.json`.

Every `/v1` route needs a bearer token (see `gateway_ops.auth`); what the token's role may
do is decided in `registry.governance`, so this module only translates HTTP into
operations and back. Request bodies are checked against the JSON schemas published in
the OpenAPI document (unknown fields are refused) before any identifier is parsed, and
every failure is answered as `{"error": kind, "message": text}` with a 4xx status:
400 malformed, 401 no valid token, 403 not allowed, 404 unknown, 409 wrong state, 413
too large. A 500 means a bug; it is logged with its traceback.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import structlog
from aiohttp import web
from jsonschema import Draft202012Validator

from gateway.agreements import AgreementState, LegalBasis, LegalBasisKind, RateLimit
from gateway.errors import GatewayError
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.workflow import Action
from gateway_ops.auth import AuthError, Principal, Role, TokenIssuer, TokenVerifier
from gateway_ops.readiness import failure_reason
from registry.checkpoints import CheckpointBook
from registry.governance import (
    AdminError,
    AgreementRequest,
    Forbidden,
    Governance,
    InvalidRequest,
    OutboundRequest,
    ServiceEntry,
)
from registry.metrics import RegistryMetrics

log = structlog.get_logger("registry.api")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRINCIPAL = web.RequestKey("principal", Principal)

# ---- request and response schemas (published in the OpenAPI document) --------------------

_TEXT = {"type": "string", "minLength": 1, "maxLength": 500}
_LONG_TEXT = {"type": "string", "maxLength": 20000}
_REASON = {
    "type": "string",
    "maxLength": 2000,
    "description": "why; required to reject, suspend or revoke",
}
_ID = {"type": "string", "minLength": 1, "maxLength": 400}
_TIME = {"type": "string", "format": "date-time", "maxLength": 40}
_NAMES = {
    "type": "array",
    "items": {"type": "string", "minLength": 1, "maxLength": 64},
    "maxItems": 100,
}

SCHEMAS: dict[str, dict[str, Any]] = {
    "Error": {
        "type": "object",
        "properties": {"error": {"type": "string"}, "message": {"type": "string"}},
        "required": ["error", "message"],
    },
    "NewMember": {
        "type": "object",
        "properties": {"id": {**_ID, "description": "INSTANCE/CLASS/CODE"}, "name": _TEXT},
        "required": ["id", "name"],
        "additionalProperties": False,
    },
    "NewSubsystem": {
        "type": "object",
        "properties": {"id": {**_ID, "description": "INSTANCE/CLASS/CODE/SUBSYSTEM"}},
        "required": ["id"],
        "additionalProperties": False,
    },
    "NewSecurityServer": {
        "type": "object",
        "properties": {
            "id": {**_ID, "description": "INSTANCE/CLASS/CODE/SERVERCODE"},
            "address": {"type": "string", "minLength": 3, "maxLength": 300},
            "auth_certificate": {
                "type": "string",
                "maxLength": 20000,
                "description": "the server's TLS authentication certificate, PEM",
            },
            "subsystems": {"type": "array", "items": _ID, "maxItems": 100},
        },
        "required": ["id", "address", "auth_certificate", "subsystems"],
        "additionalProperties": False,
    },
    "NewAuthCertificate": {
        "type": "object",
        "properties": {
            "auth_certificate": {
                "type": "string",
                "maxLength": 20000,
                "description": "the server's next TLS authentication certificate, PEM",
            },
            "reason": _REASON,
        },
        "required": ["auth_certificate"],
        "additionalProperties": False,
    },
    "NewService": {
        "type": "object",
        "properties": {
            "id": {**_ID, "description": "INSTANCE/CLASS/CODE/SUBSYSTEM/SERVICE[/VERSION]"},
            "description": _TEXT,
            "methods": {
                "type": "array",
                "items": {"type": "string", "maxLength": 300},
                "maxItems": 500,
                "description": "full gRPC method paths; empty means any method",
            },
            "streams": {
                "type": "object",
                "maxProperties": 500,
                "propertyNames": {"maxLength": 300},
                "additionalProperties": {"enum": ["server", "client", "bidi"]},
                "description": "the streaming methods among `methods`, with their kind",
            },
            "interface": {**_LONG_TEXT, "description": "the .proto source of the interface"},
            "data_categories": _NAMES,
            "legal_basis": {"type": "string", "maxLength": 2000},
            "contact": {"type": "string", "maxLength": 500},
        },
        "required": ["id", "description"],
        "additionalProperties": False,
    },
    "LegalBasis": {
        "type": "object",
        "properties": {
            "kind": {"enum": [k.value for k in LegalBasisKind]},
            "reference": _TEXT,
        },
        "required": ["kind", "reference"],
        "additionalProperties": False,
    },
    "RateLimit": {
        "type": "object",
        "properties": {
            "requests": {"type": "integer", "minimum": 1, "maximum": 1_000_000_000},
            "per_seconds": {"type": "integer", "minimum": 1, "maximum": 31_536_000},
        },
        "required": ["requests", "per_seconds"],
        "additionalProperties": False,
    },
    "NewAgreement": {
        "type": "object",
        "properties": {
            "client": {**_ID, "description": "the consumer subsystem"},
            "service": _ID,
            "purposes": {**_NAMES, "minItems": 1},
            "legal_basis": {"$ref": "#/components/schemas/LegalBasis"},
            "data_categories": _NAMES,
            "valid_from": _TIME,
            "valid_until": _TIME,
            "rate_limit": {"$ref": "#/components/schemas/RateLimit"},
            "reason": _REASON,
        },
        "required": ["client", "service", "purposes", "legal_basis"],
        "additionalProperties": False,
    },
    "Transition": {
        "type": "object",
        "properties": {"reason": _REASON},
        "additionalProperties": False,
    },
    "Anchor": {
        "type": "object",
        "description": "an instance anchor, as `gateway registry anchor` prints it",
        "properties": {
            "instance": {"type": "string", "minLength": 2, "maxLength": 20},
            "configuration_signing_certificates": {
                "type": "array",
                "items": {"type": "string", "maxLength": 20000},
                "minItems": 1,
                "maxItems": 10,
                "description": "the configuration-signing certificates, PEM",
            },
            "addresses": {
                "type": "array",
                "items": {"type": "string", "minLength": 3, "maxLength": 300},
                "minItems": 1,
                "maxItems": 20,
                "description": "host:port of the instance's configuration service",
            },
        },
        "required": ["instance", "configuration_signing_certificates", "addresses"],
        "additionalProperties": False,
    },
    "NewFederation": {
        "type": "object",
        "properties": {
            "anchor": {"$ref": "#/components/schemas/Anchor"},
            "reason": {**_REASON, "minLength": 1, "description": "why (required)"},
        },
        "required": ["anchor", "reason"],
        "additionalProperties": False,
    },
    "EndFederation": {
        "type": "object",
        "properties": {"reason": {**_REASON, "minLength": 1, "description": "why (required)"}},
        "required": ["reason"],
        "additionalProperties": False,
    },
    "Federation": {
        "type": "object",
        "properties": {
            "instance": {"type": "string"},
            "state": {"enum": ["active", "ended"]},
            "since": {"type": "string"},
            "ended_at": {"type": ["string", "null"]},
            "reason": {"type": "string"},
            "addresses": {"type": "array", "items": {"type": "string"}},
            "signing_certificates_sha256": {"type": "array", "items": {"type": "string"}},
            "anchor": {"$ref": "#/components/schemas/Anchor"},
            "revision": {"type": "integer"},
        },
    },
    "NewOutboundApproval": {
        "type": "object",
        "properties": {
            "client": {**_ID, "description": "the consumer subsystem, of this instance"},
            "service": {**_ID, "description": "the service, of a federated instance"},
            "purposes": {**_NAMES, "minItems": 1},
            "agreement": {
                "type": "string",
                "minLength": 1,
                "maxLength": 200,
                "description": "the provider-side agreement's id at the provider's registry",
            },
            "reason": _REASON,
        },
        "required": ["client", "service", "purposes", "agreement"],
        "additionalProperties": False,
    },
    "OutboundApproval": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "client": {"type": "string"},
            "service": {"type": "string"},
            "purposes": {"type": "array", "items": {"type": "string"}},
            "agreement": {"type": "string"},
            "state": {"enum": ["requested", "approved", "revoked"]},
            "approved_at": {"type": ["string", "null"]},
            "revision": {"type": "integer"},
        },
    },
    "Agreement": {
        "type": "object",
        "properties": {
            "id": {"type": "string"},
            "client": {"type": "string"},
            "service": {"type": "string"},
            "purposes": {"type": "array", "items": {"type": "string"}},
            "state": {"enum": [s.value for s in AgreementState]},
            "legal_basis": {"$ref": "#/components/schemas/LegalBasis"},
            "data_categories": {"type": "array", "items": {"type": "string"}},
            "valid_from": {"type": "string"},
            "valid_until": {"type": ["string", "null"]},
            "rate_limit": {"oneOf": [{"$ref": "#/components/schemas/RateLimit"}, {"type": "null"}]},
            "revision": {"type": "integer"},
        },
    },
}


def _validator(name: str) -> Draft202012Validator:
    schema = {**SCHEMAS[name], "components": {"schemas": SCHEMAS}}
    return Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)


_VALIDATORS = {name: _validator(name) for name in SCHEMAS if name.startswith("New")} | {
    name: _validator(name) for name in ("Transition", "EndFederation")
}


async def _body(request: web.Request, schema: str) -> dict[str, Any]:
    """The request's JSON body, checked against `schema`, or a 400 saying what is wrong."""
    raw = await request.read()
    try:
        doc = json.loads(raw) if raw else {}
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise InvalidRequest(f"the body is not valid JSON: {exc}") from None
    errors = sorted(_VALIDATORS[schema].iter_errors(doc), key=lambda e: list(e.absolute_path))
    if not errors:
        refuse_unstorable(doc, "body")
    if errors:
        first = errors[0]
        where = "body" + "".join(
            f"[{p}]" if isinstance(p, int) else f".{p}" for p in first.absolute_path
        )
        raise InvalidRequest(f"{where}: {first.message}")
    assert isinstance(doc, dict)
    return doc


def refuse_unstorable(value: Any, where: str) -> None:
    """Refuse text that no database stores alike: NUL characters (PostgreSQL refuses them)
    and lone UTF-16 surrogates (JSON's `\\ud800` escapes, which are not UTF-8: SQLite's
    driver raises on them). Keys and values, at any depth."""
    if isinstance(value, str):
        if "\x00" in value:
            raise InvalidRequest(f"{where}: NUL characters are not allowed")
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidRequest(
                f"{where}: holds a lone UTF-16 surrogate, which is not a character"
            ) from None
    elif isinstance(value, dict):
        for k, v in value.items():
            refuse_unstorable(k, f"{where} (a key)")
            refuse_unstorable(v, f"{where}.{k}")
    elif isinstance(value, list):
        for i, v in enumerate(value):
            refuse_unstorable(v, f"{where}[{i}]")


def _parse(kind: Any, text: str, what: str) -> Any:
    try:
        return kind.parse(text)
    except GatewayError as exc:
        raise InvalidRequest(f"{what}: {exc.message}") from None


def _time(value: str | None, what: str) -> datetime | None:
    if value is None:
        return None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise InvalidRequest(f"{what}: {value!r} is not an RFC 3339 date-time") from None
    if parsed.tzinfo is None:
        raise InvalidRequest(f"{what}: give a time zone, for example {value}Z")
    try:
        return parsed.astimezone(UTC)
    except OverflowError:
        raise InvalidRequest(f"{what}: {value!r} is out of range") from None


def _query_int(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    text = request.query.get(name)
    if text is None:
        return default
    try:
        value = int(text)
    except ValueError:
        raise InvalidRequest(f"query parameter {name} must be an integer") from None
    if not low <= value <= high:
        raise InvalidRequest(f"query parameter {name} must be between {low} and {high}")
    return value


def _json(data: Any, status: int = 200) -> web.Response:
    return web.json_response(data, status=status, dumps=lambda d: json.dumps(d, indent=1))


def _error(status: int, kind: str, message: str) -> web.Response:
    response = _json({"error": kind, "message": message}, status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-registry"'
    return response


class AdminApi:
    def __init__(
        self,
        governance: Governance,
        verifier: TokenVerifier,
        issuer: TokenIssuer,
        *,
        max_body_bytes: int,
        clock: Callable[[], datetime],
        checkpoints: CheckpointBook | None = None,
        metrics: RegistryMetrics | None = None,
    ) -> None:
        self.checkpoints = checkpoints
        self.metrics = metrics
        self.gov = governance
        self.verifier = verifier
        self.issuer = issuer
        self.max_body_bytes = max_body_bytes
        self.clock = clock

    # ---- middleware --------------------------------------------------------------------

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except AdminError as exc:
            principal = request.get(PRINCIPAL)
            log.info(
                "admin_request_refused",
                method=request.method,
                path=request.path,
                status=exc.status,
                subject=principal.subject if principal else None,
                reason=exc.message,
            )
            return _error(exc.status, exc.kind, exc.message)
        except AuthError as exc:
            log.info("admin_request_unauthenticated", path=request.path, reason=exc.message)
            return _error(401, "unauthenticated", exc.message)
        except web.HTTPRequestEntityTooLarge:
            return _error(413, "too_large", f"the body is larger than {self.max_body_bytes} bytes")
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            return _error(exc.status, exc.reason.lower().replace(" ", "_"), exc.reason)
        except Exception as exc:
            if not await self._database_answers():  # a restart, a failover: retry later
                log.error(
                    "admin_request_failed",
                    method=request.method,
                    path=request.path,
                    error=failure_reason(exc),
                    database="unavailable",
                )
                return _error(
                    503,
                    "database_unavailable",
                    "the registry's database does not answer, so the request was not carried "
                    "out; try again later",
                )
            log.exception("admin_request_failed", method=request.method, path=request.path)
            return _error(500, "internal_error", "the registry failed; see its log")

    async def _database_answers(self) -> bool:
        try:
            await asyncio.wait_for(self.gov.store.ping(), timeout=2.0)
        except Exception:  # whatever the request met
            return False
        return True

    @web.middleware
    async def _authenticate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        refuse_unstorable(request.path, "path")
        for name, value in request.query.items():
            refuse_unstorable(value, f"query parameter {name}")
        if request.path.startswith("/v1/"):
            header = request.headers.get("Authorization", "")
            scheme, _, token = header.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthError("send a bearer token: Authorization: Bearer <token>")
            request[PRINCIPAL] = await self.verifier.verify(token.strip(), now=self.clock())
        return await handler(request)

    # ---- handlers ----------------------------------------------------------------------

    async def openapi(self, request: web.Request) -> web.Response:
        return _json(openapi_document())

    async def jwks(self, request: web.Request) -> web.Response:
        return _json(self.issuer.jwks())

    async def health(self, request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def list_members(self, request: web.Request) -> web.Response:
        return _json(await self.gov.list_members(request[PRINCIPAL]))

    async def add_member(self, request: web.Request) -> web.Response:
        doc = await _body(request, "NewMember")
        member = _parse(MemberId, doc["id"], "id")
        return _json(await self.gov.add_member(request[PRINCIPAL], member, doc["name"]), 201)

    async def add_subsystem(self, request: web.Request) -> web.Response:
        doc = await _body(request, "NewSubsystem")
        subsystem = _parse(SubsystemId, doc["id"], "id")
        return _json(await self.gov.add_subsystem(request[PRINCIPAL], subsystem), 201)

    async def list_servers(self, request: web.Request) -> web.Response:
        return _json(await self.gov.list_servers(request[PRINCIPAL]))

    async def submit_server(self, request: web.Request) -> web.Response:
        doc = await _body(request, "NewSecurityServer")
        result = await self.gov.submit_server(
            request[PRINCIPAL],
            server=_parse(SecurityServerId, doc["id"], "id"),
            address=doc["address"],
            auth_certificate_pem=doc["auth_certificate"],
            subsystems_hosted=tuple(
                _parse(SubsystemId, s, f"subsystems[{i}]") for i, s in enumerate(doc["subsystems"])
            ),
        )
        return _json(result, 201)

    async def approve_server(self, request: web.Request) -> web.Response:
        doc = await _body(request, "Transition")
        server = _parse(SecurityServerId, request.match_info["id"], "security server id")
        return _json(
            await self.gov.approve_server(request[PRINCIPAL], server, doc.get("reason", ""))
        )

    async def submit_auth_certificate(self, request: web.Request) -> web.Response:
        doc = await _body(request, "NewAuthCertificate")
        server = _parse(SecurityServerId, request.match_info["id"], "security server id")
        result = await self.gov.submit_auth_certificate(
            request[PRINCIPAL], server, doc["auth_certificate"], doc.get("reason", "")
        )
        return _json(result, 201)

    async def act_on_auth_certificate(self, request: web.Request) -> web.Response:
        doc = await _body(request, "Transition")
        server = _parse(SecurityServerId, request.match_info["id"], "security server id")
        act = (
            self.gov.approve_auth_certificate
            if request.match_info["action"] == "approve"
            else self.gov.retire_auth_certificate
        )
        return _json(
            await act(
                request[PRINCIPAL], server, request.match_info["sha256"], doc.get("reason", "")
            )
        )

    async def search_services(self, request: web.Request) -> web.Response:
        member = request.query.get("member")
        return _json(
            await self.gov.search_services(
                request[PRINCIPAL],
                text=request.query.get("q"),
                member=None if member is None else _parse(MemberId, member, "member"),
                category=request.query.get("category"),
            )
        )

    async def add_service(self, request: web.Request) -> web.Response:
        doc = await _body(request, "NewService")
        entry = ServiceEntry(
            id=_parse(ServiceId, doc["id"], "id"),
            description=doc["description"],
            methods=tuple(doc.get("methods", ())),
            streams=dict(doc.get("streams", {})),
            interface=doc.get("interface", ""),
            data_categories=tuple(doc.get("data_categories", ())),
            legal_basis=doc.get("legal_basis", ""),
            contact=doc.get("contact", ""),
        )
        return _json(await self.gov.add_service(request[PRINCIPAL], entry), 201)

    async def list_agreements(self, request: web.Request) -> web.Response:
        state_text = request.query.get("state")
        try:
            state = None if state_text is None else AgreementState(state_text)
        except ValueError:
            raise InvalidRequest(
                f"query parameter state must be one of {', '.join(s.value for s in AgreementState)}"
            ) from None
        member = request.query.get("member")
        return _json(
            await self.gov.list_agreements(
                request[PRINCIPAL],
                state=state,
                member=None if member is None else _parse(MemberId, member, "member"),
            )
        )

    async def request_agreement(self, request: web.Request) -> web.Response:
        doc = await _body(request, "NewAgreement")
        limit = doc.get("rate_limit")
        req = AgreementRequest(
            client=_parse(SubsystemId, doc["client"], "client"),
            service=_parse(ServiceId, doc["service"], "service"),
            purposes=tuple(doc["purposes"]),
            legal_basis=LegalBasis(
                kind=LegalBasisKind(doc["legal_basis"]["kind"]),
                reference=doc["legal_basis"]["reference"],
            ),
            data_categories=tuple(doc.get("data_categories", ())),
            valid_from=_time(doc.get("valid_from"), "valid_from"),
            valid_until=_time(doc.get("valid_until"), "valid_until"),
            rate_limit=None
            if limit is None
            else RateLimit(requests=limit["requests"], per_seconds=limit["per_seconds"]),
            reason=doc.get("reason", ""),
        )
        return _json(await self.gov.request_agreement(request[PRINCIPAL], req), 201)

    async def get_agreement(self, request: web.Request) -> web.Response:
        return _json(await self.gov.get_agreement(request[PRINCIPAL], request.match_info["id"]))

    async def act_on_agreement(self, request: web.Request) -> web.Response:
        doc = await _body(request, "Transition")
        try:
            action = Action(request.match_info["action"])
        except ValueError:
            raise web.HTTPNotFound() from None
        return _json(
            await self.gov.act(
                request[PRINCIPAL], request.match_info["id"], action, doc.get("reason", "")
            )
        )

    async def list_federations(self, request: web.Request) -> web.Response:
        return _json(await self.gov.list_federations(request[PRINCIPAL]))

    async def federate(self, request: web.Request) -> web.Response:
        doc = await _body(request, "NewFederation")
        return _json(await self.gov.federate(request[PRINCIPAL], doc["anchor"], doc["reason"]), 201)

    async def end_federation(self, request: web.Request) -> web.Response:
        doc = await _body(request, "EndFederation")
        return _json(
            await self.gov.end_federation(
                request[PRINCIPAL], request.match_info["instance"], doc["reason"]
            )
        )

    async def list_outbound(self, request: web.Request) -> web.Response:
        return _json(await self.gov.list_outbound(request[PRINCIPAL]))

    async def request_outbound(self, request: web.Request) -> web.Response:
        doc = await _body(request, "NewOutboundApproval")
        req = OutboundRequest(
            client=_parse(SubsystemId, doc["client"], "client"),
            service=_parse(ServiceId, doc["service"], "service"),
            purposes=tuple(doc["purposes"]),
            agreement=doc["agreement"],
            reason=doc.get("reason", ""),
        )
        return _json(await self.gov.request_outbound(request[PRINCIPAL], req), 201)

    async def approve_outbound(self, request: web.Request) -> web.Response:
        doc = await _body(request, "Transition")
        return _json(
            await self.gov.approve_outbound(
                request[PRINCIPAL], request.match_info["id"], doc.get("reason", "")
            )
        )

    async def revoke_outbound(self, request: web.Request) -> web.Response:
        doc = await _body(request, "Transition")
        return _json(
            await self.gov.revoke_outbound(
                request[PRINCIPAL], request.match_info["id"], doc.get("reason", "")
            )
        )

    async def admin_log(self, request: web.Request) -> web.Response:
        after = _query_int(request, "after", 0, 0, 2**62)
        limit = _query_int(request, "limit", 100, 1, 1000)
        return _json(await self.gov.admin_log(request[PRINCIPAL], after=after, limit=limit))

    async def verify_admin_log(self, request: web.Request) -> web.Response:
        return _json(await self.gov.verify_admin_log(request[PRINCIPAL]))

    async def list_checkpoints(self, request: web.Request) -> web.Response:
        """Security servers' checkpoints: auditors (member-scoped ones see their members'
        servers only) and registry administrators."""
        actor: Principal = request[PRINCIPAL]
        if actor.role not in (Role.AUDITOR, Role.REGISTRY_ADMIN):
            raise Forbidden("checkpoints are read by auditors and registry administrators")
        if self.checkpoints is None:
            raise Forbidden("this registry keeps no checkpoints")
        server = request.query.get("server")
        if server is not None:
            _parse(SecurityServerId, server, "server")
        after = _query_int(request, "after", 0, 0, 2**62)
        limit = _query_int(request, "limit", 500, 1, 1000)
        member = actor.member if actor.role is Role.AUDITOR else None
        return _json(
            await self.checkpoints.list(member=member, server=server, after=after, limit=limit)
        )

    def app(self) -> web.Application:
        # counted outermost, so that each request's final status is the one counted
        counting = [self.metrics.middleware] if self.metrics is not None else []
        app = web.Application(
            client_max_size=self.max_body_bytes,
            middlewares=[*counting, self._errors, self._authenticate],
        )
        actions = "|".join(a.value for a in Action if a is not Action.EXPIRE)
        r = app.router
        r.add_get("/openapi.json", self.openapi)
        r.add_get("/.well-known/jwks.json", self.jwks)
        r.add_get("/healthz", self.health)
        r.add_get("/v1/members", self.list_members)
        r.add_post("/v1/members", self.add_member)
        r.add_post("/v1/subsystems", self.add_subsystem)
        r.add_get("/v1/security-servers", self.list_servers)
        r.add_post("/v1/security-servers", self.submit_server)
        # the certificate routes first: an id never ends in /auth-certificates/...
        certificate = "/v1/security-servers/{id:.+}/auth-certificates"
        r.add_post(certificate, self.submit_auth_certificate)
        r.add_post(
            certificate + "/{sha256:[0-9a-f]{64}}/{action:approve|retire}",
            self.act_on_auth_certificate,
        )
        r.add_post("/v1/security-servers/{id:.+}/approve", self.approve_server)
        r.add_get("/v1/services", self.search_services)
        r.add_post("/v1/services", self.add_service)
        r.add_get("/v1/agreements", self.list_agreements)
        r.add_post("/v1/agreements", self.request_agreement)
        r.add_get("/v1/agreements/{id}", self.get_agreement)
        r.add_post("/v1/agreements/{id}/{action:" + actions + "}", self.act_on_agreement)
        r.add_get("/v1/federations", self.list_federations)
        r.add_post("/v1/federations", self.federate)
        r.add_post("/v1/federations/{instance}/end", self.end_federation)
        r.add_get("/v1/outbound-approvals", self.list_outbound)
        r.add_post("/v1/outbound-approvals", self.request_outbound)
        r.add_post("/v1/outbound-approvals/{id}/approve", self.approve_outbound)
        r.add_post("/v1/outbound-approvals/{id}/revoke", self.revoke_outbound)
        r.add_get("/v1/admin-log", self.admin_log)
        r.add_get("/v1/admin-log/verify", self.verify_admin_log)
        r.add_get("/v1/checkpoints", self.list_checkpoints)
        return app


# ---- the OpenAPI document ----------------------------------------------------------------


def _op(
    summary: str,
    *,
    body: str | None = None,
    ok: int = 200,
    params: list[dict[str, Any]] | None = None,
    auth: bool = True,
) -> dict[str, Any]:
    error = {"content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    responses: dict[str, Any] = {
        str(ok): {"description": "done"},
        "400": {"description": "malformed", **error},
    }
    if auth:
        responses |= {
            "401": {"description": "no valid bearer token", **error},
            "403": {"description": "not allowed to this token", **error},
        }
    if body:
        responses |= {
            "404": {"description": "unknown", **error},
            "409": {"description": "not possible in the current state", **error},
            "413": {"description": "body too large", **error},
        }
    op: dict[str, Any] = {"summary": summary, "responses": responses}
    if not auth:
        op["security"] = []
    if body:
        op["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{body}"}}},
        }
    if params:
        op["parameters"] = params
    return op


def _q(name: str, schema: dict[str, Any], description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "query",
        "required": False,
        "schema": schema,
        "description": description,
    }


def _p(name: str, description: str) -> dict[str, Any]:
    return {
        "name": name,
        "in": "path",
        "required": True,
        "schema": {"type": "string"},
        "description": description,
    }


def openapi_document() -> dict[str, Any]:
    """The OpenAPI 3.1 description of this API."""
    paths: dict[str, Any] = {
        "/openapi.json": {"get": _op("this document", auth=False)},
        "/.well-known/jwks.json": {
            "get": _op("the public keys of the registry's tokens", auth=False)
        },
        "/healthz": {"get": _op("liveness", auth=False)},
        "/v1/members": {
            "get": _op("list members and their subsystems"),
            "post": _op("register a member (registry administrator)", body="NewMember", ok=201),
        },
        "/v1/subsystems": {
            "post": _op("add a subsystem to a member", body="NewSubsystem", ok=201),
        },
        "/v1/security-servers": {
            "get": _op("list security servers, pending and approved"),
            "post": _op(
                "submit a security server and its authentication certificate",
                body="NewSecurityServer",
                ok=201,
            ),
        },
        "/v1/security-servers/{id}/approve": {
            "post": {
                **_op(
                    "approve a pending security server (registry administrator)", body="Transition"
                ),
                "parameters": [_p("id", "the server id")],
            }
        },
        "/v1/security-servers/{id}/auth-certificates": {
            "post": {
                **_op(
                    "register a server's next authentication certificate (renewal): pending "
                    "until a registry administrator approves it, then published beside the "
                    "current one",
                    body="NewAuthCertificate",
                    ok=201,
                ),
                "parameters": [_p("id", "the server id")],
            }
        },
        "/v1/security-servers/{id}/auth-certificates/{sha256}/approve": {
            "post": {
                **_op(
                    "approve a pending authentication certificate (registry administrator)",
                    body="Transition",
                ),
                "parameters": [
                    _p("id", "the server id"),
                    _p("sha256", "the certificate's SHA-256"),
                ],
            }
        },
        "/v1/security-servers/{id}/auth-certificates/{sha256}/retire": {
            "post": {
                **_op(
                    "take an authentication certificate out of the configuration (the first "
                    "one only once an approved next one replaces it)",
                    body="Transition",
                ),
                "parameters": [
                    _p("id", "the server id"),
                    _p("sha256", "the certificate's SHA-256"),
                ],
            }
        },
        "/v1/services": {
            "get": _op(
                "search the service catalogue",
                params=[
                    _q("q", {"type": "string"}, "text in the id, description or legal basis"),
                    _q("member", {"type": "string"}, "the providing member"),
                    _q("category", {"type": "string"}, "a data category"),
                ],
            ),
            "post": _op("describe a service in the catalogue", body="NewService", ok=201),
        },
        "/v1/agreements": {
            "get": _op(
                "list the agreements this token may see",
                params=[
                    _q("state", {"enum": [s.value for s in AgreementState]}, "only this state"),
                    _q("member", {"type": "string"}, "only where this member is a party"),
                ],
            ),
            "post": _op("request an agreement (consumer)", body="NewAgreement", ok=201),
        },
        "/v1/agreements/{id}": {
            "get": {
                **_op("one agreement (404 also when outside the token's scope)"),
                "parameters": [_p("id", "the agreement id")],
            }
        },
        "/v1/federations": {
            "get": _op("list the instances this one federates with, active and ended"),
            "post": _op(
                "federate with another instance by importing its anchor (registry "
                "administrator); published at once",
                body="NewFederation",
                ok=201,
            ),
        },
        "/v1/federations/{instance}/end": {
            "post": {
                **_op(
                    "end the federation with an instance (registry administrator); "
                    "published at once",
                    body="EndFederation",
                ),
                "parameters": [_p("instance", "the other instance's code, e.g. AR")],
            }
        },
        "/v1/outbound-approvals": {
            "get": _op("list the outbound approvals this token may see"),
            "post": _op(
                "request the approval of a subsystem's exchanges with a federated "
                "instance's service (the client member's administrator)",
                body="NewOutboundApproval",
                ok=201,
            ),
        },
        "/v1/outbound-approvals/{id}/approve": {
            "post": {
                **_op(
                    "approve an outbound approval (registry administrator); published at once",
                    body="Transition",
                ),
                "parameters": [_p("id", "the outbound approval id")],
            }
        },
        "/v1/outbound-approvals/{id}/revoke": {
            "post": {
                **_op("revoke an outbound approval (reason required)", body="Transition"),
                "parameters": [_p("id", "the outbound approval id")],
            }
        },
        "/v1/admin-log": {
            "get": _op(
                "the admin log entries this token may see, in order",
                params=[
                    _q("after", {"type": "integer", "minimum": 0}, "entries after this seq"),
                    _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most"),
                ],
            )
        },
        "/v1/admin-log/verify": {"get": _op("verify the admin log's hash chain")},
        "/v1/checkpoints": {
            "get": _op(
                "the signed checkpoints of security servers' message log heads, in the order "
                "received (auditors; member-scoped ones see their members' servers only)",
                params=[
                    _q("server", {"type": "string"}, "only this security server's"),
                    _q("after", {"type": "integer", "minimum": 0}, "after this checkpoint id"),
                    _q("limit", {"type": "integer", "minimum": 1, "maximum": 1000}, "at most"),
                ],
            )
        },
    }
    for action in (a for a in Action if a is not Action.EXPIRE):
        paths[f"/v1/agreements/{{id}}/{action.value}"] = {
            "post": {
                **_op(f"{action.value} an agreement", body="Transition"),
                "parameters": [_p("id", "the agreement id")],
            }
        }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Interoperability gateway registry: admin API",
            "version": "1",
            "description": "Catalogue, security server approval, data-sharing agreements, "
            "federation with other instances, outbound approvals and the admin log of one "
            "instance. See the README for roles.",
        },
        "paths": paths,
        "components": {
            "schemas": SCHEMAS,
            "securitySchemes": {
                "bearer": {"type": "http", "scheme": "bearer", "bearerFormat": "JWT"}
            },
        },
        "security": [{"bearer": []}],
    }
