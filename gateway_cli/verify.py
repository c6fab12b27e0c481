"""What `gateway audit verify` trusts, and the checkpoints it compares a log with.

- Trust anchors: `--ca` PEM files, or the instance anchor (`--anchor anchor.json`) through
  a configuration it verifies: a saved one (`--configuration`: a security server's
  `STATE_DIR/configuration-parts` folder, or a whole signed configuration such as an older
  server's `STATE_DIR/configuration.json`) or the current one fetched from the anchor's
  registry addresses. Never the certificates kept in the log being checked.
- Checkpoints: from the registry's admin API (`--checkpoints URL --server ID`, auditor
  token) or from a file that `gateway audit checkpoints` exported.

Meets the registry on the wire only, like the rest of the CLI.
"""

from __future__ import annotations

import argparse
import base64
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptography import x509

from gateway.checkpoint import Received
from gateway.configuration import Anchor, SignedConfiguration, verify_configuration
from gateway.errors import ConfigurationError
from gateway.identifiers import SecurityServerId
from gateway_client.admin import TOKEN_VARIABLE, AdminApiError, AdminClient

if TYPE_CHECKING:
    from security_server.audit import VerifyReport

CHECKPOINTS_PATH = "/v1/checkpoints"
EXPORT_FORMAT = "gateway-checkpoints/1"


class TrustInputError(Exception):
    """An anchor, configuration or checkpoint source cannot be used: exit status 2."""


def anchor_cas(anchor_file: Path, configuration_file: Path | None) -> list[x509.Certificate]:
    """The CA certificates of the instance whose anchor is `anchor_file`, from a signed
    configuration that the anchor verifies (saved, or fetched from the anchor's addresses)."""
    try:
        anchor = Anchor.from_json(json.loads(anchor_file.read_text()))
    except (OSError, ValueError) as exc:
        raise TrustInputError(f"cannot read the anchor {anchor_file}: {exc}") from None
    except ConfigurationError as exc:
        raise TrustInputError(f"{anchor_file}: {exc.message}") from None
    try:
        if configuration_file is not None and configuration_file.is_dir():
            # a server's configuration in parts (STATE_DIR/configuration-parts)
            from security_server.config_client import read_parts

            try:
                config = read_parts(configuration_file, anchor).config
            except (OSError, ValueError, KeyError, TypeError) as exc:
                raise TrustInputError(
                    f"cannot read the configuration parts in {configuration_file}: {exc}"
                ) from None
        else:
            signed = (
                _saved_configuration(configuration_file)
                if configuration_file is not None
                else _fetch_configuration(anchor)
            )
            config = verify_configuration(signed, anchor)
    except ConfigurationError as exc:
        raise TrustInputError(exc.message) from None
    # expiry does not matter here: the CAs an old log was stamped under are what counts
    return [x509.load_der_x509_certificate(c) for c in config.ca_certificates]


def _saved_configuration(path: Path) -> SignedConfiguration:
    try:
        doc = json.loads(path.read_text())
        return SignedConfiguration(
            content=base64.b64decode(doc["content"]),
            signature=base64.b64decode(doc["signature"]),
            signer_certificate=base64.b64decode(doc["signer_certificate"]),
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise TrustInputError(f"cannot read the configuration {path}: {exc}") from None


def _fetch_configuration(anchor: Anchor) -> SignedConfiguration:
    import grpc

    from gateway.configuration import MAX_CONFIGURATION_BYTES
    from gateway.v1 import configuration_pb2 as pb
    from security_server.config_client import signed_from_message

    problems = []
    for address in anchor.addresses:
        options = [("grpc.max_receive_message_length", MAX_CONFIGURATION_BYTES)]
        with grpc.insecure_channel(address, options=options) as channel:
            fetch = channel.unary_unary(
                "/gateway.v1.Configuration/Fetch",
                request_serializer=pb.FetchRequest.SerializeToString,
                response_deserializer=pb.SignedConfiguration.FromString,
            )
            try:
                answer = fetch(pb.FetchRequest(instance=anchor.instance), timeout=10)
            except grpc.RpcError as exc:
                problems.append(f"{address}: {exc.code().name}")
                continue
        try:
            return signed_from_message(answer, MAX_CONFIGURATION_BYTES)
        except ConfigurationError as exc:
            problems.append(f"{address}: {exc.message}")
    raise TrustInputError(
        "cannot fetch the instance's configuration from the anchor's addresses ("
        + "; ".join(problems)
        + "); give a saved one with --configuration"
    )


def _client(url: str, token: str | None) -> AdminClient:
    import os

    token = token or os.environ.get(TOKEN_VARIABLE)
    if not token:
        raise TrustInputError(
            f"reading checkpoints from the registry needs an auditor token: --token or "
            f"{TOKEN_VARIABLE}"
        )
    try:
        return AdminClient(url, token, what="the registry's admin API")
    except ValueError as exc:
        raise TrustInputError(str(exc)) from None


def fetch_checkpoints(url: str, token: str | None, server: str) -> list[dict[str, Any]]:
    """Every checkpoint the registry at `url` received from `server`, oldest first."""
    client = _client(url, token)
    found: list[dict[str, Any]] = []
    after = 0
    try:
        while True:
            page = client.get(CHECKPOINTS_PATH, {"server": server, "after": after, "limit": 1000})
            found += list(page["checkpoints"])
            if not page.get("next"):
                return found
            if int(page["next"]) <= after:  # it would be asked for the same page forever
                raise TrustInputError("the registry's pages of checkpoints do not move forward")
            after = int(page["next"])
    except AdminApiError as exc:
        raise TrustInputError(f"the registry refused: {exc.status} {exc.message}") from None
    except (KeyError, TypeError, ValueError) as exc:
        raise TrustInputError(
            f"the registry's answer is not a page of checkpoints ({type(exc).__name__})"
        ) from None


def load_checkpoints(
    source: str, *, server: str | None, token: str | None
) -> tuple[str, list[Received]]:
    """(server, checkpoints) from a registry URL (`server` needed) or an exported file."""
    if source.startswith(("http://", "https://")):
        if not server:
            raise TrustInputError("--checkpoints URL needs --server, the log's security server")
        _check_server(server)
        docs = fetch_checkpoints(source, token, server)
    else:
        try:
            doc = json.loads(Path(source).read_text())
        except (OSError, ValueError) as exc:
            raise TrustInputError(f"cannot read checkpoints from {source}: {exc}") from None
        if not isinstance(doc, dict) or doc.get("format") != EXPORT_FORMAT:
            raise TrustInputError(f"{source} is not a `gateway audit checkpoints` export")
        if server and server != doc.get("server"):
            raise TrustInputError(f"{source} holds the checkpoints of {doc.get('server')}")
        server = str(doc.get("server"))
        docs = list(doc.get("checkpoints", []))
    try:
        received = [Received.from_json(d) for d in docs]
    except ValueError as exc:
        raise TrustInputError(str(exc)) from None
    if any(str(r.checkpoint.server) != server for r in received):
        raise TrustInputError("the checkpoints are not all of the server asked for")
    return server, received


def checkpoint_lines(report: VerifyReport, server: str | None) -> list[str]:
    """What `audit verify` says of the checkpoints: a warning when none were given, or
    when a chain holding records has none (no checkpoint vouches for any of its records:
    a wrong --server, or a server cut off from the registry), else the last one per chain."""
    if report.checkpoints is None:
        return [
            "WARNING: no checkpoints given (--checkpoints): a cut tail or a rewrite of the "
            "whole chain after its last time-stamp cannot be seen"
        ]
    lines = [f"checkpoints: the log agrees with all {report.checkpoints} of {server}"]
    for chain, head in sorted(report.heads.items()):
        last = report.last_checkpoint.get(chain)
        if last is not None:
            lines.append(
                f"  chain {chain}: last checkpoint at record {last.checkpoint.seq}, "
                f"received {last.received_at.isoformat()}; records after it are not vouched for"
            )
        elif head.next_seq > 1:
            lines.append(
                f"WARNING: chain {chain} has {head.next_seq - 1} record(s) but the registry "
                f"holds no checkpoint of it from {server}: none of its records is vouched for "
                "(is --server the log's own server? was it cut off from the registry?)"
            )
    return lines


def _check_server(server: str) -> None:
    try:
        SecurityServerId.parse(server)
    except Exception as exc:  # the identifier's own error says what is malformed
        raise TrustInputError(f"--server: {exc}") from None


def export_checkpoints(ns: argparse.Namespace) -> int:
    """`gateway audit checkpoints`: write a server's checkpoints to a JSON file."""
    try:
        _check_server(ns.server)
        docs = fetch_checkpoints(ns.url, ns.token, ns.server)
    except TrustInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = {"format": EXPORT_FORMAT, "server": ns.server, "checkpoints": docs}
    text = json.dumps(out, indent=1)
    if ns.out is None:
        print(text)
    else:
        ns.out.write_text(text)
        print(f"wrote {ns.out}: {len(docs)} checkpoint(s) of {ns.server}")
    return 0


def add_export_command(aud: Any) -> None:
    p = aud.add_parser(
        "checkpoints",
        help="export the checkpoints the registry received from a security server (JSON)",
    )
    p.add_argument("--url", required=True, help="the registry's admin API, http(s)://HOST:PORT")
    p.add_argument("--server", required=True, help="the security server, INSTANCE/CLASS/CODE/ID")
    p.add_argument("--token", help=f"auditor token (default: ${TOKEN_VARIABLE})", default=None)
    p.add_argument("--out", type=Path, help="the file to write (default: standard output)")
    p.set_defaults(func=export_checkpoints)
