"""Evidence bundles of a real exchange: exported, verified offline, checked by OpenSSL, tampered.

One topology (registry, OCSP responder, TSA, security servers, backends as real processes)
with bodies stored; one call through ss-msp to the identity service; the bundle of that
exchange is exported from both servers' logs with `gateway audit export`, and then:
`gateway audit verify-bundle` accepts it, OpenSSL verifies every signature, OCSP answer and
time-stamp token in it (run here, as VERIFY.md tells an auditor), and any edit of the body,
the signature, the token or the proof fails verification naming that piece.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
import urllib.request
import uuid
import zipfile
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from certs.tsa import TimeStampAuthority
from gateway import merkle, tsp
from gateway.audit import FieldValue, record_preimage
from gateway.evidence import decode_fields, encode_fields
from gateway.timeutil import format_time, parse_time
from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.generated import population_pb2
from gateway_demo.runner import Runner
from security_server.backup import sqlite_snapshot

from .conftest import audit_verify, run_gateway

MSP_SERVER = "UY/GOV/MSP/ss1"
DNIC_SERVER = "UY/GOV/DNIC/ss1"
CLIENT = "UY/GOV/MSP/clinics"
SERVICE = "UY/GOV/DNIC/identity/population/v1"
METHOD = "/demo.population.v1.PopulationRegistry/GetPerson"
PURPOSE = "healthcare-identification"

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="openssl is not installed")


def openssl(*args: str | Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["openssl", *map(str, args)], capture_output=True, text=True, timeout=30, cwd=cwd
    )


@pytest.fixture(scope="module")
def exchange(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runner, str, Path]]:
    """A runner, the message id of one allowed call, and a folder for bundles."""
    workdir = tmp_path_factory.mktemp("evidence")
    runner = Runner(workdir, store_bodies=True, timestamping={"interval_seconds": 0.2})
    try:
        runner.prepare()
        # a state folder left world-readable by an earlier run, tightened at start-up
        left = runner.log_db(MSP_SERVER).parent
        left.mkdir(parents=True)
        (left / "left-over.json").write_text("{}")
        for path, mode in ((left, 0o755), (left / "left-over.json", 0o644)):
            path.chmod(mode)
        runner.start_all()
        message_id = uuid.uuid4().hex
        body = population_pb2.GetPersonRequest(national_id="1.234.567-8").SerializeToString()

        async def call() -> None:
            async with runner.consumer_channel(MSP_SERVER) as channel:
                outcome = await call_raw(
                    channel,
                    METHOD,
                    body,
                    routing_metadata(
                        client=CLIENT, service=SERVICE, purpose=PURPOSE, message_id=message_id
                    ),
                )
            assert outcome.code == grpc.StatusCode.OK, outcome

        import asyncio

        asyncio.run(call())
        bundles = workdir / "bundles"
        bundles.mkdir()
        yield runner, message_id, bundles
    finally:
        runner.close()


def export(runner: Runner, server: str, message_id: str, out: Path) -> None:
    """Export, waiting (bounded) for the batch time-stamp that covers the records."""
    deadline = time.monotonic() + 15
    while True:
        result = run_gateway(
            "audit",
            "export",
            "--db",
            runner.log_db(server),
            "--message-id",
            message_id,
            "--out",
            out,
        )
        if result.returncode == 0:
            return
        assert "not time-stamped yet" in result.stderr, result.stderr
        assert time.monotonic() < deadline, result.stderr
        time.sleep(0.2)


@pytest.fixture(scope="module")
def bundles(exchange: tuple[Runner, str, Path]) -> dict[str, Path]:
    runner, message_id, folder = exchange
    out = {}
    for name, server in (("consumer", MSP_SERVER), ("provider", DNIC_SERVER)):
        out[name] = folder / f"{name}.zip"
        export(runner, server, message_id, out[name])
    return out


def unpack(bundle: Path, into: Path) -> Path:
    with zipfile.ZipFile(bundle) as archive:
        archive.extractall(into)
    return into


def repack(folder: Path, out: Path) -> Path:
    with zipfile.ZipFile(out, "w") as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, path.relative_to(folder).as_posix())
    return out


@pytest.mark.parametrize("side", ["consumer", "provider"])
def test_bundle_verifies_offline(bundles: dict[str, Path], side: str, tmp_path: Path) -> None:
    result = run_gateway("audit", "verify-bundle", bundles[side])
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: the evidence of message" in result.stdout
    assert "1-request: record" in result.stdout and "2-response: record" in result.stdout
    assert "OCSP good" in result.stdout and "body matches" in result.stdout
    # pinned to the instance's CA, given out of band
    folder = unpack(bundles[side], tmp_path / "b")
    pinned = run_gateway("audit", "verify-bundle", bundles[side], "--ca", folder / "ca.pem")
    assert pinned.returncode == 0, pinned.stdout


def test_bundle_holds_the_pieces_and_instructions(bundles: dict[str, Path], tmp_path: Path) -> None:
    folder = unpack(bundles["consumer"], tmp_path / "b")
    for record in ("1-request", "2-response"):
        for piece in (
            "record.json",
            "record.bin",
            "header.json",
            "signature.der",
            "signer.pem",
            "ocsp.der",
            "body.bin",
            "merkle.json",
            "timestamp.tst",
        ):
            assert (folder / record / piece).is_file(), f"{record}/{piece}"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["records"] == ["1-request", "2-response"]
    verify_md = (folder / "VERIFY.md").read_text()
    assert "openssl ts -verify" in verify_md and "openssl ocsp -respin" in verify_md


@pytest.mark.parametrize("side", ["consumer", "provider"])
def test_openssl_verifies_every_piece(bundles: dict[str, Path], side: str, tmp_path: Path) -> None:
    """The checks VERIFY.md gives an auditor, run with OpenSSL itself."""
    folder = unpack(bundles[side], tmp_path / "b")
    for record in ("1-request", "2-response"):
        chain = openssl("verify", "-CAfile", "ca.pem", f"{record}/signer.pem", cwd=folder)
        assert chain.returncode == 0 and ": OK" in chain.stdout, chain.stdout + chain.stderr
        # the member who speaks: the client's for the request, the service's for the response
        subject = openssl("x509", "-in", f"{record}/signer.pem", "-noout", "-subject", cwd=folder)
        member = "UY/GOV/MSP" if record == "1-request" else "UY/GOV/DNIC"
        assert f"CN = {member}" in subject.stdout or f"CN={member}" in subject.stdout, (
            subject.stdout + subject.stderr
        )

        pub = openssl("x509", "-in", f"{record}/signer.pem", "-noout", "-pubkey", cwd=folder)
        (folder / record / "signer.pub").write_text(pub.stdout)
        signature = openssl(
            "dgst",
            "-sha256",
            "-verify",
            f"{record}/signer.pub",
            "-signature",
            f"{record}/signature.der",
            f"{record}/header.json",
            cwd=folder,
        )
        assert signature.returncode == 0 and "Verified OK" in signature.stdout, signature.stderr

        status = openssl(
            "ocsp",
            "-respin",
            f"{record}/ocsp.der",
            "-issuer",
            "ca.pem",
            "-CAfile",
            "ca.pem",
            "-cert",
            f"{record}/signer.pem",
            "-validity_period",
            "315360000",
            cwd=folder,
        )
        assert status.returncode == 0, status.stdout + status.stderr
        assert "Response verify OK" in status.stderr + status.stdout
        assert f"{record}/signer.pem: good" in status.stdout

        proof = json.loads((folder / record / "merkle.json").read_text())
        untrusted = ["-untrusted", "tsa.pem"] if (folder / "tsa.pem").exists() else []
        token = openssl(
            "ts",
            "-verify",
            "-digest",
            proof["root"],
            "-token_in",
            "-in",
            f"{record}/timestamp.tst",
            "-CAfile",
            "ca.pem",
            *untrusted,
            cwd=folder,
        )
        assert token.returncode == 0 and "Verification: OK" in token.stdout, (
            token.stdout + token.stderr
        )

        record_doc = json.loads((folder / record / "record.json").read_text())
        digest = hashlib.sha256((folder / record / "record.bin").read_bytes()).hexdigest()
        assert digest == record_doc["hash"]
        body_digest = openssl("dgst", "-sha256", f"{record}/body.bin", cwd=folder).stdout
        assert (
            json.loads((folder / record / "header.json").read_text())["body_sha256"] in body_digest
        )


def _flip(data: bytes, at: int) -> bytes:
    return data[:at] + bytes([data[at] ^ 0x01]) + data[at + 1 :]


def _tamper_proof(path: Path) -> None:
    doc = json.loads(path.read_text())
    if doc["proof"]:
        first = bytes.fromhex(doc["proof"][0])
        doc["proof"][0] = _flip(first, 0).hex()
    else:  # a batch of one record: the root is the leaf; bend the root instead
        doc["root"] = _flip(bytes.fromhex(doc["root"]), 0).hex()
    path.write_text(json.dumps(doc))


TAMPERING: dict[str, tuple[str, Callable[[Path], object]]] = {
    "body": ("1-request/body.bin", lambda p: p.write_bytes(_flip(p.read_bytes(), 0))),
    "signature": (
        "2-response/signature.der",
        lambda p: p.write_bytes(_flip(p.read_bytes(), len(p.read_bytes()) - 3)),
    ),
    "token": (
        "1-request/timestamp.tst",
        lambda p: p.write_bytes(_flip(p.read_bytes(), len(p.read_bytes()) - 5)),
    ),
    "proof": ("2-response/merkle.json", _tamper_proof),
    "header": (
        "1-request/header.json",
        lambda p: p.write_bytes(p.read_bytes().replace(b"healthcare", b"Healthcare")),
    ),
    "ocsp": (
        "1-request/ocsp.der",
        lambda p: p.write_bytes(_flip(p.read_bytes(), len(p.read_bytes()) - 4)),
    ),
    "record": (
        "2-response/record.bin",
        lambda p: p.write_bytes(p.read_bytes().replace(b"ok", b"OK", 1)),
    ),
}


@pytest.mark.parametrize("what", sorted(TAMPERING))
def test_tampered_bundle_fails_naming_the_piece(
    bundles: dict[str, Path], what: str, tmp_path: Path
) -> None:
    piece, tamper = TAMPERING[what]
    folder = unpack(bundles["consumer"], tmp_path / "b")
    before = (folder / piece).read_bytes()
    tamper(folder / piece)
    assert (folder / piece).read_bytes() != before
    result = run_gateway("audit", "verify-bundle", repack(folder, tmp_path / "tampered.zip"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(f"FAILED: {piece}:"), result.stdout


def _resign(
    runner: Runner,
    folder: Path,
    record: str,
    member: str,
    like: str,
    edit: Callable[[dict[str, FieldValue]], object] = lambda fields: None,
    days_late: int = 0,
) -> None:
    """What the operator of a server holding `member`'s signing key can put in its own log,
    which the TSA stamps like any other: the record of `record` with its header signed by that
    member's key (certificate and OCSP answer as in folder `like`, a record it signed) and its
    fields changed by `edit`, chained and stamped by the topology's real TSA in a batch of its
    own."""
    key = serialization.load_pem_private_key(
        (runner.pki / "sign" / f"{member.replace('/', '_')}.key").read_bytes(), None
    )
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    piece = folder / record
    for name in ("signer.pem", "ocsp.der"):
        (piece / name).write_bytes((folder / like / name).read_bytes())
    signature = key.sign((piece / "header.json").read_bytes(), ec.ECDSA(hashes.SHA256()))
    (piece / "signature.der").write_bytes(signature)
    certificate = x509.load_pem_x509_certificate((piece / "signer.pem").read_bytes())
    doc = json.loads((piece / "record.json").read_text())
    fields = decode_fields(doc["fields"])
    fields["signature"] = signature
    fields["signer_certificate_sha256"] = certificate.fingerprint(hashes.SHA256()).hex()
    fields["signer_ocsp_sha256"] = hashlib.sha256((piece / "ocsp.der").read_bytes()).hexdigest()
    edit(fields)
    preimage = record_preimage(int(doc["seq"]), bytes.fromhex(doc["prev_hash"]), fields)
    record_hash = hashlib.sha256(preimage).digest()
    doc["fields"], doc["hash"] = encode_fields(fields), record_hash.hex()
    (piece / "record.json").write_text(json.dumps(doc))
    (piece / "record.bin").write_bytes(preimage)
    root = merkle.root([record_hash])
    proof = {"index": 0, "size": 1, "proof": [], "root": root.hex()}
    (piece / "merkle.json").write_text(json.dumps(proof))
    nonce = 7
    if days_late:  # the same TSA, asked that many days later (its key, its clock moved on)
        tsa_key = serialization.load_pem_private_key((runner.pki / "tsa.key").read_bytes(), None)
        assert isinstance(tsa_key, ec.EllipticCurvePrivateKey)
        late = TimeStampAuthority(
            key=tsa_key,
            certificate=x509.load_pem_x509_certificate((runner.pki / "tsa.crt").read_bytes()),
            clock=lambda: datetime.now(UTC) + timedelta(days=days_late),
        )
        reply = late.respond(tsp.build_request(root, nonce))
    else:
        request = urllib.request.Request(
            f"http://{runner.tsa_address}/",
            data=tsp.build_request(root, nonce),
            headers={"Content-Type": "application/timestamp-query"},
        )
        with urllib.request.urlopen(request, timeout=10) as answer:
            reply = answer.read()
    token = tsp.token_from_response(reply, digest=root, nonce=nonce)
    (piece / "timestamp.tst").write_bytes(token)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["sha256"] = {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest()
        for name in manifest["sha256"]
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize(
    ("record", "member", "like", "owner", "refusal"),
    [
        (
            "1-request",
            "UY/GOV/DNIC",
            "2-response",
            "UY/GOV/MSP",
            "is the signing certificate of UY/GOV/DNIC, but a request is signed by the "
            "client's member, UY/GOV/MSP",
        ),
        (
            "2-response",
            "UY/GOV/MSP",
            "1-request",
            "UY/GOV/DNIC",
            "is the signing certificate of UY/GOV/MSP, but a response is signed by the "
            "service's member, UY/GOV/DNIC",
        ),
    ],
)
def test_a_message_signed_by_another_member_is_refused(
    exchange: tuple[Runner, str, Path],
    bundles: dict[str, Path],
    record: str,
    member: str,
    like: str,
    owner: str,
    refusal: str,
    tmp_path: Path,
) -> None:
    """An operator holding its own member's signing key, and a log the TSA stamps, could make
    a request the clinics never sent (or an answer the registry never gave) with every other
    piece valid: the bundle names the member who signed, and it is not the one who speaks."""
    runner, _, _ = exchange
    forged = unpack(bundles["provider"], tmp_path / "forged")
    _resign(runner, forged, record, member, like)
    result = run_gateway("audit", "verify-bundle", repack(forged, tmp_path / "forged.zip"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(f"FAILED: {record}/signer.pem: {refusal}"), result.stdout
    # the control: the same re-signing with the key of the member who speaks verifies
    control = unpack(bundles["provider"], tmp_path / "control")
    _resign(runner, control, record, owner, like=record)
    result = run_gateway("audit", "verify-bundle", repack(control, tmp_path / "control.zip"))
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize(
    ("record", "field", "value", "source"),
    [
        ("1-request", "client", "UY/GOV/MSP/hospitals", f"the signed header '{CLIENT}'"),
        ("1-request", "purpose", "marketing", f"the signed header '{PURPOSE}'"),
        ("1-request", "user_id", "dr-nobody", "the signed header None"),
        ("2-response", "purpose", "marketing", f"the request '{PURPOSE}'"),
        ("2-response", "method", "/x.Y/Z", f"the request '{METHOD}'"),
    ],
)
def test_a_record_filed_under_other_facts_than_it_signs_is_refused(
    exchange: tuple[Runner, str, Path],
    bundles: dict[str, Path],
    record: str,
    field: str,
    value: str,
    source: str,
    tmp_path: Path,
) -> None:
    """Auditors search and report by a record's columns: an operator re-filing a genuine
    signed message under another client, purpose, user or method (its own record, re-chained
    and stamped by the real TSA) would hide it from one audit and put it in another."""
    runner, _, _ = exchange
    forged = unpack(bundles["consumer"], tmp_path / "forged")
    own = "UY/GOV/MSP" if record == "1-request" else "UY/GOV/DNIC"
    _resign(runner, forged, record, own, like=record, edit=lambda f: f.update({field: value}))
    result = run_gateway("audit", "verify-bundle", repack(forged, tmp_path / "forged.zip"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(
        f"FAILED: {record}/record.json: names the {field} '{value}', {source}"
    ), result.stdout


def test_a_token_asked_for_long_after_the_record_is_refused(
    exchange: tuple[Runner, str, Path], bundles: dict[str, Path], tmp_path: Path
) -> None:
    """The provider's operator re-signs its answer 200 days later (its own key, the
    original times in the header and the record) and has it stamped then: the token's time
    gives it away, as `audit verify --token-grace` would."""
    runner, _, _ = exchange
    forged = unpack(bundles["provider"], tmp_path / "forged")
    _resign(runner, forged, "2-response", "UY/GOV/DNIC", like="2-response", days_late=200)
    result = run_gateway("audit", "verify-bundle", repack(forged, tmp_path / "forged.zip"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith("FAILED: 2-response/timestamp.tst: was made at "), result.stdout
    assert "more than 0:15:06 after the record it stamps was logged" in result.stdout


def test_a_record_logged_long_after_its_header_is_refused(
    exchange: tuple[Runner, str, Path], bundles: dict[str, Path], tmp_path: Path
) -> None:
    """A record whose time is moved to match a late token no longer matches the time its
    signed header was made."""
    runner, _, _ = exchange
    forged = unpack(bundles["provider"], tmp_path / "forged")
    moved = format_time(datetime.now(UTC) + timedelta(days=2))
    _resign(
        runner,
        forged,
        "2-response",
        "UY/GOV/DNIC",
        like="2-response",
        edit=lambda fields: fields.update(logged_at=moved),
    )
    result = run_gateway("audit", "verify-bundle", repack(forged, tmp_path / "forged.zip"))
    assert result.returncode == 1, result.stdout + result.stderr
    assert result.stdout.startswith(
        f"FAILED: 2-response/record.json: was logged at {parse_time(moved).isoformat()}, too "
        "far from its header's time"
    ), result.stdout


def test_missing_piece_and_bad_archives_are_refused(
    bundles: dict[str, Path], tmp_path: Path
) -> None:
    folder = unpack(bundles["provider"], tmp_path / "b")
    (folder / "1-request" / "timestamp.tst").unlink()
    result = run_gateway("audit", "verify-bundle", repack(folder, tmp_path / "missing.zip"))
    assert result.returncode == 1
    assert "1-request/timestamp.tst: is missing" in result.stdout
    (tmp_path / "junk.zip").write_bytes(b"not a zip")
    junk = run_gateway("audit", "verify-bundle", tmp_path / "junk.zip")
    assert junk.returncode == 2 and "cannot read" in junk.stderr
    other_ca = tmp_path / "other-ca.pem"
    other_ca.write_bytes((folder / "1-request" / "signer.pem").read_bytes())
    pinned = run_gateway("audit", "verify-bundle", bundles["provider"], "--ca", other_ca)
    assert pinned.returncode == 1 and "ca.pem: holds a CA that is not trusted" in pinned.stdout


def test_export_of_an_unknown_message_is_a_clear_error(
    exchange: tuple[Runner, str, Path], tmp_path: Path
) -> None:
    runner, _, _ = exchange
    result = run_gateway(
        "audit", "export", "--db", runner.log_db(MSP_SERVER), "--message-id", "nope", "--out",
        tmp_path / "x.zip",
    )  # fmt: skip
    assert result.returncode == 1
    assert "holds no request or response of message nope" in result.stderr


def test_audit_verify_checks_the_time_stamps(exchange: tuple[Runner, str, Path]) -> None:
    """`audit verify` with the instance's anchor checks every batch's token."""
    runner, _, _ = exchange
    anchor = str(runner.pki / "anchor.json")
    for server in (MSP_SERVER, DNIC_SERVER):
        result = audit_verify(runner.log_db(server), "--anchor", anchor, "--check-stamps")
        assert result.returncode == 0, result.stdout + result.stderr
        assert "record(s) covered by verified tokens" in result.stdout
    # the same, with the server's own copy of the configuration (its parts on disk) instead
    # of the one fetched from the registry
    parts = runner.log_db(MSP_SERVER).parent / "configuration-parts"
    result = audit_verify(
        runner.log_db(MSP_SERVER), "--anchor", anchor, "--configuration", str(parts),
        "--check-stamps",
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "record(s) covered by verified tokens" in result.stdout


def _copy_log(runner: Runner, server: str, into: Path) -> Path:
    """A consistent copy of a live SQLite log (as `gateway server backup` takes it)."""
    sqlite_snapshot(runner.log_db(server), into)
    return into


def _edit(db: Path, sql: str) -> None:
    from tests.tamper import tamper_sqlite

    tamper_sqlite(db, sql)


@pytest.mark.parametrize(
    ("edit", "expected"),
    [
        (
            "DELETE FROM message_log WHERE seq = (SELECT MAX(seq) FROM message_log)",
            "were deleted",
        ),
        (
            "UPDATE timestamp_batches SET token = CAST(substr(token, 1, length(token) - 6) "
            "|| x'000000000000' AS BLOB) WHERE first_seq = (SELECT MIN(first_seq) FROM timestamp_batches)",
            "time-stamp token",
        ),
        (
            "UPDATE timestamp_batches SET root = zeroblob(32) "
            "WHERE first_seq = (SELECT MIN(first_seq) FROM timestamp_batches)",
            "Merkle root is not the stamped one",
        ),
        ("DELETE FROM timestamp_batches", "are not time-stamped although logged"),
    ],
)
def test_audit_verify_detects_deleted_records_and_edited_stamps(
    exchange: tuple[Runner, str, Path], bundles: dict[str, Path], tmp_path: Path, edit: str,
    expected: str,
) -> None:  # fmt: skip
    runner, _, _ = exchange
    db = _copy_log(runner, MSP_SERVER, tmp_path / "copy.db")
    anchor = ("--anchor", str(runner.pki / "anchor.json"))
    ok = audit_verify(db, *anchor)
    assert ok.returncode == 0, ok.stdout
    _edit(db, edit)
    result = audit_verify(db, "--stamp-grace", "0", *anchor)
    assert result.returncode == 1, result.stdout + result.stderr
    assert expected in result.stdout, result.stdout


def test_files_holding_personal_data_are_owner_only(
    exchange: tuple[Runner, str, Path], bundles: dict[str, Path]
) -> None:
    """State folders are 0700; the log, its -wal and -shm, caches and bundles 0600, even when left wider."""
    runner, _, _ = exchange
    for server in (MSP_SERVER, DNIC_SERVER):
        db = runner.log_db(server)
        state = db.parent
        private = [
            db,
            db.with_name(db.name + "-wal"),
            db.with_name(db.name + "-shm"),
            *(state / "configuration-parts").iterdir(),
            *(state / "ocsp").iterdir(),
        ]
        assert len(private) > 8
        assert _mode(state) == 0o700, state
        assert _mode(state / "ocsp") == 0o700
        assert _mode(state / "configuration-parts") == 0o700
        for path in private:
            assert _mode(path) == 0o600, path
    left = runner.log_db(MSP_SERVER).parent
    assert _mode(left / "left-over.json") == 0o600
    assert "file_mode_tightened" in runner.tail(runner.server_names[MSP_SERVER], lines=400)
    registry_db = runner.workdir / "state" / "registry.db"
    assert _mode(registry_db) == 0o600
    for bundle in bundles.values():
        assert _mode(bundle) == 0o600, bundle


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777
