"""`gateway`: the command line of the interoperability gateway.

    gateway pki init        create a development PKI for a topology
    gateway pki revoke      revoke a certificate of the development CA
    gateway pki serve       run the development OCSP responder and time-stamping authority
    gateway registry serve  run a registry
    gateway registry token  issue an admin API token
    gateway registry anchor print this registry's instance anchor (for federation)
    gateway admin ...       administer the registry over its admin API
    gateway server serve    run a security server
    gateway audit verify    verify a security server's message log and its time-stamps
    gateway audit export    write the evidence bundle of one exchange
    gateway audit verify-bundle  verify an evidence bundle offline
    gateway audit checkpoints    export the checkpoints the registry received from a server
    gateway demo            run the demonstration (make demo)
    gateway bench           measure throughput and latency (make bench)

Exit status: 0 on success, 1 when a verification fails, 2 for bad usage or configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from gateway.errors import ConfigFileError, GatewayError

# gRPC's C core prints a line for every refused TLS handshake (an unknown CA, no
# certificate): one client could write gigabytes a day into a server's log. Its errors
# still print; the gateway counts refusals itself (README, *Floods*). An operator may set
# GRPC_VERBOSITY otherwise; it is read when grpc is first imported, after this.
os.environ.setdefault("GRPC_VERBOSITY", "ERROR")

if TYPE_CHECKING:
    from gateway_ops.backupfile import BackupKey

# `gateway audit verify`'s defaults for a token's time: the server's defaults for the TSA
# failure period (600 s), stamping interval (1 s) and TSA timeout (5 s), plus clock skew
DEFAULT_CLOCK_SKEW = 300.0
DEFAULT_TOKEN_GRACE = 600.0 + 1.0 + 5.0 + DEFAULT_CLOCK_SKEW


def _pki_init(ns: argparse.Namespace) -> int:
    from certs.pki import init_pki
    from registry.topology import load_topology_ids

    instance, members, servers = load_topology_ids(ns.topology)
    kept = (ns.dir / "anchor.json").exists()
    anchor = init_pki(
        ns.dir,
        instance=ns.instance or instance,
        members=members,
        servers=list(servers),
        local_clients=servers,
        registry_addresses=ns.registry_address,
        now=datetime.now(UTC),
        days=ns.days,
    )
    print(f"development PKI for instance {anchor.instance} written to {ns.dir}")
    print(
        f"  {len(members)} member signing certificate(s), {len(servers)} server TLS certificate(s)"
    )
    print(f"  anchor: {ns.dir / 'anchor.json'}" + (" (kept as it was)" if kept else ""))
    return 0


def _profile(ns: argparse.Namespace) -> Any:
    from gateway.certificate_profile import Profile
    from gateway.identifiers import MemberId, SecurityServerId

    if ns.server:
        return Profile.server(SecurityServerId.parse(ns.server), ns.host)
    return Profile.member(MemberId.parse(ns.member))


def _pki_csr(ns: argparse.Namespace) -> int:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from certs.pki import slug, write_atomically
    from gateway.certificate_profile import check_hosts, make_request

    profile = _profile(ns)
    # the whole id in the name: a server code may hold dots, which are no suffix
    stem = slug(profile.identity)
    key_path, csr_path = ns.out / f"{stem}.key", ns.out / f"{stem}.csr"
    if key_path.exists() or key_path.is_symlink():
        print(f"pki csr: {key_path} exists; a key is never overwritten (move it away first)")
        return 1
    problems = check_hosts(profile)
    if problems:
        print(f"pki csr: refused: {'; '.join(problems)}")
        return 1
    key = ec.generate_private_key(ec.SECP256R1())
    request = make_request(profile, key, ns.organisation)
    pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    try:
        ns.out.mkdir(parents=True, exist_ok=True)
        write_atomically(key_path, pem, 0o600)
        write_atomically(csr_path, request.public_bytes(serialization.Encoding.PEM), 0o644)
    except OSError as exc:
        print(f"pki csr: cannot write into {ns.out}: {exc}")
        return 1
    what = "authentication (TLS)" if profile.kind == "auth" else "signing"
    print(f"{what} key for {profile.identity}: {key_path} (0600, keep it here)")
    print(f"certificate request: {csr_path} (send it to your CA)")
    return 0


def _pki_sign(ns: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    from certs.pki import load_issued, sign_request, write_atomically

    try:
        request = x509.load_pem_x509_csr(ns.csr.read_bytes())
    except (OSError, ValueError) as exc:
        print(f"pki sign: cannot read the request {ns.csr}: {exc}")
        return 1
    try:
        ca = load_issued(ns.dir, "ca")
    except (OSError, ValueError, TypeError) as exc:
        print(f"pki sign: cannot read the CA's certificate and key in {ns.dir}: {exc}")
        return 1
    try:
        certificate = sign_request(ca, request, now=datetime.now(UTC), days=ns.days)
    except ValueError as exc:
        print(f"pki sign: refused: {exc}")
        return 1
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    try:
        write_atomically(ns.out, pem, 0o644)
        # the CA's register of what it issued: its OCSP responder answers "good" only for
        # these (written once the certificate reached its file: one nobody received is not
        # registered)
        (ns.dir / "issued").mkdir(exist_ok=True)
        write_atomically(ns.dir / "issued" / f"{certificate.serial_number:x}.crt", pem, 0o644)
    except OSError as exc:
        print(f"pki sign: cannot write the certificate: {exc}")
        return 1
    print(f"certificate for {request.subject.rfc4514_string()} written to {ns.out}")
    return 0


def _pki_import(ns: argparse.Namespace) -> int:
    from cryptography import x509
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    from certs.pki import slug, write_atomically
    from gateway.certificate_profile import check_certificate

    profile = _profile(ns)
    try:
        certificate = x509.load_pem_x509_certificate(ns.certificate.read_bytes())
        key = serialization.load_pem_private_key(ns.key.read_bytes(), password=None)
        ca = x509.load_pem_x509_certificate(ns.ca.read_bytes()) if ns.ca else None
    except TypeError:
        print(f"pki import: the key {ns.key} is encrypted; give it unencrypted (mode 0600)")
        return 1
    except (OSError, ValueError, UnsupportedAlgorithm) as exc:
        print(f"pki import: cannot read the certificate, key or CA: {exc}")
        return 1
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        print("pki import: refused: the key is not an ECDSA key")
        return 1
    problems = check_certificate(profile, certificate, key, now=datetime.now(UTC), ca=ca)
    if problems:
        print(f"pki import: refused the certificate {ns.certificate} for {profile.identity}:")
        for problem in problems:
            print(f"  - {problem}")
        return 1
    folder = ns.dir / ("auth" if profile.kind == "auth" else "sign")
    crt, key_file = (
        folder / f"{slug(profile.identity)}.crt",
        folder / f"{slug(profile.identity)}.key",
    )
    # what is installed is what was checked: the certificate alone (nothing that followed
    # it in the file), the key in PKCS#8
    pem = certificate.public_bytes(serialization.Encoding.PEM)
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    for path in (crt, key_file):
        if path.is_symlink():
            print(f"pki import: {path} is a link; files are installed only in place of files")
            return 1
    installed = _installed_public_key(key_file)
    same_key = installed is not None and installed == key.public_key()
    if not ns.replace:
        if crt.exists() and crt.read_bytes() != pem:
            print(f"pki import: {crt} exists; give --replace to install this one instead")
            return 1
        if key_file.exists() and not same_key:
            print(f"pki import: {key_file} holds another key; give --replace to install this one")
            return 1
    try:
        folder.mkdir(parents=True, exist_ok=True)
        if not same_key:
            write_atomically(key_file, key_pem, 0o600)
        write_atomically(crt, pem, 0o644)
    except OSError as exc:
        print(f"pki import: cannot install into {folder}: {exc}")
        return 1
    print(f"certificate for {profile.identity} checked and installed: {crt}, {key_file}")
    return 0


def _installed_public_key(path: Path) -> Any:
    """The public key of the private key installed at `path` (None: none, or unreadable)."""
    from cryptography.exceptions import UnsupportedAlgorithm
    from cryptography.hazmat.primitives import serialization

    try:
        return serialization.load_pem_private_key(path.read_bytes(), password=None).public_key()
    except (OSError, ValueError, TypeError, UnsupportedAlgorithm):
        return None


def _pki_revoke(ns: argparse.Namespace) -> int:
    from cryptography import x509

    from certs.ocsp_responder import issued_certificates, load_revoked, revoke

    try:
        if ns.certificate is not None:
            certificate = x509.load_pem_x509_certificate(ns.certificate.read_bytes())
        else:
            found = issued_certificates(ns.dir).get(ns.serial)
            if found is None:
                print(
                    f"error: no certificate with serial {ns.serial:x} in {ns.dir}", file=sys.stderr
                )
                return 2
            certificate = found
        previous = load_revoked(ns.dir).get(certificate.serial_number)
        revoke(ns.dir, certificate, reason=x509.ReasonFlags(ns.reason), at=datetime.now(UTC))
    except (OSError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    serial_hex = format(certificate.serial_number, "x")
    subject = certificate.subject.rfc4514_string()
    if previous is not None:
        print(f"already revoked: {subject} (serial {serial_hex}) at {previous[0].isoformat()}")
    else:
        print(f"revoked: {subject} (serial {serial_hex}), reason {ns.reason}")
    return 0


def _serial(text: str) -> int:
    try:
        return int(text.replace(":", ""), 16)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a hexadecimal number") from None


def _host_port(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    if not host or not port.isdigit() or int(port) > 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host, int(port)


def _pki_serve(ns: argparse.Namespace) -> int:
    from aiohttp import web
    from cryptography import x509

    from certs.ocsp_responder import OcspResponder, ocsp_app
    from certs.pki import load_issued
    from gateway_ops.runtime import ready_writer, restrict_modes, run, signal_events
    from gateway_ops.server import Ops, OpsSettings

    if ns.ocsp is None and ns.tsa is None:
        print("error: give --ocsp HOST:PORT, --tsa HOST:PORT or both", file=sys.stderr)
        return 2
    # the CA's and the TSA's keys, and the responder's record of revocations
    if ns.dir.is_dir():
        restrict_modes(ns.dir)

    def clock() -> datetime:
        return datetime.now(UTC)

    apps: dict[str, tuple[web.Application, tuple[str, int]]] = {}
    # its keys are loaded before it listens: once it answers, it is ready
    ops = Ops("trust-services")
    try:
        if ns.ocsp is not None:
            apps["ocsp"] = (
                ocsp_app(OcspResponder(pki_dir=ns.dir, clock=clock), registry=ops.registry),
                ns.ocsp,
            )
        if ns.tsa is not None:
            from certs.tsa import TimeStampAuthority, tsa_app

            ca = x509.load_pem_x509_certificate((ns.dir / "ca.crt").read_bytes())
            tsa = load_issued(ns.dir, "tsa")
            authority = TimeStampAuthority(
                key=tsa.key, certificate=tsa.certificate, chain=(ca,), clock=clock
            )
            apps["tsa"] = (tsa_app(authority, registry=ops.registry), ns.tsa)
    except (OSError, ValueError) as exc:
        print(f"error: cannot load the PKI in {ns.dir}: {exc}", file=sys.stderr)
        return 2

    async def main() -> None:
        stop, _ = signal_events()
        runners: list[web.AppRunner] = []
        ready: dict[str, str] = {}
        try:
            for name, (app, (host, port)) in apps.items():
                runner = web.AppRunner(app, access_log=None)
                runners.append(runner)
                await runner.setup()
                await web.TCPSite(runner, host, port).start()
                ready[name] = f"http://{host}:{runner.addresses[0][1]}/"
            ops_url = await ops.start(OpsSettings(listen=f"{ns.ops[0]}:{ns.ops[1]}"))
            if ops_url is not None:
                ready["ops"] = ops_url
            print(json.dumps(ready), flush=True)
            ready_writer(ns.ready_file)(ready)
            await stop.wait()
        finally:
            ops.readiness.stopping()
            for runner in runners:
                await runner.cleanup()
            await ops.close()

    try:
        run(main)
    except OSError as exc:
        print(f"error: cannot listen: {exc}", file=sys.stderr)
        return 2
    return 0


def _registry_serve(ns: argparse.Namespace) -> int:
    from gateway_ops.runtime import read_settings, ready_writer, restrict_state, run, signal_events
    from registry.main import RegistrySettings, serve

    settings = read_settings(RegistrySettings, ns.config)
    base = ns.config.resolve().parent
    restrict_state(ns.config, settings.database, files=[settings.token_key_path(base)])

    async def main() -> None:
        stop, reload = signal_events()
        await serve(
            settings,
            base=base,
            stop=stop,
            reload=reload,
            on_ready=ready_writer(ns.ready_file),
        )

    run(main)
    return 0


def _registry_token(ns: argparse.Namespace) -> int:
    from datetime import UTC, datetime, timedelta

    from gateway.identifiers import MemberId, SecurityServerId
    from gateway_ops.auth import Role
    from gateway_ops.runtime import read_settings
    from registry.main import RegistrySettings, token_issuer

    settings = read_settings(RegistrySettings, ns.config)
    issuer = token_issuer(settings, ns.config.resolve().parent)
    ttl = ns.ttl if ns.ttl is not None else settings.api.token_ttl_seconds
    try:
        token = issuer.issue(
            subject=ns.subject,
            role=Role(ns.role),
            member=None if ns.member is None else MemberId.parse(ns.member),
            server=None if ns.server is None else SecurityServerId.parse(ns.server),
            now=datetime.now(UTC),
            ttl=timedelta(seconds=ttl),
        )
    except (ValueError, OverflowError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(token)
    return 0


# the --key of the backup commands
KEY_HELP = (
    "the backup key (`gateway backup-key`): authenticates what is backed up, and a restore "
    "takes only a backup it authenticates"
)


def _backup_key(ns: argparse.Namespace) -> int:
    from gateway_ops.backupfile import BackupFileError, create_key

    try:
        key = create_key(ns.out)
    except BackupFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(
        f"backup key {key.ident} written to {ns.out} (mode 0600): keep it, and a copy of it, "
        "apart from the backups it authenticates"
    )
    return 0


def _backup_key_of(ns: argparse.Namespace) -> BackupKey | None:
    """The backup key `--key` names, or None once the reason is printed."""
    from gateway_ops.backupfile import BackupFileError, load_key

    try:
        return load_key(ns.key)
    except BackupFileError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return None


def _server_backup(ns: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from gateway_ops.runtime import run
    from security_server.backup import BackupError, Summary, backup, restore

    def shown(path: str) -> None:
        print(f"  {path}", file=sys.stderr)

    key = _backup_key_of(ns)
    if key is None:
        return 2

    async def main() -> Summary:
        return await backup(
            ns.config,
            ns.out,
            key=key,
            now=datetime.now(UTC),
            with_log=not ns.without_log,
            progress=shown,
        )

    try:
        if ns.action == "backup":
            summary = run(main)
            done = f"backup written to {ns.out}: {summary.files} files"
        else:
            summary = restore(ns.source, key=key, force=ns.force, progress=shown)
            done = (
                f"restored from {ns.source}: {summary.written} files written, "
                f"{summary.unchanged} already there"
            )
    except BackupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    heads = ", ".join(f"{c} at record {seq}" for c, (seq, _) in sorted(summary.heads.items()))
    print(f"{done}; message log {summary.log} ({heads or 'no record'})")
    return 0


def _registry_backup(ns: argparse.Namespace) -> int:
    from datetime import UTC, datetime

    from gateway.settings import database_url
    from gateway_ops.runtime import read_settings, run
    from registry.backup import BackupError, backup, restore
    from registry.main import RegistrySettings
    from registry.store import RegistryStore

    key = _backup_key_of(ns)
    if key is None:
        return 2
    settings = read_settings(RegistrySettings, ns.config)
    url = database_url(settings.database, base=ns.config.resolve().parent)

    def shown(table: str, rows: int) -> None:
        print(f"  {table:28} {rows:>10,} rows", file=sys.stderr)

    async def main() -> int:
        store = await RegistryStore.open(url)
        try:
            if ns.action == "backup":
                summary = await backup(
                    store,
                    ns.out,
                    key=key,
                    instance=settings.instance,
                    now=datetime.now(UTC),
                    progress=shown,
                )
                done = f"backup written to {ns.out}"
            else:
                summary = await restore(
                    store,
                    ns.source,
                    key=key,
                    instance=settings.instance,
                    now=datetime.now(UTC),
                    refresh_seconds=settings.refresh_seconds,
                    progress=shown,
                    skip_versions=ns.skip_versions,
                )
                done = f"restored from {ns.source}"
        except BackupError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        finally:
            await store.close()
        print(
            f"{done}: {sum(summary.tables.values()):,} rows in {len(summary.tables)} tables, "
            f"schema {summary.revision}, admin log of {summary.admin_entries} entries "
            f"verified, configuration version {summary.configuration_version}"
        )
        return 0

    return int(run(main))


def _registry_anchor(ns: argparse.Namespace) -> int:
    from gateway_ops.runtime import read_settings
    from registry.main import RegistrySettings, instance_anchor

    settings = read_settings(RegistrySettings, ns.config)
    anchor = instance_anchor(settings, ns.address)
    print(json.dumps(anchor.to_json(), indent=2))
    return 0


def _server_serve(ns: argparse.Namespace) -> int:
    from gateway_ops.runtime import read_settings, ready_writer, restrict_state, run, signal_events
    from security_server.main import serve
    from security_server.settings import ServerSettings

    settings = read_settings(ServerSettings, ns.config)
    restrict_state(ns.config, settings.log.database, folder=settings.server.state_dir)

    async def main() -> None:
        stop, reload = signal_events()
        await serve(
            settings,
            base=ns.config.resolve().parent,
            stop=stop,
            on_ready=ready_writer(ns.ready_file),
            reload=reload,
            read=lambda: read_settings(ServerSettings, ns.config),
        )

    run(main)
    return 0


def _audit_verify(ns: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.errors import AuditError
    from gateway_cli.verify import TrustInputError, anchor_cas, checkpoint_lines, load_checkpoints
    from gateway_ops.runtime import run
    from security_server.audit import StampTimes, verify_log

    if ns.db is None and ns.archive_dir is None:
        print("error: give --db, --archive-dir, or both", file=sys.stderr)
        return 2
    url = None
    if ns.db is not None:
        url = _log_url(ns.db)
        if url is None:
            return 2
    if ns.archive_dir is not None and not ns.archive_dir.is_dir():
        print(f"error: no archive folder at {ns.archive_dir}", file=sys.stderr)
        return 2
    if ns.configuration is not None and ns.anchor is None:
        print("error: --configuration goes with --anchor", file=sys.stderr)
        return 2
    if ns.check_stamps and not ns.ca and ns.anchor is None:
        print(
            "error: --check-stamps needs a trust anchor: --anchor anchor.json (the instance "
            "anchor) or --ca CA.pem; the CAs kept in the log itself are never trusted",
            file=sys.stderr,
        )
        return 2
    show = sys.stderr.isatty() and not ns.quiet
    progress = _progress_bar("verifying") if show else None

    try:
        cas = _load_cas(ns.ca)
        if ns.anchor is not None:
            cas = (cas or []) + anchor_cas(ns.anchor, ns.configuration)
        checkpoints = None
        server = None
        if ns.checkpoints is not None:
            server, checkpoints = load_checkpoints(ns.checkpoints, server=ns.server, token=ns.token)
        grace = timedelta(seconds=ns.stamp_grace) if ns.stamp_grace >= 0 else None
        times = StampTimes(
            skew=timedelta(seconds=ns.clock_skew), grace=timedelta(seconds=ns.token_grace)
        )
        report = run(
            lambda: verify_log(
                url,
                progress,
                cas,
                grace,
                archive_dir=ns.archive_dir,
                stamp_times=times,
                checkpoints=checkpoints,
            )
        )
    except TrustInputError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except AuditError as exc:
        if show:
            print(file=sys.stderr)
        print(f"FAILED: {exc}")
        return 1
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"error: the log cannot be read: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    if show:
        print(file=sys.stderr)
    total, stamped = report.records, report.stamped_total
    archived = sum(report.archived.values())
    print(
        f"OK: {total} record(s) verified in {len(report.heads)} chain(s)"
        + (f", {archived} of them in archive files" if archived else "")
    )
    for chain, head in report.heads.items():
        print(f"  chain {chain}: {head.next_seq - 1} record(s), head {head.last_hash.hex()}")
    print(
        f"time-stamps: {stamped} record(s) covered by "
        + ("verified tokens" if report.anchored else "batches whose Merkle roots match")
        + (f"; the newest {total - stamped} are not stamped yet" if stamped < total else "")
    )
    if not report.anchored:
        print(
            "WARNING: no trust anchor given (--anchor or --ca): time-stamp tokens and their "
            "signatures were NOT checked against a trust anchor, and neither were their times"
        )
    for line in checkpoint_lines(report, server):
        print(line)
    return 0


def _progress_bar(what: str) -> Callable[[int, int], None]:
    """A progress bar on stderr: `what [#####.....] done/total`."""

    def progress(done: int, total: int) -> None:
        if total:
            width = 30
            filled = width * min(done, total) // total
            print(
                f"\r{what} [{'#' * filled}{'.' * (width - filled)}] {done}/{total}",
                end="",
                file=sys.stderr,
            )

    return progress


def _audit_archive(ns: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError
    from sqlalchemy.ext.asyncio import create_async_engine

    from gateway_ops.runtime import run
    from security_server.archive import archive_old_records
    from security_server.message_log import chain_names, check_chain_name

    url = _log_url(ns.db)
    if url is None:
        return 2
    if ns.older_than_days < 0:
        print("error: --older-than-days must be >= 0", file=sys.stderr)
        return 2
    now = datetime.now(UTC)
    before = now - timedelta(days=ns.older_than_days)
    show = sys.stderr.isatty() and not ns.quiet

    async def main() -> list[tuple[str, Any]]:
        engine = create_async_engine(url)
        try:
            chains = [check_chain_name(ns.chain)] if ns.chain else await chain_names(engine)
            done = []
            for chain in chains:
                moved = 0

                def progress(count: int, chain: str = chain) -> None:
                    nonlocal moved
                    moved += count
                    if show:
                        print(
                            f"\rarchiving chain {chain}: {moved} record(s)", end="", file=sys.stderr
                        )

                for item in await archive_old_records(
                    engine,
                    chain,
                    ns.archive_dir,
                    before=before,
                    now=now,
                    max_records=ns.max_records,
                    progress=progress,
                ):
                    done.append((chain, item))
                if show and moved:
                    print(file=sys.stderr)
            return done
        finally:
            await engine.dispose()

    try:
        done = run(main)
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"error: cannot archive: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    for chain, item in done:
        print(f"chain {chain}: records {item.first_seq}..{item.last_seq} -> {item.path}")
    print(f"{len(done)} archive file(s) written")
    return 0


def _log_url(db: str) -> str | None:
    """The database URL of `--db`, or None (with the reason on stderr) when no log is there."""
    from gateway.settings import database_url

    if "://" not in db and not Path(db).exists():
        print(f"error: no message log at {db}", file=sys.stderr)
        return None
    return database_url(db, base=Path.cwd())


def _load_cas(paths: list[Path] | None) -> list[Any] | None:
    """CA certificates from PEM files (`--ca`), or None when none are given."""
    if not paths:
        return None
    from cryptography import x509

    cas = []
    for path in paths:
        try:
            cas += x509.load_pem_x509_certificates(path.read_bytes())
        except ValueError:
            raise ValueError(f"{path} holds no PEM certificate") from None
    return cas


def _audit_export(ns: argparse.Namespace) -> int:
    from sqlalchemy.exc import SQLAlchemyError

    from gateway.errors import AuditError
    from gateway_ops.runtime import run
    from security_server.evidence import export_bundle, write_zip

    url = _log_url(ns.db)
    if url is None:
        return 2
    try:
        files = run(lambda: export_bundle(url, ns.message_id))
        write_zip(str(ns.out), files)
    except AuditError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return 1
    except (OSError, ValueError, SQLAlchemyError) as exc:
        print(f"error: {str(exc).splitlines()[0]}", file=sys.stderr)
        return 2
    records = json.loads(files["manifest.json"])["records"]
    print(
        f"wrote {ns.out}: {len(records)} record(s) of message {ns.message_id} ({', '.join(records)})"
    )
    return 0


def _audit_verify_bundle(ns: argparse.Namespace) -> int:
    import zipfile

    from gateway.errors import AuditError
    from gateway.evidence import BundleError, verify_bundle
    from security_server.evidence import read_zip

    try:
        files = read_zip(str(ns.bundle))
        cas = _load_cas(ns.ca)
    except (OSError, ValueError, zipfile.BadZipFile, AuditError) as exc:
        print(f"error: cannot read {ns.bundle}: {exc}", file=sys.stderr)
        return 2
    try:
        report = verify_bundle(
            files,
            trusted=cas,
            token_grace=timedelta(seconds=ns.token_grace),
            clock_skew=timedelta(seconds=ns.clock_skew),
        )
    except BundleError as exc:
        print(f"FAILED: {exc.message}")
        return 1
    except Exception as exc:  # a hostile bundle must fail, never crash the auditor's tool
        print(f"FAILED: the bundle is malformed ({type(exc).__name__}: {exc})")
        return 1
    for r in report.records:
        print(
            f"{r.folder}: record {r.seq} signed by {r.signer}; OCSP {r.ocsp_status} "
            f"(as of {r.ocsp_this_update.isoformat()}); time-stamped {r.stamped_at.isoformat()}"
            + ("; body matches" if r.body else "; body not stored")
        )
    print(f"OK: the evidence of message {report.message_id} verifies")
    if cas is None:
        print(
            "note: checked against the bundle's own ca.pem (SHA-256 "
            + ", ".join(report.ca_fingerprints)
            + "); pass --ca with your instance's CA to pin it"
        )
    return 0


def _demo(ns: argparse.Namespace) -> int:
    from gateway_demo.demo import run_demo

    return run_demo(workdir=ns.workdir, keep_running=ns.keep_running)


def _bench(ns: argparse.Namespace) -> int:
    from gateway_demo.bench import run_bench

    if ns.streams:
        from gateway_demo.bench_streams import run_streams_bench

        return run_streams_bench(
            workdir=ns.workdir, mib=ns.stream_mib, seconds=ns.seconds, repeats=ns.repeats
        )
    if ns.federation:
        from gateway_demo.bench_federation import run_federation_bench

        return run_federation_bench(workdir=ns.workdir, repeats=ns.repeats, calls=ns.calls)
    if ns.audit:
        from gateway_demo.bench_audit import run_audit_bench

        return run_audit_bench(
            workdir=ns.workdir,
            records=ns.records,
            repeats=ns.repeats,
            queries=ns.queries,
            database=ns.database,
        )
    if ns.scale is not None:
        from gateway_demo.bench_scale import run_scale_bench

        return run_scale_bench(ns.workdir, ns.scale, ns.repeats, ns.watchers)
    if ns.revocation:
        from gateway_demo.revocation import run_revocation_bench

        return run_revocation_bench(
            workdir=ns.workdir, repeats=ns.repeats, concurrency=min(ns.concurrency, 8)
        )
    return run_bench(
        workdir=ns.workdir,
        concurrency=ns.concurrency,
        seconds=ns.seconds,
        repeats=ns.repeats,
        body_bytes=ns.body_bytes,
        trace_ratio=ns.trace_ratio,
    )


def _backend(ns: argparse.Namespace) -> int:
    from gateway_demo.backends import serve_backends
    from gateway_ops.runtime import ready_writer, run, signal_events
    from gateway_ops.tracing import Tracing, TracingSettings

    listens = ns.listen or ["127.0.0.1:0"] * len(ns.names)
    if len(listens) != len(ns.names) or len(set(ns.names)) != len(ns.names):
        print("error: give each backend once, and one --listen for each", file=sys.stderr)
        return 2

    async def main() -> None:
        stop, _ = signal_events()
        backends = [
            (
                name,
                listen,
                Tracing(
                    TracingSettings(
                        otlp_endpoint=ns.otlp_endpoint,
                        service_name=os.environ.get("OTEL_SERVICE_NAME", ""),
                    ),
                    service_name=f"demo-backend-{name}",
                ),
            )
            for name, listen in zip(ns.names, listens, strict=True)
        ]
        await serve_backends(backends, stop=stop, on_ready=ready_writer(ns.ready_file))

    run(main)
    return 0


# the first argument of every command (`build_parser` builds only that one's part)
COMMANDS = frozenset(
    ("pki", "registry", "server", "backup-key", "audit", "admin", "demo", "bench", "demo-backend")
)


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The whole command line, or (`command`, the first argument) that command's part and
    the plain groups: the audit API and admin commands import their clients, which a
    `gateway server serve` process would otherwise load for nothing."""
    from cryptography import x509

    parser = argparse.ArgumentParser(prog="gateway", description="The interoperability gateway.")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pki = commands.add_parser("pki", help="development PKI").add_subparsers(
        dest="action", required=True
    )
    p = pki.add_parser("init", help="create a CA and every certificate a topology needs")
    p.add_argument(
        "--dir", type=Path, default=Path("var/pki"), help="output folder (default var/pki)"
    )
    p.add_argument(
        "--topology", type=Path, required=True, help="topology TOML naming members and servers"
    )
    p.add_argument("--instance", help="instance code (default: from the topology)")
    p.add_argument(
        "--registry-address", action="append", default=[], help="registry host:port for the anchor"
    )
    p.add_argument("--days", type=int, default=365, help="validity of the certificates")
    p.set_defaults(func=_pki_init)

    def identity(p: argparse.ArgumentParser) -> None:
        who = p.add_mutually_exclusive_group(required=True)
        who.add_argument("--server", help="a security server id: its authentication certificate")
        who.add_argument("--member", help="a member id: its signing certificate")
        p.add_argument(
            "--host",
            action="append",
            default=[],
            help="--server: an extra host name or address of its TLS certificate (repeatable)",
        )

    p = pki.add_parser(
        "csr",
        help="make a key and a certificate request for an external CA",
        description="Write OUT/<ID>.key (0600, never overwritten) and OUT/<ID>.csr, a PKCS#10 "
        "request with exactly the names and extensions the gateway requires (see "
        "gateway/certificate_profile.py).",
    )
    identity(p)
    p.add_argument("--out", type=Path, required=True, help="folder for the key and request")
    p.add_argument("--organisation", default="", help="the subject's organisation name")
    p.set_defaults(func=_pki_csr)
    p = pki.add_parser(
        "sign",
        help="sign a certificate request with the development CA, as an external CA would",
    )
    p.add_argument("--dir", type=Path, default=Path("var/pki"), help="PKI folder (default var/pki)")
    p.add_argument("--csr", type=Path, required=True, help="the request (PEM)")
    p.add_argument("--out", type=Path, required=True, help="where to write the certificate")
    p.add_argument("--days", type=int, default=365, help="validity of the certificate")
    p.set_defaults(func=_pki_sign)
    p = pki.add_parser(
        "import",
        help="check a certificate from a CA against its key and install it",
        description="Check the certificate against its key, the names and extensions the "
        "gateway requires, its validity and (with --ca) its issuer, printing each problem; "
        "install it into DIR/auth or DIR/sign only when there is none.",
    )
    identity(p)
    p.add_argument("--certificate", type=Path, required=True, help="the certificate (PEM)")
    p.add_argument("--key", type=Path, required=True, help="its key (PEM, from pki csr)")
    p.add_argument("--ca", type=Path, help="the CA certificate (PEM) that must have issued it")
    p.add_argument("--dir", type=Path, default=Path("var/pki"), help="PKI folder (default var/pki)")
    p.add_argument("--replace", action="store_true", help="replace an installed certificate")
    p.set_defaults(func=_pki_import)
    p = pki.add_parser(
        "revoke",
        help="revoke a certificate of the development CA",
        description="Record the revocation in DIR/revoked.json; a running `gateway pki serve "
        "--ocsp` answers 'revoked' from its next request.",
    )
    p.add_argument("--dir", type=Path, default=Path("var/pki"), help="PKI folder (default var/pki)")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--certificate", type=Path, help="the certificate (PEM) to revoke")
    which.add_argument(
        "--serial", type=_serial, metavar="HEX", help="serial number of a certificate in DIR"
    )
    p.add_argument(
        "--reason",
        default="unspecified",
        choices=[r.value for r in x509.ReasonFlags if r is not x509.ReasonFlags.remove_from_crl],
        help="RFC 5280 revocation reason (default unspecified)",
    )
    p.set_defaults(func=_pki_revoke)
    p = pki.add_parser(
        "serve",
        help="run the development OCSP responder and/or time-stamping authority",
        description="Serve over HTTP until SIGTERM or SIGINT; once listening, print one JSON "
        'line such as {"ocsp": "http://127.0.0.1:8888/"} (port 0 picks a free port).',
    )
    p.add_argument("--dir", type=Path, default=Path("var/pki"), help="PKI folder (default var/pki)")
    p.add_argument("--ocsp", type=_host_port, metavar="HOST:PORT", help="OCSP responder (RFC 6960)")
    p.add_argument("--tsa", type=_host_port, metavar="HOST:PORT", help="time-stamping (RFC 3161)")
    p.add_argument(
        "--ops",
        type=_host_port,
        metavar="HOST:PORT",
        default=("127.0.0.1", 0),
        help="operations port: /metrics, /healthz, /readyz (default 127.0.0.1:0, a free port)",
    )
    p.add_argument("--ready-file", type=Path, help="also write the JSON line here once listening")
    p.set_defaults(func=_pki_serve)

    reg = commands.add_parser("registry", help="the registry").add_subparsers(
        dest="action", required=True
    )
    p = reg.add_parser("serve", help="serve the signed configuration")
    p.add_argument("--config", type=Path, required=True, help="registry settings TOML")
    p.add_argument("--ready-file", type=Path, help="write JSON here once listening")
    p.set_defaults(func=_registry_serve)
    p = reg.add_parser(
        "token",
        help="issue an admin API token",
        description="Print a bearer token for the admin API, signed with the registry's "
        "token key (read from, or created next to, the registry settings).",
    )
    p.add_argument("--config", type=Path, required=True, help="registry settings TOML")
    p.add_argument(
        "--role",
        required=True,
        choices=["registry-admin", "member-admin", "auditor", "security-server"],
    )
    p.add_argument("--subject", required=True, help="who the token is for (a person or system)")
    p.add_argument("--member", help="member id: required for member-admin, optional for auditor")
    p.add_argument("--server", help="security server id: required for security-server")
    p.add_argument("--ttl", type=float, help="lifetime in seconds (default: api.token_ttl_seconds)")
    p.set_defaults(func=_registry_token)
    p = reg.add_parser(
        "anchor",
        help="print this registry's instance anchor (JSON)",
        description="Print the instance anchor (instance, configuration-signing certificate, "
        "configuration addresses) as JSON: what security servers install, and what another "
        "instance's registry administrator imports to federate with this one "
        "(`gateway admin federations add --anchor FILE`).",
    )
    p.add_argument("--config", type=Path, required=True, help="registry settings TOML")
    p.add_argument(
        "--address",
        action="append",
        default=[],
        metavar="HOST:PORT",
        help="a configuration address to publish (repeat; default: anchor_addresses, else listen)",
    )
    p.set_defaults(func=_registry_anchor)

    for action, what in (
        ("backup", "write a consistent backup of the registry's database to a zip file"),
        ("restore", "restore a backup into an empty database (the settings' `database`)"),
    ):
        p = reg.add_parser(action, help=what, description=what + "; see the README, Deploy.")
        p.add_argument("--config", type=Path, required=True, help="registry settings TOML")
        p.add_argument("--key", type=Path, required=True, help=KEY_HELP)
        if action == "backup":
            p.add_argument("--out", type=Path, required=True, help="the zip file to write")
        else:
            p.add_argument("--from", dest="source", type=Path, required=True, help="the backup")
            p.add_argument(
                "--skip-versions",
                type=int,
                default=10_000,
                metavar="N",
                help="go on with the configuration's versions N past the backup's, plus one "
                "per second (or per refresh_seconds, when shorter) since the backup was taken "
                "(default 10000: more than a registry's changes publish meanwhile), so that "
                "security servers take the restored registry's next version",
            )
        p.set_defaults(func=_registry_backup)

    srv = commands.add_parser("server", help="a security server").add_subparsers(
        dest="action", required=True
    )
    p = srv.add_parser("serve", help="run a security server")
    p.add_argument("--config", type=Path, required=True, help="security server settings TOML")
    p.add_argument("--ready-file", type=Path, help="write JSON here once listening")
    p.set_defaults(func=_server_serve)
    what = (
        "write a backup of a security server's state (settings, keys, configuration cache, "
        "OCSP answers, a SQLite message log) to a zip file"
    )
    p = srv.add_parser("backup", help=what, description=what + "; see the README, Deploy.")
    p.add_argument("--config", type=Path, required=True, help="security server settings TOML")
    p.add_argument("--out", type=Path, required=True, help="the zip file to write (mode 0600)")
    p.add_argument("--key", type=Path, required=True, help=KEY_HELP)
    p.add_argument(
        "--without-log",
        action="store_true",
        help="leave a SQLite message log out (archive it with `gateway audit archive`)",
    )
    p.set_defaults(func=_server_backup)
    what = "put a security server's backup back where it was taken from (the server stopped)"
    p = srv.add_parser("restore", help=what, description=what + "; see the README, Deploy.")
    p.add_argument("--from", dest="source", type=Path, required=True, help="the backup")
    p.add_argument("--key", type=Path, required=True, help=KEY_HELP)
    p.add_argument(
        "--force",
        action="store_true",
        help="replace files that exist with other content, and a message log that ends "
        "before the backup's",
    )
    p.set_defaults(func=_server_backup)

    what = (
        "write a new backup key: the secret that authenticates registry and server backups, "
        "kept apart from them"
    )
    p = commands.add_parser("backup-key", help=what, description=what + "; see the README.")
    p.add_argument("--out", type=Path, required=True, help="the key file to create (mode 0600)")
    p.set_defaults(func=_backup_key)

    aud = commands.add_parser("audit", help="auditor tools").add_subparsers(
        dest="action", required=True
    )
    p = aud.add_parser(
        "verify", help="verify the hash chains of a message log and of its archive files"
    )
    p.add_argument("--db", help="message log: SQLite file or database URL")
    p.add_argument(
        "--archive-dir",
        type=Path,
        help="folder of the log's archive files (needed once records were archived; "
        "alone, without --db, the archives are verified offline)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--ca",
        type=Path,
        action="append",
        help="CA certificates (PEM) to check time-stamp tokens against (a trust anchor; the "
        "CAs kept in the log are never trusted)",
    )
    p.add_argument(
        "--anchor",
        type=Path,
        help="the instance anchor (anchor.json): trust the CAs of the instance's signed "
        "configuration, fetched from the anchor's registry or given with --configuration",
    )
    p.add_argument(
        "--configuration",
        type=Path,
        help="with --anchor: a saved signed configuration instead of fetching the current "
        "one: a security server's STATE_DIR/configuration-parts folder, or a whole one "
        "(an older server's STATE_DIR/configuration.json)",
    )
    p.add_argument(
        "--check-stamps",
        action="store_true",
        help="refuse (exit 2) to run without a trust anchor, instead of warning that "
        "time-stamps were not checked",
    )
    p.add_argument(
        "--token-grace",
        type=float,
        default=DEFAULT_TOKEN_GRACE,
        metavar="SECONDS",
        help="fail when a batch was stamped later than its latest record by more than this "
        f"(default {DEFAULT_TOKEN_GRACE:g}: the default TSA failure period, stamping "
        "interval, TSA timeout and clock skew)",
    )
    p.add_argument(
        "--clock-skew",
        type=float,
        default=DEFAULT_CLOCK_SKEW,
        metavar="SECONDS",
        help="fail when a batch was stamped before its earliest record by more than this "
        f"(default {DEFAULT_CLOCK_SKEW:g}, limits.clock_skew_seconds)",
    )
    p.add_argument(
        "--checkpoints",
        metavar="URL|FILE",
        help="compare the log with the checkpoints the registry received from its server: "
        "the registry's admin API URL (with --server and an auditor --token) or a file "
        "written by `gateway audit checkpoints`",
    )
    p.add_argument("--server", help="with --checkpoints URL: the log's security server id")
    p.add_argument(
        "--token", help="with --checkpoints URL: auditor token (default: $GATEWAY_TOKEN)"
    )
    p.add_argument(
        "--stamp-grace",
        type=float,
        default=3600.0,
        metavar="SECONDS",
        help="fail when records logged longer ago than this are not time-stamped "
        "(default 3600; a negative value turns the check off, for logs kept without a TSA)",
    )
    p.set_defaults(func=_audit_verify)
    p = aud.add_parser(
        "archive", help="move old records into hash-linked archive files and prune the database"
    )
    p.add_argument("--db", required=True, help="message log: SQLite file or database URL")
    p.add_argument("--archive-dir", type=Path, required=True, help="folder of the archive files")
    p.add_argument(
        "--older-than-days",
        type=float,
        required=True,
        help="archive records logged more than this many days ago (0: every stamped record)",
    )
    p.add_argument("--chain", help="only this chain (default: every chain)")
    p.add_argument("--max-records", type=int, default=100_000, help="most records per archive file")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.set_defaults(func=_audit_archive)
    if command in (None, "audit"):
        from gateway_cli.audit import add_commands as add_audit_api_commands

        add_audit_api_commands(aud)
    p = aud.add_parser("export", help="write the evidence bundle of one exchange (zip)")
    p.add_argument("--db", required=True, help="message log: SQLite file or database URL")
    p.add_argument("--message-id", required=True, help="the exchange's message id")
    p.add_argument("--out", type=Path, required=True, help="the zip file to write")
    p.set_defaults(func=_audit_export)
    p = aud.add_parser("verify-bundle", help="verify an evidence bundle offline")
    p.add_argument("bundle", type=Path, help="the zip written by `gateway audit export`")
    p.add_argument(
        "--ca",
        type=Path,
        action="append",
        help="the CA certificates (PEM) you trust; default: the bundle's own ca.pem",
    )
    p.add_argument(
        "--token-grace",
        type=float,
        default=DEFAULT_TOKEN_GRACE,
        metavar="SECONDS",
        help="fail when a record was stamped, or logged, later than its header's time by "
        f"more than this (default {DEFAULT_TOKEN_GRACE:g}, as `audit verify`)",
    )
    p.add_argument(
        "--clock-skew",
        type=float,
        default=DEFAULT_CLOCK_SKEW,
        metavar="SECONDS",
        help=f"how far clocks may differ (default {DEFAULT_CLOCK_SKEW:g})",
    )
    p.set_defaults(func=_audit_verify_bundle)
    if command in (None, "audit"):
        from gateway_cli.verify import add_export_command

        add_export_command(aud)
    if command in (None, "admin"):
        from gateway_cli.admin import add_admin_commands

        add_admin_commands(commands)

    p = commands.add_parser("demo", help="run the demonstration topology")
    p.add_argument(
        "--workdir", type=Path, default=Path("var/demo"), help="folder for keys, logs, databases"
    )
    p.add_argument(
        "--keep-running", action="store_true", help="leave the topology running until Ctrl-C"
    )
    p.set_defaults(func=_demo)

    p = commands.add_parser("bench", help="benchmark gateway calls against direct calls")
    p.add_argument("--workdir", type=Path, default=Path("var/bench"))
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--seconds", type=float, default=5.0, help="duration of each measurement")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--body-bytes", type=int, default=1024)
    p.add_argument(
        "--trace-ratio",
        type=float,
        default=0.01,
        help="share of calls the traced topology records and exports (default 0.01; "
        "1 traces every call)",
    )
    p.add_argument(
        "--revocation",
        action="store_true",
        help="measure revoke-to-refusal time instead of throughput (concurrency capped at 8)",
    )
    p.add_argument(
        "--audit",
        action="store_true",
        help="measure the message log at scale instead: append, auditor search, verify",
    )
    p.add_argument("--records", type=int, default=1_000_000, help="--audit: records in the log")
    p.add_argument("--queries", type=int, default=500, help="--audit: searches per kind and repeat")
    p.add_argument(
        "--database",
        help="--audit: a PostgreSQL URL to use instead of SQLite (its log tables are dropped)",
    )
    p.add_argument(
        "--federation",
        action="store_true",
        help="measure a cross-border call against a local one, and the enforcement of an "
        "ended federation, on two instances",
    )
    p.add_argument(
        "--calls", type=int, default=300, help="--federation: sequential calls per target"
    )
    p.add_argument(
        "--streams",
        action="store_true",
        help="measure streaming calls instead: a large server-streamed transfer (MB/s, and "
        "each security server's peak memory growth) and 1 KiB messages on a bidirectional "
        "stream (messages/s), through the gateway and direct",
    )
    p.add_argument(
        "--stream-mib",
        type=int,
        default=1024,
        help="--streams: MiB of the transfer, in 1 MiB messages (default 1024: 1 GiB)",
    )
    p.add_argument(
        "--scale",
        type=float,
        metavar="F",
        help="measure the global configuration at F times a national instance (1,000 "
        "members, 500 servers, 5,000 services, 55,000 agreements at F = 1) instead",
    )
    p.add_argument("--watchers", type=int, default=20, help="--scale: concurrent Watch streams")
    p.set_defaults(func=_bench)

    p = commands.add_parser("demo-backend", help="run the demo's sample backends")
    p.add_argument("names", nargs="+", choices=["population", "vaccination"], metavar="NAME")
    p.add_argument(
        "--listen",
        action="append",
        help="host:port of each NAME, in their order (default 127.0.0.1:0 for each)",
    )
    p.add_argument(
        "--otlp-endpoint",
        default=os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT", ""),
        help="OTLP/HTTP collector (base URL) to send spans to; default "
        "OTEL_EXPORTER_OTLP_ENDPOINT, else no tracing",
    )
    p.add_argument("--ready-file", type=Path)
    p.set_defaults(func=_backend)
    return parser


def main(argv: list[str] | None = None) -> int:
    # structlog imports `rich`, when it is installed, to pretty-print exceptions in a
    # terminal. Our processes log JSON lines and never use it; only development tools
    # install it (import-linter, schemathesis), and importing it cost about 60 ms of CPU in
    # each of the hundreds of processes `make test` starts. Marked absent before structlog
    # is imported, so that a development machine starts a process as a production one does.
    sys.modules.setdefault("rich", None)  # type: ignore[arg-type]
    from gateway_ops.runtime import (
        configure_logging,
        die_with_parent,
        private_umask,
        tune_garbage_collector,
    )

    tune_garbage_collector()
    private_umask()
    die_with_parent()
    args = sys.argv[1:] if argv is None else argv
    ns = build_parser(args[0] if args and args[0] in COMMANDS else None).parse_args(args)
    configure_logging()
    try:
        return int(ns.func(ns))
    except ConfigFileError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        return 2
    except GatewayError as exc:
        print(f"error [{exc.code.value}]: {exc.message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
