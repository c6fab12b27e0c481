"""`gateway admin` as an administrator runs it: the real command against a real registry."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from gateway_demo.runner import Runner, free_port

from .conftest import IDENTITY, VACCINATION

GATEWAY = Path(sys.executable).parent / "gateway"
DNIC_MEMBER, MSP_MEMBER = "UY/GOV/DNIC", "UY/GOV/MSP"


@pytest.fixture(scope="module")
def runner(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Runner]:
    """A registry of the demo topology; the admin API needs no security server or backend."""
    runner = Runner(tmp_path_factory.mktemp("admin-cli") / "run")
    runner.prepare()
    try:
        runner.start("registry")
        yield runner
    finally:
        runner.close()


def admin(
    *args: str, url: str | None = None, token: str | None = None
) -> subprocess.CompletedProcess[str]:
    """Run `gateway admin ARGS` with the URL and token in the environment, as documented."""
    env = {
        k: v for k, v in os.environ.items() if k not in ("GATEWAY_REGISTRY_URL", "GATEWAY_TOKEN")
    }
    if url is not None:
        env["GATEWAY_REGISTRY_URL"] = url
    if token is not None:
        env["GATEWAY_TOKEN"] = token
    return subprocess.run(
        [str(GATEWAY), "admin", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, f"exit {result.returncode}: {result.stderr}"
    return result.stdout


def test_agreement_lifecycle_from_the_command_line(runner: Runner) -> None:
    """Request, two approvals, list, show, revoke, then the admin log shows and verifies it."""
    url = runner.api_url
    dnic = runner.token("member-admin", member=DNIC_MEMBER, subject="lucia.silva@dnic")
    msp = runner.token("member-admin", member=MSP_MEMBER, subject="martin.garcia@msp")
    registry = runner.token("registry-admin", subject="ana.perez@agesic")

    requested = json.loads(
        ok(
            admin(
                "agreements",
                "request",
                "--client",
                IDENTITY,
                "--service",
                VACCINATION,
                "--purpose",
                "identity-check",
                "--basis",
                "law",
                "--reference",
                "Ley 18.331, art. 9",
                "--rate",
                "100/60",
                "--reason",
                "check vaccination status",
                "--json",
                url=url,
                token=dnic,
            )
        )
    )
    agreement = requested["id"]
    assert requested["state"] == "requested"
    assert requested["rate_limit"] == {"requests": 100, "per_seconds": 60}

    shown = ok(admin("agreements", "approve", agreement, "--reason", "fine", url=url, token=msp))
    assert "state:           approved_by_provider" in shown.splitlines()
    ok(admin("agreements", "approve", agreement, url=url, token=registry))

    table = ok(admin("agreements", "list", "--member", DNIC_MEMBER, url=url, token=registry))
    header, *rows = table.splitlines()
    assert header.split() == ["ID", "STATE", "CLIENT", "SERVICE", "PURPOSES", "VALID", "UNTIL"]
    row = next(r for r in rows if r.startswith(agreement + " "))
    assert row.split()[:5] == [agreement, "active", IDENTITY, VACCINATION, "identity-check"]

    listed = json.loads(ok(admin("agreements", "list", "--json", url=url, token=registry)))
    assert {a["id"]: a["state"] for a in listed}[agreement] == "active"
    one = json.loads(ok(admin("--json", "agreements", "show", agreement, url=url, token=dnic)))
    assert one["state"] == "active"
    assert one["legal_basis"] == {"kind": "law", "reference": "Ley 18.331, art. 9"}

    revoked = ok(
        admin("agreements", "revoke", agreement, "--reason", "end of the pilot", url=url, token=msp)
    )
    assert "state:           revoked" in revoked.splitlines()

    log = ok(admin("log", "list", "--limit", "1000", url=url, token=registry))
    header, *entries = log.splitlines()
    assert header.split() == ["SEQ", "TIME", "ACTOR", "ACTION", "TARGET", "FROM→TO", "REASON"]
    mine = [e for e in entries if f" {agreement} " in e]
    steps = [e.split()[2:6] for e in mine]
    assert steps == [
        ["lucia.silva@dnic", "request", agreement, "→requested"],
        ["martin.garcia@msp", "approve", agreement, "requested→approved_by_provider"],
        ["ana.perez@agesic", "approve", agreement, "approved_by_provider→active"],
        ["martin.garcia@msp", "revoke", agreement, "active→revoked"],
    ]
    assert mine[-1].endswith("  end of the pilot")

    verified = admin("log", "verify", url=url, token=registry)
    assert ok(verified).startswith("admin log verified: ")
    assert f"{len(entries)} entries, last hash " in verified.stdout


def test_without_a_token_the_command_is_a_usage_error(runner: Runner) -> None:
    """No --token and no GATEWAY_TOKEN: exit 2 and say how to give one."""
    result = admin("agreements", "list", url=runner.api_url)
    assert result.returncode == 2
    assert "no admin API token" in result.stderr
    assert "GATEWAY_TOKEN" in result.stderr
    assert result.stdout == ""


def test_a_reason_is_required_to_revoke(runner: Runner) -> None:
    """`revoke` without --reason is refused by argparse (exit 2) before any request."""
    token = runner.token("registry-admin")
    result = admin("agreements", "revoke", "AGR-2026-0001", url=runner.api_url, token=token)
    assert result.returncode == 2
    assert "--reason" in result.stderr


def test_a_forbidden_request_exits_1_with_the_registrys_message(runner: Runner) -> None:
    """MSP's administrator may not request agreements on behalf of DNIC's subsystem: 403."""
    msp = runner.token("member-admin", member=MSP_MEMBER)
    result = admin(
        "agreements",
        "request",
        "--client",
        IDENTITY,
        "--service",
        VACCINATION,
        "--purpose",
        "identity-check",
        "--basis",
        "consent",
        "--reference",
        "form 12",
        url=runner.api_url,
        token=msp,
    )
    assert result.returncode == 1
    assert result.stderr.startswith("error (403 forbidden): ")
    assert f"member administrator of {DNIC_MEMBER} may request agreements" in result.stderr
    assert result.stdout == ""


def test_an_unreachable_registry_exits_1_naming_the_url(runner: Runner) -> None:
    """Nothing listens at the URL: exit 1 with a message that names it."""
    url = f"http://127.0.0.1:{free_port()}"
    result = admin("log", "verify", url=url, token=runner.token("registry-admin"))
    assert result.returncode == 1
    assert result.stderr.startswith(f"error (unreachable): cannot reach the registry at {url}")


def test_registry_token_command_issues_a_token_the_api_accepts(runner: Runner) -> None:
    """`gateway registry token` prints a token the admin API accepts, scoped as asked."""
    config = str(runner.workdir / "registry.toml")
    base = [str(GATEWAY), "registry", "token", "--config", config, "--role", "member-admin"]
    issued = subprocess.run(
        [*base, "--member", "UY/GOV/MSP", "--subject", "carla@msp", "--ttl", "60"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert issued.returncode == 0, issued.stderr
    listed = json.loads(
        ok(admin("agreements", "list", "--json", url=runner.api_url, token=issued.stdout.strip()))
    )
    assert listed
    assert all("UY/GOV/MSP/" in a["client"] + a["service"] for a in listed)
    unscoped = subprocess.run(
        [*base, "--subject", "nobody"], capture_output=True, text=True, check=False
    )
    assert unscoped.returncode == 2
    assert "member" in unscoped.stderr


def test_a_service_with_streaming_methods_from_the_command_line(runner: Runner) -> None:
    """`services add --stream M=KIND` lists a streaming method in the catalogue; a kind the
    gateway does not know, or one of a method the service does not list, is refused."""
    token = runner.token("member-admin", member="UY/GOV/DNIC", subject="dnic-admin")
    service = "UY/GOV/DNIC/identity/census/v1"
    export = "/demo.census.v1.Census/Export"
    base = ("services", "add", "--id", service, "--description", "census exports")
    added = json.loads(
        ok(
            admin(
                "--json",
                *base,
                "--method",
                export,
                "--stream",
                f"{export}=server",
                url=runner.api_url,
                token=token,
            )
        )
    )
    assert added["streams"] == {export: "server"}
    other = ("--id", "UY/GOV/DNIC/identity/census2/v1", "--description", "d", "--method", export)
    refused = admin(
        "services", "add", *other, "--stream", f"{export}=sideways",
        url=runner.api_url, token=token,
    )  # fmt: skip
    assert refused.returncode == 1 and "sideways" in refused.stderr, refused.stderr
    unlisted = admin(
        "services", "add", *other, "--stream", "/demo.census.v1.Census/Other=bidi",
        url=runner.api_url, token=token,
    )  # fmt: skip
    assert unlisted.returncode == 1 and "not one of the service's methods" in unlisted.stderr
    malformed = admin(
        "services", "add", *other, "--stream", "server", url=runner.api_url, token=token
    )
    assert malformed.returncode == 2 and "METHOD=KIND" in malformed.stderr
