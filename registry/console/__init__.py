"""The registry's web console, at `/console/` on the admin API's address.

Pages for registry administrators, member administrators and auditors, rendered on the
server (Jinja2, autoescaped) over the same governance operations as the admin API
(`registry.governance`): every rule, every role and scope check and every admin-log entry
is the same whichever way a change is made.

Sign-in. Through the configured OpenID Connect provider (authorization code with PKCE,
see `oidc_start`), or with an access token pasted into the sign-in form: one from
`gateway registry token`, or one of that provider (checked by the same `TokenVerifier` as
the API). The console answers with a session cookie: a value sealed (HMAC) with a key of
its own, naming the principal and an end at most `session_seconds` away (never past the
presented token's own end); HttpOnly, Secure, SameSite=Strict, path `/console`. It is no
bearer token: the admin API and the servers' auditor APIs have no use for it. Every
request checks it again; an expired, forged or signed-out one leads back to the sign-in
page (a sign-out is recorded in the registry's database, so no replica accepts the
session again).
The auditor pages call the servers' auditor APIs with a registry token of one minute
for the same auditor.

A link `/console/sign-in#token=...` fills the form (the fragment never reaches a server)
and shows whose token it is; the user still presses the button, so that a link someone
else sent cannot silently sign a browser in as them.

Forms. Every form carries a CSRF token: an HMAC of the session cookie under a secret
derived from the registry's token-signing key (the same in every registry process that
shares the key). The sign-in form, before there is a session, carries a random value also
set in a short-lived cookie. A POST without the right value is refused (403) and logged.

Headers. Every answer carries a Content Security Policy allowing only this origin's style
sheet and script files (no inline script or style; the one script, on the sign-in page,
signs in with a token given in the address's fragment, as the links `make demo` prints),
and forbids framing, sniffing, referrers and caching.

Languages: Spanish, English and Portuguese (`registry.console.text`), chosen by a `lang`
query parameter (kept in a cookie) or the browser's Accept-Language; dates and numbers
in that locale (Babel).
"""

from __future__ import annotations

import base64
import contextlib
import functools
import hashlib
import hmac
import json
import re
import secrets
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import aiohttp
import jwt
import structlog
from aiohttp import web
from babel import Locale, UnknownLocaleError
from babel.dates import format_datetime
from babel.numbers import format_decimal
from jinja2 import Environment, FileSystemLoader, select_autoescape

from gateway.agreements import AgreementState, LegalBasis, LegalBasisKind
from gateway.errors import GatewayError
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway.timeutil import format_time, parse_time
from gateway.workflow import Action
from gateway_client.audit import compare_sides, subject_report
from gateway_ops.auth import (
    AuthError,
    OidcSettings,
    Principal,
    Role,
    TokenIssuer,
    TokenVerifier,
    auditor_api_audience,
)
from registry.api import refuse_unstorable
from registry.console.charts import Bar, Series, bars, stacked_columns
from registry.console.text import DEFAULT_LANGUAGE, LANGUAGE_NAMES, LANGUAGES, TEXT, text
from registry.governance import (
    AdminError,
    AgreementRequest,
    Conflict,
    Forbidden,
    Governance,
    InvalidRequest,
    NotFound,
)

log = structlog.get_logger("registry.console")

HERE = Path(__file__).resolve().parent
# `__Host-` cookies: Secure, on "/", no Domain; a browser takes them only from this very host,
# so no sibling subdomain can plant one (a session of its own, the OIDC state of its own)
SESSION_COOKIE = "__Host-gateway_console"
SIGNIN_COOKIE = "__Host-gateway_console_signin"
OIDC_COOKIE = "__Host-gateway_console_oidc"
# how long a browser may take at the provider before coming back
OIDC_SECONDS = 600.0
# the life of the token the auditor pages send to the servers' auditor APIs
FORWARD_SECONDS = 60.0
LANGUAGE_COOKIE = "gateway_console_lang"
PATH = "/console"
# the longest a console session lasts (the presented token's end comes first if sooner)
SESSION_SECONDS = 900.0
# active agreements ending within this many days are shown on the home page
EXPIRING_DAYS = 30
MAX_TOKEN_CHARS = 16_384
# the largest answer of the provider's token endpoint read (an ID token and a few fields)
MAX_TOKEN_RESPONSE_BYTES = 1 << 20
MAX_REASON_CHARS = 2000
# the auditor API of a security server (security_server.auditor_api), its filters, and the
# most records one page reads from each server
AUDIT_PATH = "/audit/v1/records"
EVIDENCE_PATH = "/audit/v1/evidence/"
AUDIT_FILTERS = (
    "message_id",
    "client",
    "service",
    "purpose",
    "status",
    "since",
    "until",
    "subject",
)
AUDIT_RECORDS = 200
# the audit page's charts: from at most this many records of each server, for so many services
CHART_RECORDS = 2000
MAX_CHARTS = 12
GOOD, BAD, WAITING, NEUTRAL = "#1d6b2f", "#9b1c1c", "#0b4f8a", "#5c5c5c"
STATE_COLOURS = {
    AgreementState.REQUESTED: WAITING,
    AgreementState.APPROVED_BY_PROVIDER: WAITING,
    AgreementState.APPROVED_BY_REGISTRY: WAITING,
    AgreementState.ACTIVE: GOOD,
    AgreementState.REJECTED: NEUTRAL,
    AgreementState.SUSPENDED: BAD,
    AgreementState.REVOKED: BAD,
    AgreementState.EXPIRED: NEUTRAL,
}
# the admin log page shows the newest entries (the API and `gateway admin log` page through all)
LOG_ENTRIES_SHOWN = 200

SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
        "form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}

PRINCIPAL = web.RequestKey("console_principal", Principal)
SESSION = web.RequestKey("console_session", str)
LANGUAGE = web.RequestKey("console_language", str)
# the Babel locale for dates and numbers: the browser's tag for that language ("es_UY",
# "pt_BR") when Babel knows it, else the language
LOCALE = web.RequestKey("console_locale", str)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass(frozen=True, slots=True)
class _Refusal(Exception):
    """A console request refused before it reaches governance: status and text key."""

    status: int
    key: str


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of two texts, whatever characters `given` holds (a cookie's
    bytes that are not UTF-8 reach here as lone surrogates: a 500 for anyone, before)."""
    encode = functools.partial(str.encode, encoding="utf-8", errors="surrogatepass")
    return hmac.compare_digest(encode(given), encode(expected))


def _set_cookie(
    response: web.StreamResponse,
    name: str,
    value: str,
    seconds: float,
    *,
    path: str = "/",
    samesite: str = "Strict",
) -> None:
    """Every console cookie: HttpOnly and Secure, for `seconds`, on "/" (which a `__Host-`
    cookie must name; the API never reads cookies)."""
    response.set_cookie(
        name,
        value,
        max_age=int(seconds),
        path=path,
        secure=True,
        httponly=True,
        samesite=samesite,
    )


def _drop_cookie(response: web.StreamResponse, name: str) -> None:
    """Remove a console cookie: with Secure, or a browser ignores it for a `__Host-` one."""
    response.del_cookie(name, path="/", secure=True, httponly=True)


def _see_other(location: str) -> web.Response:
    """303 See Other: after a form, the browser GETs `location`."""
    return web.Response(status=303, headers={"Location": location})


class Console:
    def __init__(
        self,
        governance: Governance,
        verifier: TokenVerifier,
        issuer: TokenIssuer,
        *,
        clock: Callable[[], datetime],
        session_seconds: float = SESSION_SECONDS,
        auditor_apis: Mapping[str, str] | None = None,
        oidc: OidcSettings | None = None,
    ) -> None:
        # the provider's browser sign-in, when its settings name one
        self.oidc = oidc if oidc is not None and oidc.browser_sign_in else None
        self.auditor_apis = dict(auditor_apis or {})
        for server, url in self.auditor_apis.items():
            parts = urlsplit(url)
            if parts.scheme != "https" and not (
                parts.scheme == "http" and parts.hostname in ("127.0.0.1", "::1", "localhost")
            ):
                raise ValueError(
                    f"the auditor API of {server} must be an https URL (http only on loopback), "
                    f"not {url!r}"
                )
        self._http: aiohttp.ClientSession | None = None
        self.gov = governance
        self.verifier = verifier
        self.issuer = issuer
        self.clock = clock
        self.session_seconds = session_seconds
        self._csrf_key = issuer.derived_secret("console-csrf")
        self._oidc_key = issuer.derived_secret("console-oidc")
        self._session_key = issuer.derived_secret("console-session")
        self.templates = Environment(
            loader=FileSystemLoader(HERE / "templates"),
            autoescape=select_autoescape(default=True),
            trim_blocks=True,
            lstrip_blocks=True,
        )

    # ---- the application -------------------------------------------------------------

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors, self._session])
        app.on_response_prepare.append(self._headers)
        r = app.router
        r.add_get("/", self.home)
        r.add_get("/sign-in", self.sign_in_page)
        r.add_post("/sign-in", self.sign_in)
        r.add_post("/sign-out", self.sign_out)
        r.add_get("/oidc/start", self.oidc_start)
        r.add_get("/oidc/callback", self.oidc_callback)
        r.add_get("/agreements", self.agreements)
        r.add_get("/agreements/{id}", self.agreement)
        actions = "|".join(a.value for a in Action if a is not Action.EXPIRE)
        r.add_post("/agreements/{id}/{action:" + actions + "}", self.act)
        r.add_post("/agreements", self.request_agreement)
        r.add_post("/servers/approve", self.approve_server)
        r.add_get("/catalogue", self.catalogue)
        r.add_get("/services/{id:.+}", self.service)
        r.add_get("/admin-log", self.admin_log)
        r.add_get("/audit", self.audit_search)
        r.add_get("/audit/trace/{message_id}", self.audit_trace)
        r.add_get("/audit/subject", self.audit_subject)
        r.add_get("/audit/evidence", self.audit_evidence)
        r.add_static("/static", HERE / "static", append_version=True)
        app.on_cleanup.append(self._close_http)
        return app

    def _client(self) -> aiohttp.ClientSession:
        """The console's HTTP client (the auditor APIs, the OpenID Connect provider),
        made when first needed: inside the event loop, as aiohttp wants."""
        if self._http is None:
            self._http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        return self._http

    async def _close_http(self, _app: web.Application) -> None:
        if self._http is not None:
            await self._http.close()

    # ---- middleware --------------------------------------------------------------------

    @staticmethod
    async def _headers(request: web.Request, response: web.StreamResponse) -> None:
        """On every answer under /console/, errors aiohttp or the API's middleware made too."""
        response.headers.update(SECURITY_HEADERS)

    @web.middleware
    async def _errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except AdminError as exc:
            principal = request.get(PRINCIPAL)
            log.info(
                "console_request_refused",
                method=request.method,
                path=request.path,
                status=exc.status,
                subject=principal.subject if principal else None,
                reason=exc.message,
            )
            key = {
                Forbidden: "error.forbidden",
                NotFound: "error.not_found",
                Conflict: "error.conflict",
                InvalidRequest: "error.invalid",
            }.get(type(exc), "error.invalid")
            return self._page(
                request,
                "error.html",
                status=exc.status,
                message=self._t(request, key, message=exc.message),
            )
        except _Refusal as exc:
            return self._page(
                request, "error.html", status=exc.status, message=self._t(request, exc.key)
            )
        except GatewayError as exc:  # a malformed identifier or purpose in a form, say
            log.info("console_request_refused", path=request.path, status=400, reason=exc.message)
            return self._page(
                request,
                "error.html",
                status=400,
                message=self._t(request, "error.invalid", message=exc.message),
            )

    @web.middleware
    async def _session(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        request[LANGUAGE], request[LOCALE] = self._language(request)
        public = request.path in (
            f"{PATH}/sign-in",
            f"{PATH}/oidc/start",
            f"{PATH}/oidc/callback",
        ) or request.path.startswith(f"{PATH}/static/")
        cookie = request.cookies.get(SESSION_COOKIE)
        if cookie:
            principal = await self._session_principal(cookie)
            if principal is not None:
                request[PRINCIPAL] = principal
                request[SESSION] = cookie
            elif not public:
                return self._to_sign_in(expired=True)
        elif not public:
            return self._to_sign_in(expired=False)
        # an audit page queries every server in the auditor's name (and those queries are
        # logged as theirs): never on behalf of another site's page, such as an image on a
        # sibling subdomain, which SameSite=Strict lets through (found by a red-team review)
        if request.path.startswith(f"{PATH}/audit") and request.headers.get("Sec-Fetch-Site") in (
            "same-site",
            "cross-site",
        ):
            raise Forbidden(
                "audit pages open from this console's own pages only; this request came "
                "from another site's page"
            )
        if request.method == "POST" and request.path != f"{PATH}/sign-in":
            form = await request.post()
            session = request.get(SESSION)
            if session is None or not _same(str(form.get("csrf", "")), self._csrf(session)):
                log.warning(
                    "console_csrf_refused",
                    path=request.path,
                    subject=principal.subject if (principal := request.get(PRINCIPAL)) else None,
                )
                raise _Refusal(403, "error.csrf")
            # then the API's rule for text: no NUL, no lone surrogate (the same rules
            # whichever way a change is made)
            for name, value in form.items():
                refuse_unstorable(value, f"form field {name}")
        response = await handler(request)
        lang = request.query.get("lang")
        if lang in LANGUAGES:
            _set_cookie(response, LANGUAGE_COOKIE, lang, 365 * 86400)
        return response

    def _to_sign_in(self, *, expired: bool) -> web.Response:
        redirect = _see_other(f"{PATH}/sign-in" + ("?expired=1" if expired else ""))
        if expired:
            _drop_cookie(redirect, SESSION_COOKIE)
        return redirect

    # ---- helpers -----------------------------------------------------------------------

    @staticmethod
    def _language(request: web.Request) -> tuple[str, str]:
        """(language, Babel locale): the language a `lang` query parameter or its cookie
        asks for, else the browser's best-weighted one we have; the locale is the browser's
        first tag of that language with a region Babel knows ("es-UY"), else the language."""
        accepted: list[tuple[str, str, float]] = []  # (tag, language, weight)
        for part in request.headers.get("Accept-Language", "").split(",")[:20]:
            tag, _, params = part.strip().partition(";")
            tag = tag.strip()
            q = 1.0
            if params.strip().startswith("q="):
                try:
                    q = float(params.strip()[2:])
                except ValueError:
                    q = -1.0  # never chosen for the language; still a locale for it
            accepted.append((tag, tag.lower().split("-")[0], q))
        asked = request.query.get("lang") or request.cookies.get(LANGUAGE_COOKIE)
        language, weight = DEFAULT_LANGUAGE, 0.0
        if asked in LANGUAGES:
            language = str(asked)
        else:
            for _, primary, q in accepted:
                if primary in LANGUAGES and q > weight:
                    language, weight = primary, q
        for tag, primary, _ in accepted:
            if primary == language and "-" in tag:
                try:
                    return language, str(Locale.parse(tag, sep="-"))
                except (ValueError, UnknownLocaleError):
                    continue
        return language, language

    def _t(self, request: web.Request, key: str, **values: object) -> str:
        return text(request.get(LANGUAGE, DEFAULT_LANGUAGE), key, **values)

    def _csrf(self, session: str) -> str:
        return hmac.new(self._csrf_key, session.encode(), hashlib.sha256).hexdigest()

    def _page(
        self, request: web.Request, template: str, *, status: int = 200, **values: Any
    ) -> web.Response:
        lang = request.get(LANGUAGE, DEFAULT_LANGUAGE)
        principal = request.get(PRINCIPAL)

        def t(key: str, **kw: object) -> str:
            return text(lang, key, **kw)

        locale = request.get(LOCALE, lang)

        def when(value: str | None) -> str:
            if not value:
                return t("state.none")
            return format_datetime(parse_time(value), "medium", tzinfo=UTC, locale=locale)

        def number(value: int) -> str:
            return format_decimal(value, locale=locale)

        def role_name(p: Principal) -> str:
            if p.role is Role.MEMBER_ADMIN:
                return t("role.member-admin", member=p.member)
            if p.role is Role.AUDITOR and p.member is not None:
                return t("role.auditor-member", member=p.member)
            return t(f"role.{p.role.value}")

        catalogue = TEXT[lang]

        def action_name(action: str) -> str:
            """A button: what one may do to an agreement."""
            return t(f"action.{action}")

        def event_name(action: str) -> str:
            """What an admin log entry records: an agreement's step, or another change."""
            for key in (f"event.{action}", f"log.action.{action}"):
                if key in catalogue:
                    return t(key)
            return t("action.other", action=action)  # a code this console does not know

        def record_kind(r: dict[str, Any]) -> str:
            key = f"kind.{r.get('kind')}"
            return t(key) if key in catalogue else str(r.get("kind"))

        def basis_name(kind: str) -> str:
            return t(f"basis.{kind}") if f"basis.{kind}" in catalogue else kind

        def state_name(state: str | None) -> str:
            for key in (f"state.{state}", f"status.{state}"):
                if state and key in catalogue:
                    return t(key)
            return state or t("state.none")

        def switch(language: str) -> str:
            query = {k: v for k, v in request.query.items() if k != "lang"}
            query["lang"] = language
            return f"{request.path}?{urlencode(query)}"

        html = self.templates.get_template(template).render(
            t=t,
            when=when,
            number=number,
            role_name=role_name,
            action_name=action_name,
            event_name=event_name,
            basis_name=basis_name,
            record_kind=record_kind,
            state_name=state_name,
            switch=switch,
            lang=lang,
            languages=LANGUAGE_NAMES,
            principal=principal,
            csrf=self._csrf(request[SESSION]) if SESSION in request else "",
            instance=self.gov.instance,
            path=request.path,
            **values,
        )
        return web.Response(text=html, status=status, content_type="text/html", charset="utf-8")

    # ---- sign-in -----------------------------------------------------------------------

    async def sign_in_page(self, request: web.Request) -> web.Response:
        notice = None
        if request.query.get("expired"):
            notice = self._t(request, "signin.expired")
        elif request.query.get("signed-out"):
            notice = self._t(request, "signin.signed_out")
        return self._sign_in_form(request, notice=notice)

    def _sign_in_form(
        self, request: web.Request, *, notice: str | None = None, error: str | None = None
    ) -> web.Response:
        nonce = secrets.token_urlsafe(24)
        response = self._page(
            request,
            "sign_in.html",
            status=400 if error else 200,
            nonce=nonce,
            notice=notice,
            error=error,
            oidc=self.oidc is not None,
        )
        _set_cookie(response, SIGNIN_COOKIE, nonce, 600)
        return response

    async def sign_in(self, request: web.Request) -> web.StreamResponse:
        form = await request.post()
        nonce = request.cookies.get(SIGNIN_COOKIE, "")
        if not nonce or not _same(str(form.get("nonce", "")), nonce):
            log.warning("console_signin_csrf_refused")
            return self._sign_in_form(request, error=self._t(request, "signin.retry"))
        token = str(form.get("token", "")).strip()
        now = self.clock()
        try:
            if len(token) > MAX_TOKEN_CHARS:
                raise AuthError(f"the token is longer than {MAX_TOKEN_CHARS} characters")
            principal = await self.verifier.verify(token, now=now)
        except AuthError as exc:
            log.info("console_signin_refused", reason=exc.message)
            return self._sign_in_form(
                request, error=self._t(request, "signin.refused", reason=exc.message)
            )
        if principal.role is Role.SECURITY_SERVER:
            log.info("console_signin_refused", reason="security-server token")
            return self._sign_in_form(request, error=self._t(request, "signin.not_for_console"))
        return self._start_session(principal, token, how="token")

    def _start_session(self, principal: Principal, token: str, *, how: str) -> web.Response:
        """The session cookie for `principal`, signed in with `token` (already verified)."""
        now = self.clock()
        # the session ends when the presented token would have, if that is sooner
        claims = jwt.decode(token, options={"verify_signature": False})
        left = float(claims["exp"]) - now.timestamp() if "exp" in claims else self.session_seconds
        seconds = max(1.0, min(self.session_seconds, left))
        # a value sealed with a key of the console's own, not a token: the admin API and the
        # servers' auditor APIs, which take bearer tokens, have no use for it
        session = self._seal(
            self._session_key,
            {
                "sub": principal.subject,
                "role": principal.role.value,
                "member": str(principal.member) if principal.member else None,
                "iss": principal.issuer,
                "exp": now.timestamp() + seconds,
                "jti": secrets.token_urlsafe(16),
            },
        )
        log.info(
            "console_signed_in",
            subject=principal.subject,
            role=principal.role.value,
            member=str(principal.member) if principal.member else None,
            seconds=round(seconds),
            how=how,
        )
        response = _see_other(f"{PATH}/")
        _set_cookie(response, SESSION_COOKIE, session, int(seconds))
        _drop_cookie(response, SIGNIN_COOKIE)
        return response

    # ---- OpenID Connect: authorization code with PKCE ----------------------------------

    def _seal(self, key: bytes, doc: dict[str, Any]) -> str:
        body = base64.urlsafe_b64encode(json.dumps(doc).encode()).decode().rstrip("=")
        mac = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        return f"{body}.{mac}"

    def _unseal(self, key: bytes, value: str) -> dict[str, Any] | None:
        """What `_seal` sealed with `key`, if it is intact and its `exp` has not passed. A
        sealed value is ASCII (base64url and hex): bytes of a cookie that are not UTF-8
        reach here as lone surrogates, and are no seal (they failed with a 500, before)."""
        if not value.isascii():
            return None
        body, _, mac = value.partition(".")
        good = hmac.new(key, body.encode(), hashlib.sha256).hexdigest()
        if not _same(mac, good):
            return None
        doc: dict[str, Any] = json.loads(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
        return doc if float(doc.get("exp", 0)) > self.clock().timestamp() else None

    async def _session_principal(self, cookie: str) -> Principal | None:
        doc = self._unseal(self._session_key, cookie)
        if doc is None or await self.gov.store.signed_out(str(doc.get("jti"))):
            return None
        return Principal(
            subject=str(doc["sub"]),
            role=Role(doc["role"]),
            member=MemberId.parse(doc["member"]) if doc.get("member") else None,
            server=None,
            issuer=str(doc["iss"]),
        )

    def _forward_token(self, actor: Principal, server: str) -> str:
        """A token of a minute for one server's auditor API, standing for the auditor: its
        audience is that server's (`auditor_api_audience`), so the server cannot replay it
        at the registry, at this console or at another server (found by a red-team
        review: with the registry's own audience it could)."""
        return self.issuer.issue(
            subject=actor.subject,
            role=actor.role,
            member=actor.member,
            now=self.clock(),
            ttl=timedelta(seconds=FORWARD_SECONDS),
            audience=auditor_api_audience(server),
        )

    async def oidc_start(self, request: web.Request) -> web.StreamResponse:
        """Off to the provider, with a fresh state, nonce and PKCE verifier kept (sealed)
        in a short cookie that comes back with the provider's redirect."""
        if self.oidc is None:
            raise NotFound("no OpenID Connect sign-in is configured")
        state, nonce, verifier = (secrets.token_urlsafe(32) for _ in range(3))
        challenge = (
            base64.urlsafe_b64encode(hashlib.sha256(verifier.encode()).digest())
            .decode()
            .rstrip("=")
        )
        query = urlencode(
            {
                "response_type": "code",
                "client_id": self.oidc.client_id,
                "redirect_uri": self.oidc.redirect_url,
                "scope": "openid",
                "state": state,
                "nonce": nonce,
                "code_challenge": challenge,
                "code_challenge_method": "S256",
            }
        )
        separator = "&" if "?" in self.oidc.authorization_url else "?"
        response = _see_other(f"{self.oidc.authorization_url}{separator}{query}")
        sealed = self._seal(
            self._oidc_key,
            {
                "state": state,
                "nonce": nonce,
                "verifier": verifier,
                "exp": self.clock().timestamp() + OIDC_SECONDS,
            },
        )
        # Lax, not Strict: it must come back with the provider's (cross-site) redirect
        _set_cookie(response, OIDC_COOKIE, sealed, int(OIDC_SECONDS), samesite="Lax")
        return response

    async def oidc_callback(self, request: web.Request) -> web.StreamResponse:
        """Back from the provider: the state must match the sealed cookie's, the code is
        exchanged with the PKCE verifier, and the ID token must verify as any token the
        API accepts and carry the nonce sent."""
        if self.oidc is None:
            raise NotFound("no OpenID Connect sign-in is configured")
        sealed = self._unseal(self._oidc_key, request.cookies.get(OIDC_COOKIE, ""))

        def refuse(reason: str) -> web.Response:
            log.warning("console_oidc_refused", reason=reason)
            response = self._sign_in_form(
                request, error=self._t(request, "signin.refused", reason=reason)
            )
            _drop_cookie(response, OIDC_COOKIE)
            return response

        if sealed is None:
            return refuse("the sign-in took too long or did not start here; start again")
        if not _same(request.query.get("state", ""), str(sealed["state"])):
            return refuse("the provider's answer is not for this sign-in (state)")
        if "error" in request.query:
            return refuse(f"the provider said {request.query['error'][:100]}")
        code = request.query.get("code", "")
        if not code or len(code) > MAX_TOKEN_CHARS:
            return refuse("the provider gave no code")
        try:
            async with self._client().post(
                self.oidc.token_url,
                data={
                    "grant_type": "authorization_code",
                    "code": code,
                    "redirect_uri": self.oidc.redirect_url,
                    "client_id": self.oidc.client_id,
                    "code_verifier": str(sealed["verifier"]),
                },
                # a redirect would send the code and its verifier wherever it points
                allow_redirects=False,
            ) as answer:
                body = bytearray()
                async for chunk in answer.content.iter_chunked(64 * 1024):
                    body += chunk
                    if len(body) > MAX_TOKEN_RESPONSE_BYTES:
                        return refuse("the provider's token answer is too large")
                doc = json.loads(body)
                if answer.status != 200:
                    return refuse(f"the provider refused the code ({answer.status})")
        except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
            return refuse(f"the provider's token endpoint failed: {type(exc).__name__}")
        token = doc.get("id_token") if isinstance(doc, dict) else None
        if not isinstance(token, str) or len(token) > MAX_TOKEN_CHARS:
            return refuse("the provider sent no ID token")
        try:
            principal = await self.verifier.verify(token, now=self.clock())
        except AuthError as exc:
            return refuse(exc.message)
        claims = jwt.decode(token, options={"verify_signature": False})
        if not _same(str(claims.get("nonce", "")), str(sealed["nonce"])):
            return refuse("the ID token is not for this sign-in (nonce)")
        # OpenID Connect Core 3.1.3.7: a token of several audiences says which party it was
        # issued to (azp), and that party must be this console
        audiences = claims.get("aud")
        several = isinstance(audiences, list) and len(audiences) > 1
        if ("azp" in claims or several) and claims.get("azp") != self.oidc.client_id:
            return refuse("the ID token was issued to another client (azp)")
        if principal.role is Role.SECURITY_SERVER:
            return refuse("security-server tokens do not open the console")
        response = self._start_session(principal, token, how="oidc")
        _drop_cookie(response, OIDC_COOKIE)
        return response

    async def sign_out(self, request: web.Request) -> web.StreamResponse:
        log.info("console_signed_out", subject=request[PRINCIPAL].subject)
        doc = self._unseal(self._session_key, request[SESSION])
        if doc is not None:  # no registry process takes it again, even sent by hand
            await self.gov.store.sign_out(
                str(doc["jti"]), float(doc["exp"]), self.clock().timestamp()
            )
        response = _see_other(f"{PATH}/sign-in?signed-out=1")
        _drop_cookie(response, SESSION_COOKIE)
        return response

    # ---- pages -------------------------------------------------------------------------

    async def home(self, request: web.Request) -> web.Response:
        actor = request[PRINCIPAL]
        visible = await self.gov.list_agreements(actor)
        awaiting = [a for a in visible if Action.APPROVE in self.gov.actions_for(actor, a)]
        soon = self.clock() + timedelta(days=EXPIRING_DAYS)
        expiring = [
            a
            for a in visible
            if a["state"] == AgreementState.ACTIVE.value
            and a["valid_until"]
            and parse_time(a["valid_until"]) <= soon
        ]
        servers = []
        if actor.role in (Role.REGISTRY_ADMIN, Role.MEMBER_ADMIN):
            servers = [
                s
                for s in await self.gov.list_servers(actor)
                if s["status"] == "pending"
                and (actor.role is Role.REGISTRY_ADMIN or s["id"].startswith(f"{actor.member}/"))
            ]
        by_state = Counter(a["state"] for a in visible)
        chart = bars(
            self._t(request, "charts.agreements"),
            [
                Bar(self._t(request, f"state.{s.value}"), by_state[s.value], STATE_COLOURS[s])
                for s in AgreementState
            ],
        )
        return self._page(
            request,
            "home.html",
            chart=chart,
            by_state=[(s.value, by_state[s.value]) for s in AgreementState],
            awaiting=awaiting,
            expiring=sorted(expiring, key=lambda a: a["valid_until"]),
            servers=servers,
            federations=await self.gov.list_federations(actor),
            days=EXPIRING_DAYS,
            approved=request.query.get("approved", "")[:200],
        )

    async def agreements(self, request: web.Request) -> web.Response:
        actor = request[PRINCIPAL]
        state_text = request.query.get("state", "")
        state = None
        if state_text:
            try:
                state = AgreementState(state_text)
            except ValueError:
                raise InvalidRequest(f"no agreement state is called {state_text[:40]!r}") from None
        search = request.query.get("q", "").strip()[:200]
        rows = await self.gov.list_agreements(actor, state=state)
        if search:
            needle = search.lower()
            rows = [
                a
                for a in rows
                if needle in a["id"].lower()
                or needle in a["client"].lower()
                or needle in a["service"].lower()
                or any(needle in p.lower() for p in a["purposes"])
            ]
        return self._page(
            request,
            "agreements.html",
            agreements=rows,
            states=[s.value for s in AgreementState],
            state=state_text,
            search=search,
        )

    async def agreement(self, request: web.Request) -> web.Response:
        actor = request[PRINCIPAL]
        agreement_id = request.match_info["id"]
        doc = await self.gov.get_agreement(actor, agreement_id)
        done = request.query.get("done")
        return self._page(
            request,
            "agreement.html",
            agreement=doc,
            history=await self.gov.agreement_history(actor, agreement_id),
            actions=[a.value for a in self.gov.actions_for(actor, doc)],
            done=done if done in {*(a.value for a in Action), "request"} else None,
        )

    async def act(self, request: web.Request) -> web.StreamResponse:
        actor = request[PRINCIPAL]
        agreement_id = request.match_info["id"]
        action = Action(request.match_info["action"])
        form = await request.post()
        reason = str(form.get("reason", ""))
        if len(reason) > MAX_REASON_CHARS:
            raise InvalidRequest(f"the reason is longer than {MAX_REASON_CHARS} characters")
        await self.gov.act(actor, agreement_id, action, reason)
        log.info(
            "console_agreement_changed",
            subject=actor.subject,
            agreement=agreement_id,
            action=action.value,
        )
        return _see_other(f"{PATH}/agreements/{quote(agreement_id)}?done={action.value}")

    async def approve_server(self, request: web.Request) -> web.StreamResponse:
        """A registry administrator approves a pending security server from the home page
        (the same operation, rules and admin log entry as the API's)."""
        actor = request[PRINCIPAL]
        form = await request.post()
        server = SecurityServerId.parse(str(form.get("server", "")))
        reason = str(form.get("reason", ""))[:MAX_REASON_CHARS]
        await self.gov.approve_server(actor, server, reason)
        log.info("console_server_approved", subject=actor.subject, server=str(server))
        return _see_other(f"{PATH}/?approved={quote(str(server), safe='')}")

    async def catalogue(self, request: web.Request) -> web.Response:
        """Members with their subsystems, security servers and services, searched."""
        actor = request[PRINCIPAL]
        search = request.query.get("q", "").strip()[:200]
        needle = search.lower()
        members = await self.gov.list_members(actor)
        servers = await self.gov.list_servers(actor)
        services = await self.gov.search_services(actor, text=search or None)
        if needle:
            members = [
                m
                for m in members
                if needle in m["id"].lower()
                or needle in m["name"].lower()
                or any(needle in x.lower() for x in m["subsystems"])
            ]
            servers = [s for s in servers if needle in s["id"].lower()]
        return self._page(
            request,
            "catalogue.html",
            members=members,
            servers=servers,
            services=services,
            search=search,
        )

    async def service(self, request: web.Request) -> web.Response:
        """One service: what it offers, its agreements in my scope, and a request form for
        the administrators of members with subsystems."""
        actor = request[PRINCIPAL]
        service_id = request.match_info["id"]
        ServiceId.parse(service_id)  # GatewayError (400) when malformed
        found = [s for s in await self.gov.search_services(actor) if s["id"] == service_id]
        if not found:
            raise NotFound(f"service {service_id} is not in the catalogue")
        clients: list[str] = []
        if actor.role is Role.MEMBER_ADMIN:
            mine = [m for m in await self.gov.list_members(actor) if m["id"] == str(actor.member)]
            clients = mine[0]["subsystems"] if mine else []
        return self._page(
            request,
            "service.html",
            service=found[0],
            agreements=[
                a for a in await self.gov.list_agreements(actor) if a["service"] == service_id
            ],
            clients=clients,
            kinds=[k.value for k in LegalBasisKind],
        )

    async def request_agreement(self, request: web.Request) -> web.StreamResponse:
        """The request form of a service's page: the same request as the API's."""
        actor = request[PRINCIPAL]
        form = await request.post()

        def field(name: str, longest: int = 500) -> str:
            value = str(form.get(name, "")).strip()
            if len(value) > longest:
                raise InvalidRequest(f"{name} is longer than {longest} characters")
            return value

        purposes = tuple(p for p in re.split(r"[\s,]+", field("purposes")) if p)
        if not purposes:
            raise InvalidRequest("name at least one purpose")
        try:
            kind = LegalBasisKind(field("legal_basis_kind"))
        except ValueError:
            raise InvalidRequest("choose the kind of legal basis") from None
        reference = field("legal_basis_reference")
        if not reference:
            raise InvalidRequest("name the legal basis (the law and article, say)")
        until_text = field("valid_until", 10)
        valid_until = None
        if until_text:
            try:
                day = datetime.strptime(until_text, "%Y-%m-%d").replace(tzinfo=UTC)
                valid_until = day + timedelta(days=1)  # to the end of that day
            except (ValueError, OverflowError):  # 9999-12-31 has no end of day
                raise InvalidRequest(
                    "valid until must be a date (YYYY-MM-DD) before 9999-12-31"
                ) from None
        created = await self.gov.request_agreement(
            actor,
            AgreementRequest(
                client=SubsystemId.parse(field("client")),
                service=ServiceId.parse(field("service")),
                purposes=purposes,
                legal_basis=LegalBasis(kind=kind, reference=reference),
                data_categories=tuple(
                    str(c)[:64] for c in form.getall("data_categories", [])[:100]
                ),
                valid_until=valid_until,
                reason=field("reason", MAX_REASON_CHARS),
            ),
        )
        log.info(
            "console_agreement_requested",
            subject=actor.subject,
            agreement=created["id"],
            service=created["service"],
        )
        return _see_other(f"{PATH}/agreements/{quote(created['id'])}?done=request")

    # ---- auditor pages: the security servers' auditor APIs, with the auditor's session ----

    def _auditor(self, request: web.Request) -> Principal:
        actor = request[PRINCIPAL]
        if actor.role is not Role.AUDITOR:
            raise Forbidden("the auditor pages are for auditors")
        return actor

    async def _records(
        self,
        request: web.Request,
        params: dict[str, str],
        servers: list[str] | None = None,
        most: int = AUDIT_RECORDS,
    ) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, str]]:
        """(server, record) pairs from each server's auditor API (at most `most` from each,
        newest pages first as the API orders them), read with this session's token (which
        the servers verify against the registry's keys, as any auditor token), and the
        servers that could not answer, with why."""
        found: list[tuple[str, dict[str, Any]]] = []
        failed: dict[str, str] = {}
        for server in servers if servers is not None else sorted(self.auditor_apis):
            token = self._forward_token(request[PRINCIPAL], server)
            headers = {"Authorization": f"Bearer {token}"}
            url = self.auditor_apis[server].rstrip("/") + AUDIT_PATH
            query = {k: v for k, v in params.items() if v}
            taken, after = 0, None
            while taken < most:
                page = {**query, "limit": str(min(AUDIT_RECORDS, most - taken))}
                if after:
                    page["after"] = after
                try:
                    async with self._client().get(
                        url, params=page, headers=headers, allow_redirects=False
                    ) as answer:
                        doc = await answer.json(content_type=None)
                        if answer.status != 200:
                            failed[server] = str(doc.get("message", answer.status))[:300]
                            break
                except (aiohttp.ClientError, TimeoutError, ValueError) as exc:
                    failed[server] = f"{type(exc).__name__}: {exc}"[:300]
                    break
                found += [(server, r) for r in doc["records"]]
                taken += len(doc["records"])
                after = doc.get("next")
                if not after or not doc["records"]:
                    break
        log.info(
            "console_audit_query",
            subject=request[PRINCIPAL].subject,
            filters=sorted(k for k, v in params.items() if v),
            servers=len(self.auditor_apis),
            failed=sorted(failed),
        )
        return found, failed

    async def audit_search(self, request: web.Request) -> web.Response:
        self._auditor(request)
        params = {name: request.query.get(name, "").strip()[:256] for name in AUDIT_FILTERS}
        server = request.query.get("server", "")
        if server and server not in self.auditor_apis:
            raise InvalidRequest(f"no auditor API is configured for server {server[:100]!r}")
        searched = any(params.values()) or "server" in request.query
        charts: list[dict[str, Any]] = []
        if searched:
            found, failed = await self._records(request, params, [server] if server else None)
        else:  # the landing page: the last day's exchanges, per service and hour
            found, failed = await self._records(
                request,
                {"role": "consumer", "since": format_time(self.clock() - timedelta(hours=24))},
                most=CHART_RECORDS,
            )
            charts = self._exchange_charts(request, found)
            found = []
        found.sort(key=lambda p: p[1]["logged_at"], reverse=True)
        return self._page(
            request,
            "audit_search.html",
            charts=charts,
            chart_records=CHART_RECORDS,
            servers=sorted(self.auditor_apis),
            server=server,
            params=params,
            searched=searched,
            found=found,
            failed=failed,
        )

    def _exchange_charts(
        self, request: web.Request, found: list[tuple[str, dict[str, Any]]]
    ) -> list[dict[str, Any]]:
        """Per service, exchanges answered and refused in each of the last 24 hours (UTC),
        counted once each, from the consumer's side."""
        start = self.clock().replace(minute=0, second=0, microsecond=0) - timedelta(hours=23)
        counts: dict[str, tuple[list[int], list[int]]] = {}
        for _, r in found:
            if r["kind"] not in ("response", "refusal") or not r.get("service"):
                continue
            hour = int((parse_time(r["logged_at"]) - start).total_seconds() // 3600)
            if not 0 <= hour < 24:
                continue
            answered, refused = counts.setdefault(r["service"], ([0] * 24, [0] * 24))
            (answered if r["kind"] == "response" else refused)[hour] += 1
        ticks = [(start + timedelta(hours=i)).strftime("%H:%M") for i in range(24)]
        charts = []
        for service, (answered, refused) in sorted(counts.items())[:MAX_CHARTS]:
            title = self._t(request, "charts.exchanges", service=service)
            charts.append(
                {
                    "service": service,
                    "title": title,
                    "svg": stacked_columns(
                        title,
                        ticks,
                        [
                            Series(self._t(request, "charts.answered"), GOOD, answered),
                            Series(self._t(request, "charts.refused"), BAD, refused),
                        ],
                    ),
                    "answered": sum(answered),
                    "refused": sum(refused),
                }
            )
        return charts

    async def audit_trace(self, request: web.Request) -> web.Response:
        self._auditor(request)
        message_id = request.match_info["message_id"][:256]
        found, failed = await self._records(request, {"message_id": message_id})
        found.sort(key=lambda p: p[1]["logged_at"])
        start = parse_time(found[0][1]["logged_at"]) if found else None
        timeline = [
            (server, r, (parse_time(r["logged_at"]) - start).total_seconds() * 1000 if start else 0)
            for server, r in found
        ]
        return self._page(
            request,
            "audit_trace.html",
            message_id=message_id,
            timeline=timeline,
            sides=compare_sides(found) if found else [],
            failed=failed,
        )

    async def audit_evidence(self, request: web.Request) -> web.StreamResponse:
        """An exchange's evidence bundle, from one server's auditor API (which checks the
        auditor's scope and logs the request), handed to the browser as a download."""
        actor = self._auditor(request)
        server = request.query.get("server", "")
        message_id = request.query.get("message_id", "")[:256]
        if server not in self.auditor_apis or not message_id:
            raise InvalidRequest("name a server with an auditor API and a message id")
        url = f"{self.auditor_apis[server].rstrip('/')}{EVIDENCE_PATH}{quote(message_id, safe='')}"
        try:
            async with self._client().get(
                url,
                headers={"Authorization": f"Bearer {self._forward_token(actor, server)}"},
                allow_redirects=False,
            ) as answer:
                body = await answer.read()
                if answer.status != 200:
                    try:
                        reason = str(json.loads(body).get("message", answer.status))
                    except ValueError:
                        reason = str(answer.status)
                    if answer.status == 404:
                        raise NotFound(reason)
                    if answer.status == 403:
                        raise Forbidden(reason)
                    raise Conflict(f"{server} answered {answer.status}: {reason}")
        except (aiohttp.ClientError, TimeoutError) as exc:
            raise Conflict(f"{server} cannot be reached: {type(exc).__name__}") from None
        log.info("console_evidence", subject=actor.subject, server=server, message_id=message_id)
        return web.Response(
            body=body,
            content_type="application/zip",
            headers={
                "Content-Disposition": f'attachment; filename="evidence-{quote(message_id)}.zip"'
            },
        )

    async def audit_subject(self, request: web.Request) -> web.Response:
        self._auditor(request)
        subject = request.query.get("subject", "").strip()[:256]
        params = {
            "subject": subject,
            "since": request.query.get("since", "").strip()[:40],
            "until": request.query.get("until", "").strip()[:40],
        }
        found, failed = await self._records(request, params) if subject else ([], {})
        return self._page(
            request,
            "audit_subject.html",
            params=params,
            accesses=subject_report(found),
            failed=failed,
        )

    async def admin_log(self, request: web.Request) -> web.Response:
        actor = request[PRINCIPAL]
        # the newest entries, newest first
        last = (await self.gov.store.admin_head()).next_seq - 1
        entries = await self.gov.admin_log(
            actor, after=max(0, last - LOG_ENTRIES_SHOWN), limit=LOG_ENTRIES_SHOWN
        )
        verification = None
        with contextlib.suppress(Forbidden):  # member-scoped: their entries, unverified
            verification = await self.gov.verify_admin_log(actor)
        return self._page(
            request, "admin_log.html", entries=entries[::-1], verification=verification
        )
