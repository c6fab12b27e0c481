"""Start a whole topology as real processes on loopback: the registry, the security
servers and the sample backends, each with its own settings file, log file and ready
file. Used by `gateway demo`, `gateway bench` and the integration tests.

Each process writes a ready file once it listens; the runner waits on that signal (or on
the process's exit, reporting the end of its log) instead of sleeping.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import tomli_w

from certs.pki import init_pki, slug
from gateway.identifiers import MemberId, SecurityServerId, ServiceId, SubsystemId
from gateway_ops.runtime import read_settings

REPO_DEPLOY = Path(__file__).resolve().parent.parent / "deploy" / "demo"
TEMPLATE = REPO_DEPLOY / "topology.toml"
# the second instance of the federation demo (Argentina)
TEMPLATE_AR = REPO_DEPLOY / "topology-ar.toml"

# which sample backend implements which service of the demo topology
DEMO_BACKENDS = {
    "UY/GOV/DNIC/identity/population/v1": "population",
    "UY/GOV/MSP/clinics/vaccination/v1": "vaccination",
    "AR/GOB/RENAPER/identidad/poblacion/v1": "population",
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def reserve_port() -> socket.socket:
    """A socket bound to a free loopback port and not listening: while it is open, no other
    process's `bind` to port 0 or `connect` gets that port, so a server started later (or
    restarted) finds it free. The servers bind with SO_REUSEADDR (gRPC and aiohttp do),
    which Linux allows beside a socket that does not listen; connections go to the server."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    s.bind(("127.0.0.1", 0))
    return s


@dataclass
class Process:
    name: str
    args: list[str]
    log_path: Path
    ready_path: Path
    popen: subprocess.Popen[bytes] | None = None
    ready: dict[str, Any] = field(default_factory=dict)

    def peak_memory_kib(self) -> int | None:
        if self.popen is None:
            return None
        try:
            for line in Path(f"/proc/{self.popen.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None


class Runner:
    """A topology in `workdir`, from a topology template."""

    def __init__(
        self,
        workdir: Path,
        *,
        template: Path = TEMPLATE,
        validity_seconds: float = 600.0,
        refresh_seconds: float = 60.0,
        limits: dict[str, Any] | None = None,
        consumer_tls: frozenset[str] = frozenset(),
        registry_approval_required: bool = True,
        timestamping: dict[str, Any] | None = None,
        ocsp: dict[str, Any] | None = None,
        store_bodies: bool = False,
        log: dict[str, Any] | None = None,
        federation_allowed: tuple[str, ...] = (),
        outbound_approval_required: bool = False,
        auditor: dict[str, Any] | None = None,
        ops: dict[str, Any] | None = None,
        tracing: dict[str, Any] | None = None,
        trace_backends: bool = True,
        env: dict[str, str] | None = None,
        registry_replicas: int = 1,
        registry_database: str | None = None,
        separate_trust_services: bool = False,
        separate_backends: bool = False,
    ) -> None:
        self.workdir = workdir.resolve()
        # registry processes over one database (more than one needs `registry_database`, a
        # PostgreSQL URL): "registry", "registry-2", ...; the anchor names every one
        if registry_replicas > 1 and not (registry_database or "").startswith("postgresql"):
            raise ValueError("registry replicas need a PostgreSQL registry_database")
        self.registry_replicas = registry_replicas
        # the CA's OCSP responder and TSA as one `pki serve` process named "trust" (a
        # process less to start: the tests start dozens of topologies), or as two named
        # "ocsp" and "tsa" that can be stopped one without the other
        self.trust_services = ("ocsp", "tsa") if separate_trust_services else ("trust",)
        # the sample backends in one process "backend-all", or one each ("backend-NAME",
        # which a test can stop alone, and whose CPU the benchmark reads)
        self.separate_backends = separate_backends
        self.registry_database = registry_database
        # overrides of the servers' [ops] settings (metrics off, for the benchmark)
        self.ops = dict(ops or {})
        # the servers' [tracing] settings ({"otlp_endpoint": URL} turns it on); the sample
        # backends send their spans to the same `otlp_endpoint` unless `trace_backends` is
        # false (the benchmark measures the servers' tracing, not the backends')
        self.tracing = dict(tracing or {})
        self.trace_backends = trace_backends
        # environment variables added for every process (OTEL_BSP_SCHEDULE_DELAY, say)
        self.env = dict(env or {})
        # overrides of the servers' [log] settings (a PostgreSQL database, retention...)
        self.log = dict(log or {})
        # the other instances the servers' local policy allows exchanges with
        self.federation_allowed = federation_allowed
        # the registry's policy: cross-border calls need this instance's own approval too
        self.outbound_approval_required = outbound_approval_required
        self.registry_approval_required = registry_approval_required
        self.template = template
        self.validity_seconds = validity_seconds
        self.refresh_seconds = refresh_seconds
        self.limits = limits or {}
        # overrides of the servers' [auditor] settings (rate limits...)
        self.auditor = dict(auditor or {})
        # overrides of the servers' [timestamping] and [ocsp] settings; timestamping
        # {"enabled": False} runs the servers without a TSA
        self.timestamping = dict(timestamping or {})
        self.ocsp = dict(ocsp or {})
        self.store_bodies = store_bodies
        # servers whose consumer endpoint requires local clients' TLS certificates
        self.consumer_tls = consumer_tls
        self.processes: dict[str, Process] = {}
        self.topology: dict[str, Any] = {}
        self.registry_address = ""
        self.api_address = ""
        # every registry process's (configuration, admin API) addresses, by process name
        self.registries: dict[str, tuple[str, str]] = {}
        self.ocsp_address = ""
        self.tsa_address = ""
        self.consumers: dict[str, str] = {}  # server id -> consumer host:port
        self.auditors: dict[str, str] = {}  # server id -> auditor API host:port
        self.providers: dict[str, str] = {}  # server id -> provider host:port
        self.backends: dict[str, str] = {}  # backend name -> host:port
        self.server_names: dict[str, str] = {}  # server id -> process name
        # the topology's ports, held from `prepare` to `close` (see `reserve_port`): a port
        # picked and released early could be taken by anything on the machine before its
        # server binds it (parallel test workers make that likely enough to fail a run)
        self._reserved: list[socket.socket] = []

    # ---- preparation -----------------------------------------------------------------

    @property
    def pki(self) -> Path:
        return self.workdir / "pki"

    def prepare(self) -> None:
        """Write the PKI, the topology and every settings file into the workdir."""
        for sub in ("run", "logs", "state"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        topology = tomllib.loads(self.template.read_text())
        for number in range(1, self.registry_replicas + 1):
            name = "registry" if number == 1 else f"registry-{number}"
            self.registries[name] = (self.reserve_address(), self.reserve_address())
        self.registry_address, self.api_address = self.registries["registry"]
        self.ocsp_address = self.reserve_address()
        self.tsa_address = self.reserve_address()
        for server in topology.get("servers", []):
            self.providers[server["id"]] = server["address"] = self.reserve_address()
            self.consumers[server["id"]] = self.reserve_address()
            self.auditors[server["id"]] = self.reserve_address()
            sid = SecurityServerId.parse(server["id"])
            name = "ss-" + sid.owner.code.lower()
            if name in self.server_names.values():  # a member's second server
                name += "-" + sid.code.lower()
            self.server_names[server["id"]] = name
        for name in sorted(set(DEMO_BACKENDS.values())):
            self.backends[name] = self.reserve_address()
        self.topology = topology
        self.write_topology()
        instance = MemberId.parse(topology["members"][0]["id"]).instance
        init_pki(
            self.pki,
            instance=instance,
            members=[MemberId.parse(m["id"]) for m in topology["members"]],
            servers=[SecurityServerId.parse(s["id"]) for s in topology["servers"]],
            registry_addresses=[listen for listen, _ in self.registries.values()],
            now=datetime.now(UTC),
            local_clients={
                SecurityServerId.parse(s["id"]): [SubsystemId.parse(x) for x in s["subsystems"]]
                for s in topology["servers"]
                if s["id"] in self.consumer_tls
            },
        )
        self._write_registry(instance)
        # the CA's trust services: OCSP responder and time-stamping authority
        flags = {"ocsp": ["--ocsp", self.ocsp_address], "tsa": ["--tsa", self.tsa_address]}
        flags["trust"] = flags["ocsp"] + flags["tsa"]
        for name in self.trust_services:
            self.processes[name] = self._process(
                name, ["pki", "serve", "--dir", str(self.pki), *flags[name]]
            )
        for server in topology["servers"]:
            self._write_server(server)
        otlp = self.tracing.get("otlp_endpoint") if self.trace_backends else None
        groups = (
            [(f"backend-{name}", [name]) for name in self.backends]
            if self.separate_backends
            else [("backend-all", list(self.backends))]
        )
        for process, names in groups:
            self.processes[process] = self._process(
                process,
                ["demo-backend", *names]
                + [a for name in names for a in ("--listen", self.backends[name])]
                + (["--otlp-endpoint", otlp] if otlp else []),
            )

    def reserve_address(self) -> str:
        """A loopback address with a port reserved until `close`."""
        reserved = reserve_port()
        self._reserved.append(reserved)
        return f"127.0.0.1:{reserved.getsockname()[1]}"

    def write_topology(self) -> None:
        """Write the current topology for the registry (re-read on SIGHUP: see `reload_registry`)."""
        path = self.workdir / "topology.toml"
        tmp = path.with_suffix(".tmp")
        tmp.write_text(tomli_w.dumps(self.topology))
        os.replace(tmp, path)

    def _write_registry(self, instance: str) -> None:
        for name, (listen, api) in self.registries.items():
            settings = {
                "instance": instance,
                "listen": listen,
                "database": self.registry_database or str(self.workdir / "state" / "registry.db"),
                "topology": str(self.workdir / "topology.toml"),
                "ca_certificates": [str(self.pki / "ca.crt")],
                "signing_certificate": str(self.pki / "configuration-signing.crt"),
                "signing_key": str(self.pki / "configuration-signing.key"),
                "validity_seconds": self.validity_seconds,
                "refresh_seconds": self.refresh_seconds,
                # every process of a demo runs on loopback: one source address for all
                "configuration_calls_per_address": 0,
                "api": {
                    "listen": api,
                    "token_key": str(self.pki / "registry-token.key"),
                    # the console's auditor pages read the servers' auditor APIs
                    "auditor_apis": {sid: f"http://{a}" for sid, a in self.auditors.items()},
                },
                "policy": {
                    "registry_approval_required": self.registry_approval_required,
                    **(
                        {"outbound_approval_required": True}
                        if self.outbound_approval_required
                        else {}
                    ),
                },
            }
            path = self.workdir / f"{name}.toml"
            path.write_text(tomli_w.dumps(settings))
            self.processes[name] = self._process(name, ["registry", "serve", "--config", str(path)])

    def _write_server(self, server: dict[str, Any]) -> None:
        sid = server["id"]
        name = self.server_names[sid]
        owner = str(SecurityServerId.parse(sid).owner)
        state = self.workdir / "state" / name
        settings: dict[str, Any] = {
            "server": {
                "id": sid,
                "anchor": str(self.pki / "anchor.json"),
                "state_dir": str(state),
                # one pseudonym key for the instance: one subject, one pseudonym everywhere
                "subject_key": str(self.subject_key()),
            },
            "consumer": {"listen": self.consumers[sid], **self._consumer_tls_settings(sid)},
            "provider": {
                "listen": self.providers[sid],
                "tls_certificate": str(self.pki / "auth" / f"{slug(sid)}.crt"),
                "tls_key": str(self.pki / "auth" / f"{slug(sid)}.key"),
            },
            "signing": {
                owner: {
                    "certificate": str(self.pki / "sign" / f"{slug(owner)}.crt"),
                    "key": str(self.pki / "sign" / f"{slug(owner)}.key"),
                }
            },
            "log": {
                "database": str(state / "messagelog.db"),
                "store_bodies": self.store_bodies,
                **self.log,
            },
            "limits": dict(self.limits),
            "federation": {"allowed": list(self.federation_allowed)},
            "auditor": {
                "listen": self.auditors[sid],
                "jwks_url": f"http://{self.api_address}/.well-known/jwks.json",
                **self.auditor,
            },
            "ocsp": {"url": f"http://{self.ocsp_address}/", **self.ocsp},
            "timestamping": self._timestamping_settings(),
            "ops": dict(self.ops),
            "tracing": dict(self.tracing),
            "backends": {
                service: self.backends[backend]
                for service, backend in DEMO_BACKENDS.items()
                if str(ServiceId.parse(service).subsystem) in server["subsystems"]
            },
        }
        path = self.workdir / f"{name}.toml"
        path.write_text(tomli_w.dumps(settings))
        self.processes[name] = self._process(name, ["server", "serve", "--config", str(path)])

    def subject_key(self) -> Path:
        """The instance's data-subject pseudonym key, created once (mode 0600)."""
        path = self.pki / "subject-pseudonym.key"
        if not path.exists():
            import secrets

            self.pki.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "wb") as f:
                f.write(secrets.token_bytes(32))
        return path

    def auditor_url(self, server_id: str) -> str:
        return f"http://{self.auditors[server_id]}"

    def _timestamping_settings(self) -> dict[str, Any]:
        extra = dict(self.timestamping)
        if not extra.pop("enabled", True):
            return {"urls": [], **extra}
        return {"urls": [f"http://{self.tsa_address}/"], **extra}

    def local_tls(self, server_id: str) -> Path | None:
        """The folder of a server's local TLS material, if its consumer endpoint uses it."""
        return self.pki / "local" / slug(server_id) if server_id in self.consumer_tls else None

    def _consumer_tls_settings(self, server_id: str) -> dict[str, str]:
        folder = self.local_tls(server_id)
        if folder is None:
            return {}
        return {
            "tls_certificate": str(folder / "consumer.crt"),
            "tls_key": str(folder / "consumer.key"),
            "client_ca": str(folder / "ca.crt"),
        }

    def consumer_channel(self, server_id: str, client: str | None = None) -> grpc.aio.Channel:
        """A channel to a server's consumer endpoint, with `client`'s certificate when it uses TLS."""
        folder = self.local_tls(server_id)
        if folder is None:
            return grpc.aio.insecure_channel(self.consumers[server_id])
        credentials = grpc.ssl_channel_credentials(
            root_certificates=(folder / "ca.crt").read_bytes(),
            private_key=(folder / "clients" / f"{slug(client)}.key").read_bytes()
            if client
            else None,
            certificate_chain=(folder / "clients" / f"{slug(client)}.crt").read_bytes()
            if client
            else None,
        )
        return grpc.aio.secure_channel(self.consumers[server_id], credentials)

    def add_replica(self, server_id: str, chain: str, **log: Any) -> str:
        """Configure one more process of a security server (same identity and keys), writing
        its own chain `chain` of the log set by `log` (a shared PostgreSQL database);
        return the process name. Call after `prepare` and before `start_all`."""
        name = self.server_names[server_id]
        settings = tomllib.loads((self.workdir / f"{name}.toml").read_text())
        replica = f"{name}-{chain}"
        settings["server"]["state_dir"] = str(self.workdir / "state" / replica)
        settings["consumer"]["listen"] = self.reserve_address()
        settings["provider"]["listen"] = self.reserve_address()
        settings["auditor"]["listen"] = self.reserve_address()
        settings["log"] = {**settings["log"], **log, "chain": chain}
        path = self.workdir / f"{replica}.toml"
        path.write_text(tomli_w.dumps(settings))
        self.processes[replica] = self._process(replica, ["server", "serve", "--config", str(path)])
        return replica

    def set_log(self, server_id: str, **log: Any) -> None:
        """Change one server's [log] settings (after `prepare`, before it starts)."""
        self.set_settings(server_id, "log", **log)

    def set_settings(self, server_id: str, section: str, **values: Any) -> None:
        """Change one server's settings in one section (after `prepare`, before it starts)."""
        path = self.workdir / f"{self.server_names[server_id]}.toml"
        settings = tomllib.loads(path.read_text())
        settings[section] = {**settings.get(section, {}), **values}
        path.write_text(tomli_w.dumps(settings))

    def _process(self, name: str, args: list[str]) -> Process:
        return Process(
            name=name,
            args=args,
            log_path=self.workdir / "logs" / f"{name}.log",
            ready_path=self.workdir / "run" / f"{name}.ready.json",
        )

    def log_db(self, server_id: str) -> Path:
        return self.workdir / "state" / self.server_names[server_id] / "messagelog.db"

    def stamped(self, server_id: str) -> tuple[int, int]:
        """(last record covered by a time-stamp, last record) of a server's log, read-only."""
        import sqlite3

        db = sqlite3.connect(f"file:{self.log_db(server_id)}?mode=ro", uri=True)
        try:
            total = db.execute("SELECT COALESCE(MAX(seq), 0) FROM message_log").fetchone()[0]
            stamped = db.execute(
                "SELECT COALESCE(MAX(last_seq), 0) FROM timestamp_batches"
            ).fetchone()[0]
        finally:
            db.close()
        return int(stamped), int(total)

    # ---- processes -------------------------------------------------------------------

    def start(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Start one process and wait until it is ready."""
        self.launch(name)
        return self.wait_ready(name, timeout)

    def launch(self, name: str) -> None:
        """Start one process without waiting for it (`wait_ready` waits): a security server
        whose registry is down stays on its way up, its operations port already answering."""
        proc = self.processes[name]
        proc.ready_path.unlink(missing_ok=True)
        log = open(proc.log_path, "ab")  # noqa: SIM115 - owned by the child from now on
        # the child asks Linux to stop it when the runner dies (`GATEWAY_PARENT_PID`, see
        # gateway_ops.runtime.die_with_parent), so that a killed demo, benchmark or test never
        # leaves a topology running; done after exec, since Python code in a forked child
        # (preexec_fn) can crash while gRPC threads are busy in the parent
        env = {
            **os.environ,
            **self.env,
            "PYTHONUNBUFFERED": "1",
            "GATEWAY_PARENT_PID": str(os.getpid()),
        }
        proc.popen = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "gateway_cli.main",
                *proc.args,
                "--ready-file",
                str(proc.ready_path),
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=env,
            start_new_session=True,
        )
        log.close()

    def wait_ready(self, name: str, timeout: float = 30.0) -> dict[str, Any]:
        """Wait until a launched process has written its ready file; what it wrote."""
        proc = self.processes[name]
        assert proc.popen is not None, f"{name} was not launched"
        deadline = time.monotonic() + timeout
        while not proc.ready_path.exists():
            if proc.popen.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {proc.popen.returncode}:\n{self.tail(name)}"
                )
            if time.monotonic() > deadline:
                self.stop(name, kill=True)
                raise RuntimeError(f"{name} was not ready after {timeout} s:\n{self.tail(name)}")
            time.sleep(0.02)
        proc.ready = json.loads(proc.ready_path.read_text())
        return proc.ready

    def start_all(self) -> None:
        order = [n for n in self.processes if n.startswith("backend-")]
        order += self.trust_services
        for name in order:
            self.start(name)
        for name in self.registries:  # replicas start together, as a deployment's would
            self.launch(name)
        for name in self.registries:
            self.wait_ready(name)
        for name in [n for n in self.processes if n.startswith("ss-")]:
            self.start(name)

    def stop(self, name: str, *, kill: bool = False, timeout: float = 10.0) -> None:
        self._stop_together([name], kill=kill, timeout=timeout)

    def _stop_together(
        self, names: list[str], *, kill: bool = False, timeout: float = 10.0
    ) -> None:
        """Signal every process named, then wait for each (killed if still running after
        `timeout`): their shutdowns overlap instead of adding up."""
        running = [
            p.popen
            for p in (self.processes[n] for n in names)
            if p.popen is not None and p.popen.poll() is None
        ]
        for popen in running:
            popen.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for popen in running:
            try:
                popen.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                popen.kill()
                popen.wait()

    @property
    def ocsp_url(self) -> str:
        return f"http://{self.ocsp_address}/"

    def ops_url(self, name: str) -> str:
        """The operations port (`/metrics`, `/healthz`, `/readyz`) of a running process."""
        return str(self.processes[name].ready["ops"])

    def ops_urls(self) -> dict[str, str]:
        """Every running process's operations port, by process name (backends have none)."""
        return {n: str(p.ready["ops"]) for n, p in self.processes.items() if "ops" in p.ready}

    @property
    def instance(self) -> str:
        """The code of the topology's instance (UY, AR); known once `prepare` has run."""
        return MemberId.parse(self.topology["members"][0]["id"]).instance

    @property
    def api_url(self) -> str:
        """The registry's admin API base URL."""
        return f"http://{self.api_address}"

    def token(
        self,
        role: str,
        *,
        member: str | None = None,
        server: str | None = None,
        subject: str | None = None,
        ttl_seconds: float = 3600.0,
    ) -> str:
        """An admin API token, issued with the registry's key (as `gateway registry token`)."""
        from gateway_ops.auth import Role
        from registry.main import RegistrySettings, token_issuer

        settings = read_settings(RegistrySettings, self.workdir / "registry.toml")
        issuer = token_issuer(settings, self.workdir)
        return issuer.issue(
            subject=subject or f"{role}:{member or server or 'instance'}",
            role=Role(role),
            member=None if member is None else MemberId.parse(member),
            server=None if server is None else SecurityServerId.parse(server),
            now=datetime.now(UTC),
            ttl=timedelta(seconds=ttl_seconds),
        )

    def reload_registry(self) -> None:
        """Ask the registry to re-import the topology file and publish at once."""
        proc = self.processes["registry"]
        if proc.popen is not None:
            proc.popen.send_signal(signal.SIGHUP)

    def close(self) -> None:
        # the security servers and backends first, together; then the registry and the
        # trust services they may still talk to while shutting down
        services = {*self.registries, *self.trust_services}
        self._stop_together([n for n in self.processes if n not in services])
        self._stop_together([n for n in self.processes if n in services])
        for reserved in self._reserved:
            reserved.close()
        self._reserved.clear()

    def tail(self, name: str, lines: int = 30) -> str:
        try:
            return "\n".join(
                self.processes[name].log_path.read_text(errors="replace").splitlines()[-lines:]
            )
        except OSError:
            return "(no log)"

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
