"""The auditor API of a security server (aiohttp): search this server's message log.

    GET /audit/v1/records?message_id=&client=&service=&purpose=&status=&kind=&role=
                          &since=&until=&subject=&limit=&after=
    GET /audit/v1/evidence/{message_id}    the exchange's evidence bundle (a zip), as
                                           `gateway audit export` writes it

Bearer tokens (JWT) with the `auditor` role only, verified against the registry's keys
(its JWKS URL) or an OpenID Connect provider's: an auditor scoped to a member sees only
records whose client or service belongs to that member; an instance-wide auditor (a
registry-issued token without a member) sees every record. Any other role gets 403.

`subject` takes the data subject's identifier; the server derives its keyed pseudonym and
searches for that, so the identifier is never stored. Every query of a verified token,
allowed or refused, is itself appended to the message log (kind `audit-query`, role
`auditor`: who, when, which filters, the subject's pseudonym, the outcome) before any
result is returned; when that record cannot be written the query is refused (503).

Requests without a valid token, and requests over a rate limit (per client address, checked
first and before any token is read; per token holder), are never logged one by one: they are
counted per (address, reason) and written as one `refusal-aggregate` record per interval
(see `security_server.floods`), holding no text the sender chose. Over a rate limit the
answer is 429 with Retry-After. Errors are `{error, message}` with 400, 401, 403, 429 or 503.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any
from urllib.parse import urlencode

import structlog
from aiohttp import web
from multidict import MultiDict

from gateway.audit import RecordKind, Role
from gateway.errors import AuditError, GatewayError
from gateway.records import record
from gateway_ops import http_sites
from gateway_ops.auth import AuthError, Principal, TokenVerifier
from gateway_ops.auth import Role as TokenRole
from security_server.evidence import NotStampedYet, export_records, zip_bytes
from security_server.floods import RefusalCounter, TokenBuckets, retry_after
from security_server.message_log import MessageLog
from security_server.search import (
    KINDS,
    CursorError,
    Query,
    Searcher,
    SearchTooLongError,
    decode_cursor,
)

log = structlog.get_logger("security_server.auditor_api")

PATH = "/audit/v1/records"
EVIDENCE_PATH = "/audit/v1/evidence/{message_id}"
_TEXT_PARAMS = ("message_id", "client", "service", "purpose", "status", "subject")
_PARAMS = frozenset((*_TEXT_PARAMS, "kind", "role", "since", "until", "limit", "after"))
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_MAX_TEXT = 256
_ROLES = tuple(r.value for r in Role)
# longest message returned to an unauthenticated caller (it may quote their token's claims)
_MAX_MESSAGE = 300


class QueryError(ValueError):
    """A bad query parameter: the message names it (400). `logged` is the message as the
    audit log and the server's log keep it: without the caller's values, which may be a
    data subject's identifier typed into the wrong field (the answer still quotes them)."""

    def __init__(self, message: str, *, logged: str | None = None) -> None:
        super().__init__(message)
        self.logged = message if logged is None else logged


def _error(status: int, kind: str, message: str) -> web.Response:
    response = web.json_response({"error": kind, "message": message}, status=status)
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="gateway-auditor"'
    return response


def _time(name: str, value: str) -> datetime:
    try:
        moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        raise QueryError(
            f"{name} must be an ISO 8601 time with a zone, such as 2026-11-23T10:00:00Z; "
            f"got {value!r}",
            logged=f"{name} is not an ISO 8601 time with a zone",
        ) from None
    if moment.tzinfo is None:
        raise QueryError(
            f"{name} must carry a time zone (end it with Z for UTC): {value!r}",
            logged=f"{name} carries no time zone",
        )
    try:
        return moment.astimezone(UTC)
    except OverflowError:
        raise QueryError(
            f"{name} is out of range: {value!r}", logged=f"{name} is out of range"
        ) from None


def parse_query(
    params: Any,
    principal: Principal,
    pseudonym: Callable[[str | None], str | None],
    max_page: int,
) -> tuple[Query, dict[str, str]]:
    """The search a request asks for, and its filters as logged (the subject left out)."""
    unknown = sorted(set(params) - _PARAMS)
    if unknown:
        raise QueryError(
            f"unknown query parameter(s): {', '.join(unknown)}; known: {', '.join(sorted(_PARAMS))}",
            logged=f"{len(unknown)} unknown query parameter(s)",
        )
    values: dict[str, str] = {}
    for name in params:
        got = params.getall(name)
        if len(got) != 1:
            raise QueryError(f"query parameter {name} is given {len(got)} times; give it once")
        value = got[0]
        if not value:
            raise QueryError(f"query parameter {name} is empty")
        if len(value) > _MAX_TEXT or _CONTROL.search(value):
            raise QueryError(
                f"query parameter {name} must be at most {_MAX_TEXT} printable characters"
            )
        values[name] = value
    kind = values.get("kind")
    if kind is not None and kind not in KINDS:
        raise QueryError(
            f"kind must be one of {', '.join(KINDS)}, not {kind!r}",
            logged=f"kind must be one of {', '.join(KINDS)}",
        )
    role = values.get("role")
    if role is not None and role not in _ROLES:
        raise QueryError(
            f"role must be one of {', '.join(_ROLES)}, not {role!r}",
            logged=f"role must be one of {', '.join(_ROLES)}",
        )
    limit = 50
    if "limit" in values:
        if not re.fullmatch(r"[0-9]{1,6}", values["limit"]):
            raise QueryError(
                f"limit must be a whole number, not {values['limit']!r}",
                logged="limit must be a whole number",
            )
        limit = int(values["limit"])
        if not 1 <= limit <= max_page:
            raise QueryError(f"limit must be between 1 and {max_page}, not {limit}")
    since = _time("since", values["since"]) if "since" in values else None
    until = _time("until", values["until"]) if "until" in values else None
    if since is not None and until is not None and until <= since:
        raise QueryError("until must be later than since")
    try:
        after = decode_cursor(values["after"]) if "after" in values else None
    except CursorError as exc:
        raise QueryError(str(exc)) from None
    subject = values.get("subject")
    query = Query(
        message_id=values.get("message_id"),
        client=values.get("client"),
        service=values.get("service"),
        purpose=values.get("purpose"),
        status=values.get("status"),
        kind=kind,
        role=role,
        since=since,
        until=until,
        subject_ref=pseudonym(subject) if subject is not None else None,
        member=None if principal.member is None else str(principal.member),
        after=after,
        limit=limit,
    )
    logged = {k: v for k, v in sorted(values.items()) if k != "subject"}
    return query, logged


class AuditorApi:
    def __init__(
        self,
        log: MessageLog,
        pseudonym: Callable[[str | None], str | None],
        searcher: Searcher,
        verifier: TokenVerifier,
        *,
        max_page: int = 500,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
        source_limit: TokenBuckets | None = None,
        token_limit: TokenBuckets | None = None,
        refusals: RefusalCounter | None = None,
    ) -> None:
        self.log = log
        self.pseudonym = pseudonym
        self.searcher = searcher
        self.verifier = verifier
        self.max_page = max_page
        self.clock = clock
        self.source_limit = (
            TokenBuckets(50.0, 200, clock=time.monotonic) if source_limit is None else source_limit
        )
        self.token_limit = (
            TokenBuckets(20.0, 100, clock=time.monotonic) if token_limit is None else token_limit
        )
        # unauthenticated and rate-limited requests, written by an `AggregateFlusher`
        self.refusals = RefusalCounter() if refusals is None else refusals

    def app(self) -> web.Application:
        app = web.Application(client_max_size=16 * 1024)
        app.router.add_get(PATH, self.records)
        app.router.add_get(EVIDENCE_PATH, self.evidence)
        return app

    async def _log_query(
        self,
        request: web.Request,
        principal: Principal | None,
        logged: dict[str, str],
        subject_ref: str | None,
        status: str,
        error: tuple[str, str] | None = None,
        method: str = f"GET {PATH}",
    ) -> None:
        """Append the query's own record; raises `GatewayError` when it cannot be written."""
        await self.log.append_audit(
            record(
                kind=RecordKind.AUDIT_QUERY,
                role=Role.AUDITOR,
                logged_at=self.clock(),
                message_id=uuid.uuid4().hex,
                client=(
                    None
                    if principal is None
                    else (str(principal.member) if principal.member else "instance")
                ),
                method=method,
                purpose=urlencode(logged) or None,
                user_id=None if principal is None else f"{principal.subject} ({principal.issuer})",
                subject_ref=subject_ref,
                peer=request.remote,
                status=status,
                error_code=None if error is None else error[0],
                error_message=None if error is None else error[1],
            )
        )

    async def _refuse(
        self,
        request: web.Request,
        principal: Principal | None,
        status: int,
        kind: str,
        message: str,
        logged: dict[str, str] | None = None,
        *,
        logged_message: str | None = None,
        method: str = f"GET {PATH}",
    ) -> web.Response:
        """Answer `message`; both logs keep `logged_message` (by default the same). The
        refusal is answered even when its record cannot be written."""
        kept = message if logged_message is None else logged_message
        log.info(
            "audit_query_refused",
            status=status,
            error=kind,
            reason=kept,
            subject=principal.subject if principal else None,
            peer=request.remote,
        )
        try:
            await self._log_query(
                request, principal, logged or {}, None, "refused", (kind, kept), method=method
            )
        except GatewayError as err:
            log.error("audit_query_not_logged", error=err.message)
        return _error(status, kind, message)

    def _count(
        self,
        source: str,
        status: int,
        kind: str,
        message: str,
        *,
        reason: str,
        who: str | None = None,
        detail: str | None = None,
        wait: float = 0.0,
    ) -> web.Response:
        """Refuse without a record of its own: counted into the interval's aggregate (its
        error_code is `reason`)."""
        self.refusals.add(source, reason, self.clock(), who=who, detail=detail)
        response = _error(status, kind, message[:_MAX_MESSAGE])
        if status == 429:
            response.headers["Retry-After"] = retry_after(wait)
        return response

    def _over_rate(
        self, limit: TokenBuckets, key: str, source: str, *, by: str, who: str | None = None
    ) -> web.Response | None:
        """429, counted, when `key` has no token left in `limit`; None when it had one.
        `by` says whose rate it is: "source" (this address) or "token" (its holder)."""
        wait = limit.take(key)
        if not wait:
            return None
        whose = "from this address" if by == "source" else "with this token"
        return self._count(
            source,
            429,
            "rate_limited",
            f"too many requests {whose}; retry after the time Retry-After gives",
            reason=f"{by}_rate_limited",
            who=who,
            wait=wait,
        )

    async def _authenticate(self, request: web.Request) -> Principal | web.Response:
        """The auditor behind the request, or the answer that refuses it (rate limits, no
        or bad token, another role), counted or logged as `records` does."""
        source = request.remote or "unknown"
        if limited := self._over_rate(self.source_limit, source, source, by="source"):
            return limited
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return self._count(
                source,
                401,
                "unauthenticated",
                "send an auditor token: Authorization: Bearer TOKEN",
                reason="no_token",
                detail=header or None,
            )
        try:
            principal = await self.verifier.verify(token.strip(), now=self.clock())
        except AuthError as exc:
            return self._count(
                source, 401, "unauthenticated", exc.message, reason="invalid_token", detail=token
            )
        holder = f"{principal.subject} ({principal.issuer})"
        if limited := self._over_rate(self.token_limit, holder, source, by="token", who=holder):
            return limited
        if principal.role is not TokenRole.AUDITOR:
            return await self._refuse(
                request,
                principal,
                403,
                "forbidden",
                f"the auditor API needs a token with the auditor role, not {principal.role.value}",
            )
        return principal

    async def evidence(self, request: web.Request) -> web.StreamResponse:
        """The evidence bundle of one exchange in the auditor's scope (404 otherwise, as for
        an exchange this log does not hold); the request is logged before it is answered."""
        principal = await self._authenticate(request)
        if isinstance(principal, web.Response):
            return principal
        method = "GET " + EVIDENCE_PATH.split("{")[0]
        message_id = request.match_info["message_id"]
        try:
            query, logged = parse_query(
                MultiDict(message_id=message_id), principal, self.pseudonym, self.max_page
            )
        except QueryError as exc:
            return await self._refuse(
                request, principal, 400, "bad_request", str(exc), logged_message=exc.logged
            )
        logged = {"evidence": message_id}
        try:
            found, _ = await self.searcher.search(query)
        except SearchTooLongError as exc:
            return _error(503, "search_too_long", str(exc))
        if not any(r["kind"] in ("request", "response") for r in found):
            return await self._refuse(
                request,
                principal,
                404,
                "not_found",
                f"this log holds no exchange {message_id} in your scope",
                logged,
                logged_message="no exchange of that id in this log and the auditor's scope",
                method=method,
            )
        # the bundle is made before the request's record, so that the record says how it
        # ended (it is still written before anything is answered)
        try:
            async with self.searcher.connection() as conn:
                files = await export_records(
                    conn,
                    message_id,
                    member=str(principal.member) if principal.member else None,
                )
        except SearchTooLongError as exc:
            return _error(503, "search_too_long", str(exc))
        except AuditError as exc:
            # several exchanges under one id (no bundle for any), or not time-stamped yet
            kind = "not_stamped_yet" if isinstance(exc, NotStampedYet) else "ambiguous"
            return await self._refuse(
                request, principal, 409, kind, exc.message, logged, method=method
            )
        try:
            await self._log_query(request, principal, logged, None, "ok", method=method)
        except GatewayError as err:
            log.error("audit_query_not_logged", error=err.message)
            return _error(
                503, "log_unavailable", "this request cannot be logged, so it is not answered"
            )
        log.info("audit_evidence", subject=principal.subject, message_id=message_id)
        return web.Response(
            body=zip_bytes(files),
            content_type="application/zip",
            headers={
                "Content-Disposition": f'attachment; filename="evidence-{message_id}.zip"',
                "Cache-Control": "no-store",
            },
        )

    async def records(self, request: web.Request) -> web.Response:
        principal = await self._authenticate(request)
        if isinstance(principal, web.Response):
            return principal
        try:
            query, logged = parse_query(request.query, principal, self.pseudonym, self.max_page)
        except QueryError as exc:
            return await self._refuse(
                request, principal, 400, "bad_request", str(exc), logged_message=exc.logged
            )
        try:
            await self._log_query(request, principal, logged, query.subject_ref, "ok")
        except GatewayError as err:
            log.error("audit_query_not_logged", error=err.message)
            return _error(
                503,
                "log_unavailable",
                "this query cannot be logged, so it is not answered; retry later",
            )
        try:
            results, cursor = await self.searcher.search(query)
        except SearchTooLongError as exc:
            return _error(503, "search_too_long", str(exc))
        log.info(
            "audit_query",
            subject=principal.subject,
            member=str(principal.member) if principal.member else None,
            filters=logged,
            results=len(results),
        )
        return web.json_response({"records": results, "next": cursor})


async def start(api: AuditorApi, listen: str, ssl_context: Any = None) -> tuple[web.AppRunner, int]:
    """Serve the API on host:port; return the runner (to clean up) and the bound port."""
    host, _, port = listen.rpartition(":")
    # bounds on what one source holds (its connections, a request head that never ends)
    runner, bound, _ = await http_sites.serve(
        api.app(), host or "127.0.0.1", int(port), ssl_context=ssl_context
    )
    return runner, bound
