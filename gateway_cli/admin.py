"""`gateway admin`: a command-line client of the registry's admin REST API.

For registry administrators and member administrators: the catalogue (members,
subsystems, security servers, services), the data-sharing agreement workflow, federation
with other instances, outbound approvals and the admin log. `add_admin_commands`
registers the `gateway admin` subcommands on top of `gateway_client.admin.AdminClient`.

The client decides nothing: every permission and every state check is the registry's,
and its refusals are shown as they come (`error (403 forbidden): ...`, exit status 1).
This module must never import the registry or aiohttp; it meets the registry on the wire.

Exit status: 0 done, 1 refused by the registry, registry unreachable or admin log broken,
2 bad usage (including no token).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gateway.agreements import AgreementState, LegalBasisKind, RateLimit
from gateway.workflow import Action
from gateway_client.admin import (
    DEFAULT_URL,
    TOKEN_VARIABLE,
    URL_VARIABLE,
    AdminApiError,
    AdminClient,
)

# ---- output --------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Column:
    header: str
    value: Callable[[dict[str, Any]], Any]
    # longer cells are cut with '…'; None for identifiers, which people copy whole
    width: int | None = 40


def _text(value: Any) -> str:
    """One line of text for a value of the API's JSON."""
    if value is None or value == "":
        return "-"
    if isinstance(value, list):
        return ", ".join(_text(v) for v in value) or "-"
    if isinstance(value, dict):
        return ", ".join(f"{_printable(str(k))}={_text(v)}" for k, v in value.items())
    return _printable(" ".join(str(value).split()))


def _printable(text: str) -> str:
    """`text` with control and format characters shown as escapes: reasons and names are
    other people's text, and an escape sequence in one would move a terminal's cursor and
    rewrite what the reader sees (a forged log line, say)."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


def _clip(text: str, width: int | None) -> str:
    return text if width is None or len(text) <= width else text[: width - 1] + "…"


def render_table(columns: Sequence[Column], rows: Iterable[dict[str, Any]]) -> str:
    """Aligned columns under a header line; the last column is not padded."""
    cells = [[_clip(_text(c.value(row)), c.width) for c in columns] for row in rows]
    widths = [
        max([len(c.header), *(len(line[i]) for line in cells)]) for i, c in enumerate(columns)
    ]
    lines = [[c.header for c in columns], *cells]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def render_fields(doc: dict[str, Any]) -> str:
    """`key: value` lines, aligned; long multi-line values (a .proto) are summarised."""
    width = max((len(k) for k in doc), default=0) + 1
    out = []
    for key, value in doc.items():
        if isinstance(value, str) and value.count("\n") > 1:
            text = f"({value.count(chr(10)) + 1} lines; see --json)"
        else:
            text = _text(value)
        out.append(f"{key + ':':<{width}} {text}")
    return "\n".join(out)


def _when(value: Any) -> Any:
    """A canonical timestamp to the second, for tables."""
    if isinstance(value, str) and len(value) == 27 and value.endswith("Z") and value[19] == ".":
        return value[:19] + "Z"
    return value


def _agreement_fields(doc: dict[str, Any]) -> dict[str, Any]:
    basis, limit = doc.get("legal_basis"), doc.get("rate_limit")
    return doc | {
        "legal_basis": None if not basis else f"{basis['kind']}: {basis['reference']}",
        "rate_limit": None
        if not limit
        else f"{limit['requests']} requests per {limit['per_seconds']} s",
    }


def _transition(entry: dict[str, Any]) -> str:
    before, after = entry.get("from_state"), entry.get("to_state")
    return f"{before or ''}→{after or ''}" if before or after else ""


MEMBERS = [
    Column("ID", lambda r: r["id"], None),
    Column("NAME", lambda r: r["name"], 50),
    Column("SUBSYSTEMS", lambda r: r.get("subsystems"), 60),
]
SERVERS = [
    Column("ID", lambda r: r["id"], None),
    Column("STATUS", lambda r: r.get("status")),
    Column("ADDRESS", lambda r: r.get("address")),
    Column("SUBSYSTEMS", lambda r: r.get("subsystems")),
    Column("SUBMITTED", lambda r: _when(r.get("submitted_at"))),
    Column("AUTH CERTIFICATE", lambda r: (r.get("auth_certificate_sha256") or "")[:16]),
    Column(
        "NEXT",
        lambda r: ", ".join(
            f"{c['sha256'][:16]} {c['state']}" for c in r.get("next_auth_certificates") or ()
        ),
    ),
]
SERVICES = [
    Column("ID", lambda r: r["id"], None),
    Column("DESCRIPTION", lambda r: r.get("description"), 50),
    Column("CATEGORIES", lambda r: r.get("data_categories"), 30),
    Column("METHODS", lambda r: len(r.get("methods") or []) or "any"),
]
AGREEMENTS = [
    Column("ID", lambda r: r["id"], None),
    Column("STATE", lambda r: r.get("state"), None),
    Column("CLIENT", lambda r: r.get("client"), None),
    Column("SERVICE", lambda r: r.get("service"), None),
    Column("PURPOSES", lambda r: r.get("purposes"), 40),
    Column("VALID UNTIL", lambda r: _when(r.get("valid_until"))),
]
FEDERATIONS = [
    Column("INSTANCE", lambda r: r["instance"], None),
    Column("STATE", lambda r: r.get("state"), None),
    Column("SINCE", lambda r: _when(r.get("since"))),
    Column("ENDED", lambda r: _when(r.get("ended_at"))),
    Column("ADDRESSES", lambda r: r.get("addresses"), 40),
    Column("REASON", lambda r: r.get("reason"), 60),
]
OUTBOUND = [
    Column("ID", lambda r: r["id"], None),
    Column("STATE", lambda r: r.get("state"), None),
    Column("CLIENT", lambda r: r.get("client"), None),
    Column("SERVICE", lambda r: r.get("service"), None),
    Column("PURPOSES", lambda r: r.get("purposes"), 40),
    Column("AGREEMENT", lambda r: r.get("agreement"), None),
]
LOG = [
    Column("SEQ", lambda r: r["seq"]),
    Column("TIME", lambda r: _when(r.get("logged_at"))),
    Column("ACTOR", lambda r: r.get("actor"), 32),
    Column("ACTION", lambda r: r.get("action")),
    Column("TARGET", lambda r: r.get("target"), None),
    Column("FROM→TO", _transition, None),
    Column("REASON", lambda r: r.get("reason"), 60),
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Shown:
    """What a command prints: the API's answer with --json, else `text`; and its exit status."""

    doc: Any
    text: str
    status: int = 0


def _table(doc: Any, columns: Sequence[Column]) -> Shown:
    return Shown(doc=doc, text=render_table(columns, doc))


def _fields(doc: Any, view: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> Shown:
    return Shown(doc=doc, text=render_fields(view(doc)))


# ---- commands -------------------------------------------------------------------------------


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise _UsageError(f"cannot read the {what} {path}: {exc}") from None


class _UsageError(Exception):
    """Bad input found after parsing (an unreadable file, no token): exit status 2."""


def _members_list(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _table(c.members(), MEMBERS)


def _members_add(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.add_member(ns.id, ns.name))


def _subsystems_add(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.add_subsystem(ns.id))


def _servers_list(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _table(c.servers(), SERVERS)


def _servers_submit(c: AdminClient, ns: argparse.Namespace) -> Shown:
    pem = _read(ns.certificate, "certificate")
    return _fields(c.submit_server(ns.id, ns.address, pem, ns.subsystem))


def _servers_approve(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.approve_server(ns.id, ns.reason))


def _servers_renew(c: AdminClient, ns: argparse.Namespace) -> Shown:
    pem = _read(ns.certificate, "certificate")
    return _fields(c.submit_auth_certificate(ns.id, pem, ns.reason))


def _servers_approve_certificate(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.auth_certificate_action(ns.id, ns.sha256, "approve", ns.reason))


def _servers_retire_certificate(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.auth_certificate_action(ns.id, ns.sha256, "retire", ns.reason))


def _services_search(c: AdminClient, ns: argparse.Namespace) -> Shown:
    found = c.services(
        q=getattr(ns, "text", None),
        member=getattr(ns, "member", None),
        category=getattr(ns, "category", None),
    )
    return _table(found, SERVICES)


def _streams(given: list[str]) -> dict[str, str]:
    """--stream METHOD=KIND values as the API takes them."""
    streams = {}
    for value in given:
        method, equals, kind = value.rpartition("=")
        if not equals or not method:
            raise _UsageError(f"--stream {value!r}: write METHOD=KIND, e.g. /pkg.Svc/Export=server")
        streams[method] = kind
    return streams


def _services_add(c: AdminClient, ns: argparse.Namespace) -> Shown:
    fields: dict[str, Any] = {
        "id": ns.id,
        "description": ns.description,
        "methods": ns.method,
        "streams": _streams(ns.stream),
        "data_categories": ns.category,
        "legal_basis": ns.legal_basis,
        "contact": ns.contact,
    }
    if ns.interface is not None:
        fields["interface"] = _read(ns.interface, "interface")
    return _fields(c.add_service(**fields))


def _agreements_list(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _table(c.agreements(state=ns.state, member=ns.member), AGREEMENTS)


def _agreements_show(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.agreement(ns.id), _agreement_fields)


def _agreements_request(c: AdminClient, ns: argparse.Namespace) -> Shown:
    created = c.request_agreement(
        client=ns.client,
        service=ns.service,
        purposes=ns.purpose,
        legal_basis_kind=ns.basis,
        legal_basis_reference=ns.reference,
        data_categories=ns.category,
        valid_from=ns.valid_from,
        valid_until=ns.valid_until,
        rate_limit=ns.rate,
        reason=ns.reason,
    )
    return _fields(created, _agreement_fields)


def _agreements_act(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.act(ns.id, ns.agreement_action, ns.reason), _agreement_fields)


def _federation_fields(doc: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in doc.items() if k != "anchor"}


def _federations_list(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _table(c.federations(), FEDERATIONS)


def _federations_add(c: AdminClient, ns: argparse.Namespace) -> Shown:
    text = _read(ns.anchor, "anchor")
    try:
        anchor = json.loads(text)
    except ValueError as exc:
        raise _UsageError(f"the anchor {ns.anchor} is not JSON: {exc}") from None
    if not isinstance(anchor, dict):
        raise _UsageError(f"the anchor {ns.anchor} is not a JSON object")
    return _fields(c.federate(anchor, ns.reason), _federation_fields)


def _federations_end(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.end_federation(ns.instance, ns.reason), _federation_fields)


def _outbound_list(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _table(c.outbound_approvals(), OUTBOUND)


def _outbound_request(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.request_outbound(ns.client, ns.service, ns.purpose, ns.agreement, ns.reason))


def _outbound_act(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _fields(c.act_outbound(ns.id, ns.outbound_action, ns.reason))


def _log_list(c: AdminClient, ns: argparse.Namespace) -> Shown:
    return _table(c.admin_log(after=ns.after, limit=ns.limit), LOG)


def _log_verify(c: AdminClient, ns: argparse.Namespace) -> Shown:
    verdict = c.verify_admin_log()
    if verdict.get("verified"):
        text = f"admin log verified: {verdict['entries']} entries, last hash {verdict['last_hash']}"
        return Shown(doc=verdict, text=text)
    return Shown(doc=verdict, text=f"admin log BROKEN: {verdict.get('error')}", status=1)


def _run(ns: argparse.Namespace) -> int:
    """Run one `gateway admin` command: the registry's refusals exit 1, bad usage 2."""
    url = ns.admin_url or os.environ.get(URL_VARIABLE) or DEFAULT_URL
    token = ns.admin_token or os.environ.get(TOKEN_VARIABLE)
    try:
        if not token:
            raise _UsageError(
                f"no admin API token: pass --token or set {TOKEN_VARIABLE} "
                "(`gateway registry token` issues one)"
            )
        try:
            client = AdminClient(url, token)
        except ValueError as exc:
            raise _UsageError(str(exc)) from None
        shown: Shown = ns.admin_command(client, ns)
    except _UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AdminApiError as exc:
        where = f"{exc.status} {exc.kind}" if exc.status else exc.kind
        print(f"error ({where}): {exc.message}", file=sys.stderr)
        return 1
    print(json.dumps(shown.doc, indent=2, ensure_ascii=False) if ns.admin_json else shown.text)
    return shown.status


# ---- the argument parser --------------------------------------------------------------------


def _rate(text: str) -> RateLimit:
    requests, slash, seconds = text.partition("/")
    try:
        limit = RateLimit(requests=int(requests), per_seconds=int(seconds))
    except ValueError:
        limit = None
    if not slash or limit is None or limit.requests < 1 or limit.per_seconds < 1:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give REQUESTS/SECONDS, for example 100/60 (100 requests per minute)"
        )
    return limit


def _global_options(suppress: bool) -> argparse.ArgumentParser:
    """--url, --token, --json: accepted after `admin` and after any of its commands."""
    parser = argparse.ArgumentParser(add_help=False)
    default = argparse.SUPPRESS if suppress else None
    parser.add_argument(
        "--url",
        dest="admin_url",
        metavar="URL",
        default=default,
        help=f"the admin API (default: ${URL_VARIABLE}, else {DEFAULT_URL})",
    )
    parser.add_argument(
        "--token",
        dest="admin_token",
        metavar="TOKEN",
        default=default,
        help=f"bearer token (default: ${TOKEN_VARIABLE}, which keeps it out of the process list)",
    )
    parser.add_argument(
        "--json",
        dest="admin_json",
        action="store_true",
        default=argparse.SUPPRESS if suppress else False,
        help="print the API's JSON instead of a table",
    )
    return parser


def add_admin_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Register `gateway admin` and its subcommands on the `gateway` command's subparsers."""
    options = _global_options(suppress=True)
    admin = commands.add_parser(
        "admin",
        parents=[_global_options(suppress=False)],
        help="administer the registry through its admin API",
        description="A client of the registry's admin REST API, for registry and member "
        "administrators. What a token may do is decided by the registry.",
        epilog="Exit status: 0 done, 1 refused by the registry or unreachable, 2 bad usage.",
    )
    groups = admin.add_subparsers(dest="admin_group", required=True, metavar="GROUP")

    def group(name: str, help: str) -> argparse._SubParsersAction[argparse.ArgumentParser]:
        parser = groups.add_parser(name, help=help, description=help)
        return parser.add_subparsers(dest="admin_action", required=True, metavar="ACTION")

    def leaf(
        where: argparse._SubParsersAction[argparse.ArgumentParser],
        name: str,
        command: Callable[[AdminClient, argparse.Namespace], Shown],
        help: str,
    ) -> argparse.ArgumentParser:
        parser = where.add_parser(name, parents=[options], help=help, description=help)
        parser.set_defaults(func=_run, admin_command=command)
        return parser

    g = group("members", "members (agencies) and their subsystems")
    leaf(g, "list", _members_list, "list members and their subsystems")
    p = leaf(g, "add", _members_add, "register a member (registry administrator)")
    p.add_argument("id", metavar="ID", help="INSTANCE/CLASS/CODE, e.g. UY/GOV/MSP")
    p.add_argument("--name", required=True, help="the member's official name")

    g = group("subsystems", "subsystems of members")
    p = leaf(g, "add", _subsystems_add, "add a subsystem to a member")
    p.add_argument("id", metavar="ID", help="INSTANCE/CLASS/CODE/SUBSYSTEM")

    g = group("servers", "security servers")
    leaf(g, "list", _servers_list, "list security servers, pending and approved")
    p = leaf(g, "submit", _servers_submit, "submit a security server for approval")
    p.add_argument("--id", required=True, help="INSTANCE/CLASS/CODE/SERVERCODE")
    p.add_argument("--address", required=True, help="host:port of its provider endpoint")
    p.add_argument(
        "--certificate",
        type=Path,
        required=True,
        metavar="PEM_FILE",
        help="its TLS authentication certificate",
    )
    p.add_argument(
        "--subsystem",
        action="append",
        required=True,
        help="a subsystem it hosts (repeat for several)",
    )
    p = leaf(g, "approve", _servers_approve, "approve a pending server (registry administrator)")
    p.add_argument("id", metavar="ID", help="the server id")
    p.add_argument("--reason", required=True, help="what was checked, for the admin log")
    p = leaf(
        g,
        "renew",
        _servers_renew,
        "register a server's next authentication certificate (pending until a registry "
        "administrator approves it; then peers accept either)",
    )
    p.add_argument("id", metavar="ID", help="the server id")
    p.add_argument(
        "--certificate", type=Path, required=True, metavar="PEM_FILE", help="the new certificate"
    )
    p.add_argument("--reason", default="", help="why, for the admin log")
    for name, run, what in (
        (
            "approve-certificate",
            _servers_approve_certificate,
            "approve a pending next authentication certificate (registry administrator)",
        ),
        (
            "retire-certificate",
            _servers_retire_certificate,
            "take an authentication "
            "certificate out of the configuration (the first only once a next one is approved)",
        ),
    ):
        p = leaf(g, name, run, what)
        p.add_argument("id", metavar="ID", help="the server id")
        p.add_argument("sha256", metavar="SHA256", help="the certificate's SHA-256 (servers list)")
        p.add_argument("--reason", required=True, help="why, for the admin log")

    g = group("services", "the service catalogue")
    leaf(g, "list", _services_search, "list every service")
    p = leaf(g, "search", _services_search, "search the catalogue")
    p.add_argument("--text", help="text in the id, description or legal basis")
    p.add_argument("--member", help="the providing member")
    p.add_argument("--category", help="a data category")
    p = leaf(g, "add", _services_add, "describe a service in the catalogue")
    p.add_argument("--id", required=True, help="INSTANCE/CLASS/CODE/SUBSYSTEM/SERVICE[/VERSION]")
    p.add_argument("--description", required=True, help="what the service gives")
    p.add_argument(
        "--method",
        action="append",
        default=[],
        metavar="M",
        help="a full gRPC method path, e.g. /pkg.Service/Method (repeat; none: any method)",
    )
    p.add_argument(
        "--stream",
        action="append",
        default=[],
        metavar="M=KIND",
        help="a streaming method among them and its kind: server, client or bidi (repeat)",
    )
    p.add_argument("--interface", type=Path, metavar="PROTO_FILE", help="its .proto source")
    p.add_argument(
        "--category", action="append", default=[], metavar="C", help="a data category (repeat)"
    )
    p.add_argument("--legal-basis", default="", metavar="TEXT", help="the law it rests on")
    p.add_argument("--contact", default="", metavar="TEXT", help="who answers questions")

    g = group("agreements", "data-sharing agreements and their workflow")
    p = leaf(g, "list", _agreements_list, "list the agreements this token may see")
    p.add_argument("--state", choices=[s.value for s in AgreementState], help="only this state")
    p.add_argument("--member", help="only where this member is a party")
    p = leaf(g, "show", _agreements_show, "show one agreement")
    p.add_argument("id", metavar="ID", help="the agreement id")
    p = leaf(g, "request", _agreements_request, "request an agreement (consumer's administrator)")
    p.add_argument("--client", required=True, help="the consumer subsystem")
    p.add_argument("--service", required=True, help="the service id")
    p.add_argument(
        "--purpose",
        action="append",
        required=True,
        metavar="P",
        help="a purpose the calls will declare (repeat for several)",
    )
    p.add_argument(
        "--basis", required=True, choices=[k.value for k in LegalBasisKind], help="legal basis"
    )
    p.add_argument(
        "--reference", required=True, metavar="TEXT", help="the law, consent or contract"
    )
    p.add_argument(
        "--category", action="append", default=[], metavar="C", help="a data category (repeat)"
    )
    p.add_argument("--valid-from", metavar="TIME", help="RFC 3339, e.g. 2026-07-01T00:00:00Z")
    p.add_argument("--valid-until", metavar="TIME", help="RFC 3339; none: until revoked")
    p.add_argument("--rate", type=_rate, metavar="REQUESTS/SECONDS", help="rate limit, e.g. 100/60")
    p.add_argument("--reason", default="", help="why, for the admin log")
    for action, help in (
        (Action.APPROVE, "approve as provider or registry"),
        (Action.REJECT, "reject a pending request"),
        (Action.SUSPEND, "suspend an active agreement"),
        (Action.RESUME, "resume a suspended agreement"),
        (Action.REVOKE, "revoke for good"),
    ):
        p = leaf(g, action.value, _agreements_act, help)
        p.set_defaults(agreement_action=action.value)
        p.add_argument("id", metavar="ID", help="the agreement id")
        required = action in (Action.REJECT, Action.SUSPEND, Action.REVOKE)
        p.add_argument(
            "--reason",
            required=required,
            default="",
            help="why (required)" if required else "why, for the admin log",
        )

    g = group("federations", "federation with other instances (registry administrators)")
    leaf(g, "list", _federations_list, "list the instances this one federates with")
    p = leaf(g, "add", _federations_add, "federate with an instance by importing its anchor")
    p.add_argument(
        "--anchor",
        type=Path,
        required=True,
        metavar="FILE",
        help="the other instance's anchor (JSON, from its `gateway registry anchor`)",
    )
    p.add_argument("--reason", required=True, help="why (the treaty, the decision), for the log")
    p = leaf(g, "end", _federations_end, "end the federation with an instance")
    p.add_argument("instance", metavar="INSTANCE", help="the other instance's code, e.g. AR")
    p.add_argument("--reason", required=True, help="why (required)")

    g = group("outbound", "outbound approvals: this instance's consent to cross-border calls")
    leaf(g, "list", _outbound_list, "list the outbound approvals this token may see")
    p = leaf(g, "request", _outbound_request, "ask to call a federated instance's service")
    p.add_argument("--client", required=True, help="the consumer subsystem, of this instance")
    p.add_argument("--service", required=True, help="the service, of a federated instance")
    p.add_argument(
        "--purpose",
        action="append",
        required=True,
        metavar="P",
        help="a purpose the calls will declare (repeat for several)",
    )
    p.add_argument(
        "--agreement", required=True, metavar="ID", help="the agreement's id at the provider"
    )
    p.add_argument("--reason", required=True, help="why, for the admin log")
    for verb, help in (
        ("approve", "approve a requested outbound approval (registry administrator)"),
        ("revoke", "revoke an outbound approval"),
    ):
        p = leaf(g, verb, _outbound_act, help)
        p.set_defaults(outbound_action=verb)
        p.add_argument("id", metavar="ID", help="the outbound approval id")
        p.add_argument("--reason", required=True, help="why (required)")

    g = group("log", "the registry's admin log")
    p = leaf(g, "list", _log_list, "the entries this token may see, in order")
    p.add_argument("--after", type=int, default=0, metavar="N", help="entries after this seq")
    p.add_argument("--limit", type=int, default=100, metavar="N", help="at most (up to 1000)")
    leaf(g, "verify", _log_verify, "verify the admin log's hash chain")
