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
import uuid
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest

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
