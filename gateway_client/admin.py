"""A client of the registry's admin REST API, for `gateway admin`, the auditing commands
and the demo.

`AdminClient` is a small synchronous client over `urllib.request`, authenticated with one
bearer token. It decides nothing: every permission and every state check is the
registry's, and its refusals come back as `AdminApiError` with the status and the
registry's message. This package must never import the registry or aiohttp: it meets the
registry on the wire.
"""

from __future__ import annotations

import http.client
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterable
from datetime import datetime
from typing import Any

from gateway.agreements import RateLimit
from gateway.timeutil import format_time

DEFAULT_URL = "http://127.0.0.1:7080"
URL_VARIABLE = "GATEWAY_REGISTRY_URL"
TOKEN_VARIABLE = "GATEWAY_TOKEN"  # noqa: S105 - the name of a variable, not a secret


# ---- the client ----------------------------------------------------------------------------


class AdminApiError(Exception):
    """The admin API refused a request, or could not be reached (`status` 0, kind
    "unreachable"). `kind` and `message` are the API's `{"error", "message"}` body."""

    def __init__(self, status: int, kind: str, message: str) -> None:
        super().__init__(f"{status} {kind}: {message}")
        self.status = status
        self.kind = kind
        self.message = message


def _segment(text: str) -> str:
    """A path segment: identifiers keep their '/' (the API's routes accept them)."""
    return urllib.parse.quote(text, safe="/")


def _refusal(status: int, raw: bytes, reason: str) -> AdminApiError:
    """The error of a 4xx/5xx answer, from its JSON body when it has one."""
    try:
        doc = json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        doc = None
    if isinstance(doc, dict) and isinstance(doc.get("error"), str):
        return AdminApiError(status, doc["error"], str(doc.get("message", reason)))
    text = " ".join(raw.decode("utf-8", "replace").split())[:200]
    kind = reason.lower().replace(" ", "_") or "http_error"
    return AdminApiError(status, kind, text or reason or f"HTTP {status}")


class AdminClient:
    """A synchronous client of the admin API, authenticated with one bearer token."""

    def __init__(
        self, url: str, token: str, timeout: float = 10.0, *, what: str = "the registry"
    ) -> None:
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"the URL of {what} must be http:// or https://HOST:PORT, not {url!r}")
        self.what = what
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        url = self.url + path
        request = urllib.request.Request(  # noqa: S310 - the scheme is checked in __init__
            url,
            method=method,
            data=None if body is None else json.dumps(body).encode("utf-8"),
            headers={
                "Authorization": f"Bearer {self.token}",
                "Accept": "application/json",
                **({} if body is None else {"Content-Type": "application/json"}),
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:  # noqa: S310
                status, raw = response.status, response.read()
        except urllib.error.HTTPError as exc:
            try:
                raw = exc.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            raise _refusal(exc.code, raw, str(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:
            reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
            raise AdminApiError(
                0, "unreachable", f"cannot reach {self.what} at {self.url}: {reason}"
            ) from None
        try:
            return json.loads(raw) if raw else None
        except (ValueError, UnicodeDecodeError):
            raise AdminApiError(
                status, "bad_response", f"{method} {url} did not answer with JSON"
            ) from None

    def get(self, path: str, params: dict[str, Any] | None = None) -> Any:
        """GET `path`; `params` with a None value are left out of the query."""
        query = {k: v for k, v in (params or {}).items() if v is not None}
        return self._call("GET", path + (f"?{urllib.parse.urlencode(query)}" if query else ""))

    def post(self, path: str, body: dict[str, Any]) -> Any:
        return self._call("POST", path, body)

    # ---- the catalogue ----

    def members(self) -> Any:
        return self.get("/v1/members")

    def add_member(self, id: str, name: str) -> Any:
        return self.post("/v1/members", {"id": id, "name": name})

    def add_subsystem(self, id: str) -> Any:
        return self.post("/v1/subsystems", {"id": id})

    def servers(self) -> Any:
        return self.get("/v1/security-servers")

    def submit_server(
        self, id: str, address: str, auth_certificate_pem: str, subsystems: Iterable[str]
    ) -> Any:
        return self.post(
            "/v1/security-servers",
            {
                "id": id,
                "address": address,
                "auth_certificate": auth_certificate_pem,
                "subsystems": list(subsystems),
            },
        )

    def approve_server(self, id: str, reason: str) -> Any:
        return self.post(f"/v1/security-servers/{_segment(id)}/approve", {"reason": reason})

    def submit_auth_certificate(self, id: str, pem: str, reason: str = "") -> Any:
        return self.post(
            f"/v1/security-servers/{_segment(id)}/auth-certificates",
            {"auth_certificate": pem, "reason": reason},
        )

    def auth_certificate_action(self, id: str, sha256: str, action: str, reason: str) -> Any:
        """`action` is approve or retire."""
        return self.post(
            f"/v1/security-servers/{_segment(id)}/auth-certificates/{_segment(sha256)}/{action}",
            {"reason": reason},
        )

    def services(
        self, q: str | None = None, member: str | None = None, category: str | None = None
    ) -> Any:
        return self.get("/v1/services", {"q": q, "member": member, "category": category})

    def add_service(self, **fields: Any) -> Any:
        """Describe a service: id, description, and optionally methods, interface (the
        .proto source), data_categories, legal_basis, contact (see the NewService schema)."""
        return self.post(
            "/v1/services",
            {k: list(v) if isinstance(v, tuple) else v for k, v in fields.items()},
        )

    # ---- agreements ----

    def agreements(self, state: str | None = None, member: str | None = None) -> Any:
        return self.get("/v1/agreements", {"state": state, "member": member})

    def agreement(self, id: str) -> Any:
        return self.get(f"/v1/agreements/{_segment(id)}")

    def request_agreement(
        self,
        client: str,
        service: str,
        purposes: Iterable[str],
        legal_basis_kind: str,
        legal_basis_reference: str,
        data_categories: Iterable[str] = (),
        valid_from: datetime | str | None = None,
        valid_until: datetime | str | None = None,
        rate_limit: RateLimit | None = None,
        reason: str = "",
    ) -> Any:
        """Ask for an agreement as the consumer; it starts as requested."""
        body: dict[str, Any] = {
            "client": client,
            "service": service,
            "purposes": list(purposes),
            "legal_basis": {"kind": legal_basis_kind, "reference": legal_basis_reference},
            "data_categories": list(data_categories),
            "reason": reason,
        }
        for key, moment in (("valid_from", valid_from), ("valid_until", valid_until)):
            if moment is not None:
                body[key] = format_time(moment) if isinstance(moment, datetime) else moment
        if rate_limit is not None:
            body["rate_limit"] = {
                "requests": rate_limit.requests,
                "per_seconds": rate_limit.per_seconds,
            }
        return self.post("/v1/agreements", body)

    def act(self, id: str, action: str, reason: str = "") -> Any:
        """approve, reject, suspend, resume or revoke an agreement."""
        return self.post(f"/v1/agreements/{_segment(id)}/{_segment(action)}", {"reason": reason})

    # ---- federation ----

    def federations(self) -> Any:
        return self.get("/v1/federations")

    def federate(self, anchor: dict[str, Any], reason: str) -> Any:
        """Import another instance's anchor (its `gateway registry anchor` JSON)."""
        return self.post("/v1/federations", {"anchor": anchor, "reason": reason})

    def end_federation(self, instance: str, reason: str) -> Any:
        return self.post(f"/v1/federations/{_segment(instance)}/end", {"reason": reason})

    # ---- outbound approvals ----

    def outbound_approvals(self) -> Any:
        return self.get("/v1/outbound-approvals")

    def request_outbound(
        self, client: str, service: str, purposes: Iterable[str], agreement: str, reason: str = ""
    ) -> Any:
        """Ask for the approval of a subsystem's calls to a federated instance's service."""
        return self.post(
            "/v1/outbound-approvals",
            {
                "client": client,
                "service": service,
                "purposes": list(purposes),
                "agreement": agreement,
                "reason": reason,
            },
        )

    def act_outbound(self, id: str, action: str, reason: str = "") -> Any:
        """approve or revoke an outbound approval."""
        return self.post(
            f"/v1/outbound-approvals/{_segment(id)}/{_segment(action)}", {"reason": reason}
        )

    # ---- the admin log ----

    def admin_log(self, after: int = 0, limit: int = 100) -> Any:
        return self.get("/v1/admin-log", {"after": after, "limit": limit})

    def verify_admin_log(self) -> Any:
        return self.get("/v1/admin-log/verify")
