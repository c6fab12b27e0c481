"""`gateway audit search | subject | trace`: the auditor's commands over security servers'
auditor APIs (see `security_server.auditor_api`).

- `search` prints one server's records matching the filters, as a table or `--json`.
- `subject` reports every access to one data subject's data, over one or more servers:
  time, client, service, purpose, agreement and result, one row per exchange.
- `trace` gathers the records of one message id from the consumer's and the provider's
  servers, checks that both sides logged the same signed headers, signatures and body
  digests, and prints the path with its timings.

Tokens come from `--token` or `GATEWAY_TOKEN`; they need the auditor role. Like the admin
CLI, this module meets the servers on the wire only.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from gateway_cli.admin import Column, render_table
from gateway_client.admin import TOKEN_VARIABLE, AdminApiError, AdminClient
from gateway_client.audit import subject_report, trace_checks

PATH = "/audit/v1/records"
FILTERS = ("message_id", "client", "service", "purpose", "status", "kind", "role", "since", "until")


class UsageError(Exception):
    """Bad input found after parsing: exit status 2."""


def records(
    client: AdminClient, params: dict[str, Any], *, page: int = 500, most: int | None = None
) -> Iterator[dict[str, Any]]:
    """Every record matching `params`, page after page (at most `most`)."""
    after = None
    given = 0
    while True:
        doc = client.get(PATH, {**params, "limit": page, "after": after})
        for item in doc["records"]:
            yield item
            given += 1
            if most is not None and given >= most:
                return
        after = doc.get("next")
        if not after:
            return


def _client(url: str, token: str) -> AdminClient:
    try:
        return AdminClient(url, token, what="the auditor API")
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _tokens(ns: argparse.Namespace) -> list[str]:
    """One token per `--url`: servers of another instance trust their own registry's
    tokens, so a trace across countries takes one `--token` per `--url`, in order; a single
    token (or GATEWAY_TOKEN) serves every URL."""
    given: list[str] = list(ns.token or [])
    if not given:
        given = [_token(ns)]
    if len(given) == 1:
        return given * len(ns.url)
    if len(given) != len(ns.url):
        raise UsageError(
            f"give one --token for all URLs, or one per --url ({len(ns.url)}), not {len(given)}"
        )
    return given


def _token(ns: argparse.Namespace) -> str:
    value = ns.token
    if isinstance(value, list):
        value = value[0] if value else None
    token: str | None = value or os.environ.get(TOKEN_VARIABLE)
    if not token:
        raise UsageError(
            f"no auditor token: pass --token or set {TOKEN_VARIABLE} "
            "(`gateway registry token --role auditor` issues one)"
        )
    return token


SEARCH_COLUMNS = (
    Column("LOGGED AT", lambda r: r["logged_at"], None),
    Column("RECORD", lambda r: f"{r['chain']}#{r['seq']}", None),
    Column("KIND", lambda r: r["kind"]),
    Column("ROLE", lambda r: r["role"]),
    Column("MESSAGE", lambda r: r["message_id"], None),
    Column("CLIENT", lambda r: r["client"]),
    Column("SERVICE", lambda r: r["service"]),
    Column("PURPOSE", lambda r: r["purpose"], 24),
    Column("STATUS", lambda r: r["error_code"] or r["status"]),
    Column(
        "VERIFIED",
        lambda r: "yes" if r["verified"] else "NO: " + "; ".join(r["problems"]),
        None,
    ),
)


def _search(ns: argparse.Namespace) -> int:
    client = _client(ns.url, _token(ns))
    params = {name: getattr(ns, name) for name in (*FILTERS, "subject")}
    found = list(
        records(client, params, page=min(ns.limit, 500), most=None if ns.all else ns.limit)
    )
    if ns.json:
        print(json.dumps(found, indent=1))
    else:
        print(render_table(SEARCH_COLUMNS, found) if found else "no records match")
    bad = [r for r in found if not r["verified"]]
    if bad:
        print(f"{len(bad)} record(s) do NOT verify", file=sys.stderr)
        return 1
    return 0


# ---- data-subject report --------------------------------------------------------------------


SUBJECT_COLUMNS = (
    Column("TIME", lambda a: a["time"], None),
    Column("CLIENT", lambda a: a["client"], None),
    Column("SERVICE", lambda a: a["service"], None),
    Column("PURPOSE", lambda a: a["purpose"], 30),
    Column("AGREEMENT", lambda a: a["agreement"], None),
    Column("RESULT", lambda a: a["result"]),
    Column("VERIFIED", lambda a: "yes" if a["verified"] else "NO"),
)


def _subject(ns: argparse.Namespace) -> int:
    found: list[tuple[str, dict[str, Any]]] = []
    params = {"subject": ns.subject, "since": ns.since, "until": ns.until}
    for url, token in zip(ns.url, _tokens(ns), strict=True):
        found += [(url, r) for r in records(_client(url, token), params)]
    report = [a.doc() for a in subject_report(found)]
    if ns.json:
        print(json.dumps({"subject": ns.subject, "accesses": report}, indent=1))
    else:
        print(f"Accesses to the data of subject {ns.subject!r}: {len(report)}")
        if report:
            print(render_table(SUBJECT_COLUMNS, report))
    return 0 if all(a["verified"] for a in report) else 1


# ---- trace ----------------------------------------------------------------------------------


def _ms(start: str, moment: str) -> float:
    return (datetime.fromisoformat(moment) - datetime.fromisoformat(start)).total_seconds() * 1000


def _trace(ns: argparse.Namespace) -> int:
    found: list[tuple[str, dict[str, Any]]] = []
    for url, token in zip(ns.url, _tokens(ns), strict=True):
        found += [(url, r) for r in records(_client(url, token), {"message_id": ns.message_id})]
    found.sort(key=lambda p: p[1]["logged_at"])
    checks = trace_checks(found) if found else [(False, "no server logged this message id")]
    ok = all(good for good, _ in checks)
    if ns.json:
        print(
            json.dumps(
                {
                    "message_id": ns.message_id,
                    "records": [{"server": url, **r} for url, r in found],
                    "checks": [{"ok": good, "check": text} for good, text in checks],
                    "consistent": ok,
                },
                indent=1,
            )
        )
        return 0 if ok else 1
    print(f"Trace of message {ns.message_id}")
    if found:
        first = found[0][1]
        print(
            f"  {first['client']} -> {first['service']}  purpose {first['purpose']}"
            f"  agreement {first.get('agreement_id') or '-'}"
        )
        start = first["logged_at"]
        for url, r in found:
            status = r["error_code"] or r["status"]
            print(
                f"  {_ms(start, r['logged_at']):+9.1f} ms  {r['role']:<8} {r['kind']:<8} "
                f"{status:<14} {url} {r['chain']}#{r['seq']}"
                f"  {'verified' if r['verified'] else 'NOT VERIFIED'}"
            )
    for good, text in checks:
        print(f"  {'OK ' if good else 'BAD'} {text}")
    print("consistent on both sides" if ok else "NOT consistent")
    return 0 if ok else 1


# ---- arguments ------------------------------------------------------------------------------


def _common(p: argparse.ArgumentParser, many: bool) -> None:
    help_url = "a security server's auditor API, http(s)://HOST:PORT"
    if many:
        p.add_argument(
            "--url", action="append", required=True, help=help_url + " (repeat for each server)"
        )
        p.add_argument(
            "--token",
            action="append",
            help=f"auditor token (default: ${TOKEN_VARIABLE}, which keeps it out of the process "
            "list); repeat it, in the order of --url, for servers of several instances",
        )
    else:
        p.add_argument("--url", required=True, help=help_url)
        p.add_argument(
            "--token",
            help=f"auditor token (default: ${TOKEN_VARIABLE}, which keeps it out of the process "
            "list)",
        )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def add_commands(aud: Any) -> None:
    p = aud.add_parser("search", help="search a security server's message log (auditor API)")
    _common(p, many=False)
    for name in FILTERS:
        p.add_argument(
            "--" + name.replace("_", "-"), dest=name, help=f"only records with this {name}"
        )
    p.add_argument("--subject", help="only records about this data subject (its identifier)")
    p.add_argument("--limit", type=int, default=50, help="most records shown (default 50)")
    p.add_argument("--all", action="store_true", help="every matching record, page after page")
    p.set_defaults(func=run(_search))
    p = aud.add_parser("subject", help="every access to one data subject's data")
    p.add_argument("subject", help="the data subject's identifier")
    _common(p, many=True)
    p.add_argument("--since", help="from this time (ISO 8601)")
    p.add_argument("--until", help="until this time (ISO 8601)")
    p.set_defaults(func=run(_subject))
    p = aud.add_parser("trace", help="one exchange across the consumer's and provider's logs")
    p.add_argument("message_id", help="the exchange's message id")
    _common(p, many=True)
    p.set_defaults(func=run(_trace))


def run(command: Any) -> Any:
    def wrapped(ns: argparse.Namespace) -> int:
        try:
            if getattr(ns, "limit", 1) < 1:
                raise UsageError("--limit must be at least 1")
            result: int = command(ns)
            return result
        except UsageError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except AdminApiError as exc:
            print(
                f"error: {exc.status or ''} {exc.kind}: {exc.message}".replace("  ", " "),
                file=sys.stderr,
            )
            return 2 if exc.status in (0, 400, 401, 403) else 1

    return wrapped
