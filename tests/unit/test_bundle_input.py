"""Hostile bundle files: `gateway audit verify-bundle` fails naming the piece, or refuses to
read the zip, and never crashes (deep JSON, entries it cannot read, malformed times)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization

from gateway.errors import AuditError
from gateway.evidence import BundleError, verify_bundle
from security_server.evidence import read_zip
from tests.unit.conftest import build_ca

DEEP = b"[" * 200_000


def test_deeply_nested_manifest_is_named() -> None:
    with pytest.raises(BundleError) as caught:
        verify_bundle({"manifest.json": DEEP, "ca.pem": b""})
    assert caught.value.message.startswith("manifest.json: is malformed")


def test_deeply_nested_record_is_named() -> None:
    manifest = {"format": "gateway-evidence/1", "records": ["1-request"], "message_id": "m"}
    ca = build_ca().certificate.public_bytes(serialization.Encoding.PEM)
    files = {
        "manifest.json": json.dumps({**manifest, "sha256": {}}).encode(),
        "ca.pem": ca,
        "1-request/record.json": DEEP,
    }
    with pytest.raises(BundleError) as caught:
        verify_bundle(files)
    assert caught.value.message.startswith("1-request/record.json: is malformed")


def _zip(path: Path) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("manifest.json", b"{}")
    return path


def _patch(path: Path, local: int, central: int, value: int) -> None:
    """Set a 2-byte field of the one entry's local header and central directory record."""
    data = bytearray(path.read_bytes())
    data[local : local + 2] = value.to_bytes(2, "little")
    at = data.index(b"PK\x01\x02") + central
    data[at : at + 2] = value.to_bytes(2, "little")
    path.write_bytes(bytes(data))


def test_an_encrypted_entry_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "encrypted.zip")
    _patch(path, 6, 8, 0x1)  # general purpose flags: encrypted
    with pytest.raises(AuditError, match=r"manifest\.json is encrypted"):
        read_zip(str(path))


def test_an_unknown_compression_method_is_refused(tmp_path: Path) -> None:
    path = _zip(tmp_path / "method.zip")
    _patch(path, 8, 10, 99)  # compression method
    with pytest.raises(AuditError, match="compression method 99"):
        read_zip(str(path))


def test_a_plain_bundle_zip_is_read(tmp_path: Path) -> None:
    assert read_zip(str(_zip(tmp_path / "plain.zip"))) == {"manifest.json": b"{}"}
