"""The deployment files under deploy/, checked offline as `make test` can on a machine
without a container engine or a cluster: the image definition is linted (hadolint) and
installs every module the project has; the compose file passes `docker-compose config`;
the Kubernetes base and demo overlay build (`kubectl kustomize`) and every resource
validates against Kubernetes' schemas (kubernetes-validate, strict); the systemd units
pass `systemd-analyze verify`; and every settings file under deploy/ loads with the
processes' own loader, the two production examples naming every key there is.

What cannot run here (no Docker engine, no cluster, systemd not PID 1): building and
starting the image, `docker compose up`, applying the manifests, starting the units."""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import shutil
import subprocess
import sys
import tomllib
import typing
import zipfile
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from gateway_ops.runtime import read_settings
from registry.main import RegistrySettings
from registry.topology import load_topology_ids
from security_server.settings import ServerSettings

ROOT = Path(__file__).parents[2]
DEPLOY = ROOT / "deploy"
KUBERNETES_VERSION = "1.30"
BIN = Path(sys.executable).parent


def tool(name: str) -> str:
    found = shutil.which(name) or shutil.which(name, path=str(BIN))
    if found is None:
        pytest.skip(f"{name} is not installed (scripts/debian-packages or the dev extra)")
    return found


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, check=False, env=env)


# ---- settings ------------------------------------------------------------------------------


def setting_names(cls: type, prefix: str = "") -> set[str]:
    """Every key of a settings dataclass, dotted (tables of free keys as their table)."""
    names = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        inner = [a for a in typing.get_args(hint) if a is not type(None)]
        nested = hint if dataclasses.is_dataclass(hint) else (inner[0] if inner else None)
        if isinstance(nested, type) and dataclasses.is_dataclass(nested):
            names |= setting_names(nested, f"{prefix}{f.name}.")
        else:
            names.add(prefix + f.name)
    return names


def document_names(doc: dict[str, Any], prefix: str = "") -> set[str]:
    names = set()
    for key, value in doc.items():
        names.add(prefix + key)
        if isinstance(value, dict):
            names |= document_names(value, f"{prefix}{key}.")
    return names


@pytest.mark.parametrize(
    ("cls", "path"),
    [
        (ServerSettings, "examples/security-server.toml"),
        (RegistrySettings, "examples/registry.toml"),
    ],
)
def test_the_production_examples_load_and_name_every_key(cls: type, path: str) -> None:
    file = DEPLOY / path
    read_settings(cls, file)
    missing = setting_names(cls) - document_names(tomllib.loads(file.read_text()))
    assert not missing, f"{path} does not describe {sorted(missing)}"


SETTINGS_FILES = [
    (ServerSettings, "examples/agency-server.toml"),
    (RegistrySettings, "compose/config/registry.toml"),
    (ServerSettings, "compose/config/ss-msp.toml"),
    (ServerSettings, "compose/config/ss-dnic.toml"),
    (RegistrySettings, "kubernetes/base/registry.toml"),
    (ServerSettings, "kubernetes/base/security-server.toml"),
    (ServerSettings, "kubernetes/overlays/demo/ss-msp.toml"),
]


@pytest.mark.parametrize(("cls", "path"), SETTINGS_FILES, ids=[p for _, p in SETTINGS_FILES])
def test_every_settings_file_under_deploy_loads(cls: type, path: str) -> None:
    read_settings(cls, DEPLOY / path)


def test_the_compose_servers_are_those_of_its_topology() -> None:
    _, _, servers = load_topology_ids(DEPLOY / "compose" / "config" / "topology.toml")
    topology = tomllib.loads((DEPLOY / "compose" / "config" / "topology.toml").read_text())
    services = {s["id"] for s in topology["services"]}
    for name in ("ss-msp", "ss-dnic"):
        settings = read_settings(ServerSettings, DEPLOY / "compose" / "config" / f"{name}.toml")
        assert settings.server.id in {str(s) for s in servers}
        assert set(settings.backends) <= services
        address = next(s["address"] for s in topology["servers"] if s["id"] == settings.server.id)
        assert address == f"{name}:{settings.provider.listen.rsplit(':', 1)[1]}"


# ---- the container image -------------------------------------------------------------------


def test_the_image_definition_lints_clean_and_runs_unprivileged() -> None:
    dockerfile = DEPLOY / "container" / "Dockerfile"
    done = run(tool("hadolint"), str(dockerfile))
    assert done.returncode == 0, done.stdout + done.stderr
    text = dockerfile.read_text()
    final = text.rsplit("\nFROM ", 1)[1]
    assert re.search(r"^USER 10001:10001$", final, re.M)
    assert 'ENTRYPOINT ["gateway"]' in final


def test_the_image_installs_every_module_of_the_project(tmp_path: Path) -> None:
    """The image runs `pip install .` on what it copies: every package of the project is
    copied, and the wheel holds every tracked module and data file of them."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    patterns = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = sorted(
        p.name
        for p in ROOT.iterdir()
        if (p / "__init__.py").exists() and any(p.match(pattern) for pattern in patterns)
    )
    copied = re.findall(
        r"^COPY (\w+) \./\1$", (DEPLOY / "container" / "Dockerfile").read_text(), re.M
    )
    assert sorted(copied) == packages
    # built from a copy of the tracked files, as the image's build context holds them
    # (and so that no build folder is left in the checkout)
    tracked = run("git", "-C", str(ROOT), "ls-files").stdout.split()
    source = tmp_path / "source"
    for name in tracked:
        if (ROOT / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, source / name)
    done = run(
        sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation",
        "-w", str(tmp_path / "wheel"), str(source),
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    held = set(zipfile.ZipFile(wheel).namelist())
    tracked = [t for t in tracked if t.split("/", 1)[0] in packages]
    wanted = {t for t in tracked if t.endswith((".py", ".proto", ".mako"))}
    assert wanted and not wanted - held, sorted(wanted - held)


# ---- compose -------------------------------------------------------------------------------


def test_the_compose_file_is_valid_and_its_containers_locked_down() -> None:
    compose = str(DEPLOY / "compose" / "compose.yaml")
    checker = tool("docker-compose")
    env = {k: v for k, v in os.environ.items() if k != "POSTGRES_PASSWORD"}
    refused = run(checker, "-f", compose, "config", "-q", env=env)
    assert refused.returncode != 0 and "set POSTGRES_PASSWORD" in refused.stderr
    done = run(checker, "-f", compose, "config", env={**env, "POSTGRES_PASSWORD": "x"})
    assert done.returncode == 0, done.stderr
    services = yaml.safe_load(done.stdout)["services"]
    gateway = {name: s for name, s in services.items() if name != "postgres"}
    assert set(gateway) == {
        "pki-init", "trust", "registry", "ss-msp", "ss-dnic", "population", "vaccination",
    }  # fmt: skip
    for name, service in gateway.items():
        assert service["user"] == "10001:10001", name
        assert service["read_only"] is True, name
        assert service["cap_drop"] == ["ALL"], name
        assert "no-new-privileges:true" in service["security_opt"], name
    for name in ("registry", "ss-msp", "ss-dnic"):
        for port in services[name].get("ports", []):
            # docker-compose v1 prints a port as HOST_IP:PUBLISHED:TARGET
            assert str(port).startswith("127.0.0.1:"), (name, port)
    # a consumer endpoint takes the client it calls as from what the caller says: each
    # agency's backend shares a network with its own server only
    networks = {name: set(s.get("networks") or ()) for name, s in services.items()}
    for backend, own, other in (
        ("vaccination", "ss-msp", "ss-dnic"),
        ("population", "ss-dnic", "ss-msp"),
    ):
        assert networks[backend] & networks[own], (backend, networks)
        assert not networks[backend] & networks[other], (backend, networks)


# ---- Kubernetes ----------------------------------------------------------------------------


def validate(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def built(folder: Path) -> list[dict[str, Any]]:
    done = run(tool("kubectl"), "kustomize", str(folder))
    assert done.returncode == 0, done.stderr
    return [d for d in yaml.safe_load_all(done.stdout) if d]


def test_each_manifest_file_validates_and_the_validator_refuses_a_wrong_one() -> None:
    files = [f for f in (DEPLOY / "kubernetes").rglob("*.yaml") if f.name != "kustomization.yaml"]
    assert len(files) >= 4
    for file in files:
        for doc in yaml.safe_load_all(file.read_text()):
            validate(doc)
    deployment = next(
        d
        for d in yaml.safe_load_all((DEPLOY / "kubernetes" / "base" / "registry.yaml").read_text())
        if d["kind"] == "Deployment"
    )
    wrong = copy.deepcopy(deployment)
    wrong["spec"]["template"]["spec"]["containers"][0]["readinessProbe"]["httpGet"]["paht"] = "/"
    with pytest.raises(kubernetes_validate.ValidationError):
        validate(wrong)


@pytest.mark.parametrize("folder", ["base", "overlays/demo"])
def test_the_kustomizations_build_into_valid_locked_down_resources(folder: str) -> None:
    docs = built(DEPLOY / "kubernetes" / folder)
    for doc in docs:
        validate(doc)
    deployments = [d for d in docs if d["kind"] == "Deployment"]
    assert {d["metadata"]["name"] for d in deployments} == {"registry", "security-server"}
    # registries coordinate over PostgreSQL: two, one kept through a node's drain
    (registry,) = (d for d in deployments if d["metadata"]["name"] == "registry")
    assert registry["spec"]["replicas"] >= 2
    assert [d["spec"]["minAvailable"] for d in docs if d["kind"] == "PodDisruptionBudget"] == [1]
    for deployment in deployments:
        pod = deployment["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["automountServiceAccountToken"] is False
        secrets = {v["name"] for v in pod["volumes"] if "secret" in v}
        [container] = pod["containers"]
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "ops"}
        assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "ops"}
        assert {"cpu", "memory"} <= set(container["resources"]["requests"])
        # keys are files from Secrets, read-only; only database URLs come from the environment
        mounted = {m["name"]: m for m in container["volumeMounts"]}
        assert secrets and all(mounted[s]["readOnly"] for s in secrets)
        for variable in container.get("env", []):
            if "valueFrom" in variable:
                assert variable["name"].endswith("DATABASE"), variable
    if folder == "overlays/demo":
        assert {d["metadata"].get("namespace") for d in docs if d["kind"] != "Namespace"} == {
            "gateway-demo"
        }


# ---- systemd -------------------------------------------------------------------------------


def test_the_systemd_units_verify(tmp_path: Path) -> None:
    """`systemd-analyze verify` with the units' ExecStart pointed at this checkout's
    `gateway` (it checks that the program exists); no warning either."""
    analyze = tool("systemd-analyze")
    gateway = BIN / "gateway"
    units = []
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        text = unit.read_text().replace("/opt/gateway/bin/gateway", str(gateway))
        name = unit.name.replace("@.service", "@msp.service")
        (tmp_path / name).write_text(text)
        units.append(str(tmp_path / name))
    assert len(units) == 2
    done = run(analyze, "verify", *units)
    assert done.returncode == 0 and not done.stderr.strip(), done.stderr
    for written in units:
        text = Path(written).read_text()
        for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "CapabilityBoundingSet="):
            assert option in text, (written, option)
