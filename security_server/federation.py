"""The configurations of the other instances (countries) this security server may exchange with.

An instance's signed configuration lists the anchors of the instances it federates with
(`GlobalConfiguration.federations`). For each one that is active there AND allowed by
this server's local policy (`federation.allowed`; none by default), the server runs one
more `ConfigurationClient`: it fetches and watches that instance's own registry, verifies
every document against the anchor its own registry vouched for, keeps the last good copy
on disk (`STATE_DIR/configuration-INSTANCE.json`) and serves from it while that registry
is away, until it expires. When its own configuration ends a federation (pushed within
seconds) or drops it, the client is stopped and exchanges with that instance are refused.

`require(instance, now)` gives the configuration to decide a cross-border call with, or
raises with the reason, each with its own code: `instance_not_federated`,
`federation_ended` (ended by our registry, or by theirs: their configuration lists ours
as ended), `federation_not_allowed`, `federated_configuration_unavailable`,
`federated_configuration_expired`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path

import structlog

from gateway.configuration import Anchor, GlobalConfiguration, SecurityServer
from gateway.errors import Code, ConfigurationError, GatewayError
from security_server.background import stop
from security_server.config_client import ConfigurationClient

log = structlog.get_logger("security_server.federation")


class Federations:
    def __init__(
        self,
        own: ConfigurationClient,
        *,
        allowed: frozenset[str],
        state_dir: Path,
        clock: Callable[[], datetime],
    ) -> None:
        self.own = own
        self.allowed = allowed
        self.state_dir = state_dir
        self.clock = clock
        self.clients: dict[str, ConfigurationClient] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        self._hosted: tuple[str, ...] = ()

    def start(self) -> None:
        """Follow the own configuration's federations from now on (call inside the loop)."""
        self._running = True
        self.own.on_change(lambda _config: self.reconcile())
        self.reconcile()

    def reconcile(self) -> None:
        """Run a client for every active, allowed federation; stop the others."""
        config = self.own.current
        wanted: dict[str, Anchor] = {}
        if config is not None:
            wanted = {
                name: f.anchor
                for name, f in config.federations.items()
                if f.active and name in self.allowed
            }
        hosted = self.hosted()
        for name in list(self.clients):
            if name not in wanted or self.clients[name].anchor != wanted[name]:
                self._stop(name)
            elif self._hosted != hosted:
                # another instance's agreements are followed for the subsystems we host:
                # those changed, so watch again for the new ones
                self._stop(name)
        self._hosted = hosted
        for name, anchor in wanted.items():
            if name not in self.clients:
                self._start(name, anchor)

    def hosted(self) -> tuple[str, ...]:
        """The subsystems this server hosts, by its own configuration: whose agreements it
        follows in the other instances' configurations (as clients of their services)."""
        config = self.own.current
        if config is None:
            return ()
        return tuple(
            sorted(
                str(sub)
                for server in config.servers.values()
                if str(server.id) == self.own.server
                for sub in server.subsystems
            )
        )

    def _start(self, name: str, anchor: Anchor) -> None:
        client = ConfigurationClient(
            anchor=anchor,
            cache_file=self.state_dir / f"configuration-{name}.json",
            clock=self.clock,
            subsystems=self.hosted,
            max_message_bytes=self.own.max_message_bytes,
        )
        client.load_cached()
        self.clients[name] = client
        if self._running:
            self._tasks[name] = asyncio.create_task(client.run(), name=f"configuration-{name}")
        log.info("federation_followed", instance=name, addresses=list(anchor.addresses))

    def _stop(self, name: str) -> None:
        self.clients.pop(name, None)
        task = self._tasks.pop(name, None)
        if task is not None:
            task.cancel()
        log.info("federation_dropped", instance=name)

    async def close(self) -> None:
        tasks = list(self._tasks.values())
        self._tasks.clear()
        for task in tasks:
            await stop(task)

    def require(self, instance: str, now: datetime) -> GlobalConfiguration:
        """The configuration of another instance to decide a call with, or why there is none."""
        own = self.own.require(now)
        federation = own.federations.get(instance)
        if federation is None:
            raise GatewayError(
                f"instance {own.instance} does not federate with instance {instance}: no "
                "exchange with its members is possible",
                code=Code.INSTANCE_NOT_FEDERATED,
            )
        if not federation.active:
            raise GatewayError(
                f"the federation of instance {own.instance} with instance {instance} was "
                "ended by a registry administrator",
                code=Code.FEDERATION_ENDED,
            )
        if instance not in self.allowed:
            raise GatewayError(
                f"this security server's local policy does not allow exchanges with instance "
                f"{instance} (federation.allowed)",
                code=Code.FEDERATION_NOT_ALLOWED,
            )
        client = self.clients.get(instance)
        config = None if client is None else client.current
        if config is None:
            raise ConfigurationError(
                f"the configuration of instance {instance} has not been received yet: its "
                "registry has not been reached; retry shortly",
                code=Code.FEDERATED_CONFIGURATION_UNAVAILABLE,
            )
        try:
            config.check_current(now)
        except ConfigurationError as err:
            raise ConfigurationError(
                err.message, code=Code.FEDERATED_CONFIGURATION_EXPIRED
            ) from None
        theirs = config.federations.get(own.instance)
        if theirs is not None and not theirs.active:
            # ended on the other side: its signed configuration says so
            raise GatewayError(
                f"instance {instance} ended its federation with instance {own.instance}: no "
                "exchange with its members is possible",
                code=Code.FEDERATION_ENDED,
            )
        return config

    def ended(self, instance: str, now: datetime) -> bool:
        """Whether our configuration lists a federation with `instance` that was ended."""
        federation = self.own.require(now).federations.get(instance)
        return federation is not None and not federation.active

    def configurations(self) -> Iterator[GlobalConfiguration]:
        """The current configurations of the federated instances followed (expired included:
        callers check expiry where it matters)."""
        for client in list(self.clients.values()):
            if client.current is not None:
                yield client.current

    def server_by_certificate(
        self, fingerprint: str, now: datetime, claimed: str | None = None
    ) -> tuple[GlobalConfiguration, SecurityServer] | None:
        """The security server registered with this TLS certificate, in our instance or in a
        federated one, with the configuration that registers it. Ours is looked at first,
        then the one of the instance the certificate names (`claimed`, its common name's):
        another instance listing a third one's server certificate (public in that one's
        configuration) under a server of its own cannot take that server's connections."""
        own = self.own.require(now)
        server = own.servers_by_auth_sha256.get(fingerprint)
        if server is not None:
            return own, server
        for config in sorted(self.configurations(), key=lambda c: c.instance != claimed):
            server = config.servers_by_auth_sha256.get(fingerprint)
            if server is not None:
                return self.require(config.instance, now), server
        return None

    def ca_pem(self) -> bytes:
        """The CAs of our instance and of every followed federated instance, for TLS."""
        own = self.own.current
        parts = [own.ca_pem] if own is not None else []
        parts += [c.ca_pem for c in self.configurations()]
        return b"".join(parts)
