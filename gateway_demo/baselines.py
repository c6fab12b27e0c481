"""The baselines `gateway bench` measures the gateway against, as real processes.

- **nginx**: two nginx instances (Debian's package), one worker each, as the two hops a
  user would put in front of a backend: the first takes plain gRPC and passes it over
  mutual TLS (`grpc_pass grpcs://`, the demo's authentication certificates and CA, the
  provider server's name verified) to the second, which requires the client certificate
  and passes the call in plain gRPC to the backend.
- **bare**: the same two hops as two Python processes (`gateway_demo.forwarder`).

Each is started with configuration generated here, on ports reserved by the runner, and
stopped by `close`. `cpu_seconds` reads the CPU time a process and its children (nginx's
workers) used so far, from /proc, so that the bench can give each target's CPU per call.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from gateway.identifiers import SecurityServerId, server_dns_name

CONSUMER_SERVER = "UY/GOV/MSP/ss1"
PROVIDER_SERVER = "UY/GOV/DNIC/ss1"
_TICKS = os.sysconf("SC_CLK_TCK")


def _auth(pki: Path, server: str) -> tuple[Path, Path]:
    name = server.replace("/", "_")
    return pki / "auth" / f"{name}.crt", pki / "auth" / f"{name}.key"


def _wait_listening(address: str, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> None:
    host, port = address.rsplit(":", 1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the process for {address} exited with {proc.returncode}")
        try:
            with socket.create_connection((host, int(port)), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on {address} after {timeout:.0f} s")


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


def cpu_seconds(pid: int, *, children: bool = False) -> float:
    """User and system CPU time of `pid` (and of its children now alive), in seconds."""
    total = 0.0
    for p in [pid, *(_children(pid) if children else [])]:
        try:
            fields = Path(f"/proc/{p}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        total += (int(fields[11]) + int(fields[12])) / _TICKS  # utime, stime
    return total


@dataclass
class Baseline:
    """Two hops in front of the backend: where to call, and the processes to account."""

    name: str
    address: str
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)
    # nginx masters: their workers are children, whose CPU counts too
    with_children: bool = False

    def cpu_seconds(self) -> float:
        return sum(cpu_seconds(p.pid, children=self.with_children) for p in self.processes)

    def close(self) -> None:
        for p in self.processes:
            if p.poll() is None:
                p.terminate()
        for p in self.processes:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def start_bare(pki: Path, backend: str, reserve: object) -> Baseline:
    """The two Python hops (`reserve()` gives a free loopback address)."""
    first, second = reserve(), reserve()  # type: ignore[operator]
    ca = pki / "ca.crt"
    server_crt, server_key = _auth(pki, PROVIDER_SERVER)
    client_crt, client_key = _auth(pki, CONSUMER_SERVER)
    command = [sys.executable, "-m", "gateway_demo.forwarder"]
    hop2 = subprocess.Popen(
        [
            *command,
            "--listen",
            second,
            "--target",
            backend,
            "--tls-certificate",
            str(server_crt),
            "--tls-key",
            str(server_key),
            "--client-ca",
            str(ca),
        ],
        stdout=subprocess.DEVNULL,
    )
    hop1 = subprocess.Popen(
        [
            *command,
            "--listen",
            first,
            "--target",
            second,
            "--target-ca",
            str(ca),
            "--certificate",
            str(client_crt),
            "--key",
            str(client_key),
            "--target-name",
            server_dns_name(SecurityServerId.parse(PROVIDER_SERVER)),
        ],
        stdout=subprocess.DEVNULL,
    )
    baseline = Baseline("bare", first, [hop1, hop2])
    try:
        _wait_listening(second, hop2)
        _wait_listening(first, hop1)
    except RuntimeError:
        baseline.close()
        raise
    return baseline


NGINX_COMMON = """worker_processes 1;
daemon off;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;
{user}
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {folder}/body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;
{body}
}}
"""

NGINX_FIRST = """    upstream second {{ server {second}; keepalive 64; }}
    server {{
        listen {first} http2;
        location / {{
            grpc_pass grpcs://second;
            grpc_ssl_certificate {client_crt};
            grpc_ssl_certificate_key {client_key};
            grpc_ssl_trusted_certificate {ca};
            grpc_ssl_verify on;
            grpc_ssl_name {name};
            grpc_ssl_server_name on;
            grpc_ssl_session_reuse on;
        }}
    }}"""

NGINX_SECOND = """    upstream backend {{ server {backend}; keepalive 64; }}
    server {{
        listen {second} ssl http2;
        ssl_certificate {server_crt};
        ssl_certificate_key {server_key};
        ssl_client_certificate {ca};
        ssl_verify_client on;
        location / {{ grpc_pass grpc://backend; }}
    }}"""


def nginx_missing() -> str | None:
    """Why the nginx baseline cannot run here, or None."""
    if shutil.which("nginx") is None:
        return "nginx is not installed (Debian: apt-get install nginx; make bench installs it)"
    return None


def start_nginx(pki: Path, backend: str, reserve: object, folder: Path) -> Baseline:
    """The two nginx hops, configuration in `folder`."""
    first, second = reserve(), reserve()  # type: ignore[operator]
    ca = pki / "ca.crt"
    server_crt, server_key = _auth(pki, PROVIDER_SERVER)
    client_crt, client_key = _auth(pki, CONSUMER_SERVER)
    # as root, nginx's workers would run as nobody, who cannot read the 0600 key files the
    # second hop's worker needs to resume TLS sessions: keep them root for the bench
    user = "user root;" if os.geteuid() == 0 else ""
    processes = []
    for hop, body in (
        (
            "second",
            NGINX_SECOND.format(
                second=second, backend=backend, server_crt=server_crt, server_key=server_key, ca=ca
            ),
        ),
        (
            "first",
            NGINX_FIRST.format(
                first=first,
                second=second,
                client_crt=client_crt,
                client_key=client_key,
                ca=ca,
                name=server_dns_name(SecurityServerId.parse(PROVIDER_SERVER)),
            ),
        ),
    ):
        hop_folder = folder / hop
        hop_folder.mkdir(parents=True, exist_ok=True)
        conf = hop_folder / "nginx.conf"
        conf.write_text(NGINX_COMMON.format(folder=hop_folder, user=user, body=body))
        processes.append(
            subprocess.Popen(
                ["nginx", "-c", str(conf), "-p", str(hop_folder)],
                stdout=subprocess.DEVNULL,
                stderr=(hop_folder / "stderr.log").open("wb"),
            )
        )
    baseline = Baseline("nginx", first, processes, with_children=True)
    try:
        _wait_listening(second, processes[0])
        _wait_listening(first, processes[1])
    except RuntimeError as exc:
        baseline.close()
        errors = " ".join(
            (folder / hop / "error.log").read_text()[-500:]
            for hop in ("second", "first")
            if (folder / hop / "error.log").exists()
        )
        raise RuntimeError(f"{exc}: {errors}") from None
    return baseline
