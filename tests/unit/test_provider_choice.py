"""Which of the servers hosting a service a consumer sends a call to
(`security_server.peers.ProviderChoice`): unmeasured first, then the fastest by moving
average; an unreachable one last until its retry time."""

from __future__ import annotations

from gateway.configuration import SecurityServer
from gateway.identifiers import SecurityServerId, SubsystemId
from security_server.peers import ProviderChoice
from tests.unit.conftest import build_ca, build_certificate

CA = build_ca()


def server(code: str) -> SecurityServer:
    sid = SecurityServerId.parse(f"UY/GOV/DNIC/{code}")
    return SecurityServer(
        id=sid,
        address="127.0.0.1:1",
        auth_certificate=build_certificate(CA, str(sid), kind="auth").certificate_der,
        subsystems=(SubsystemId.parse("UY/GOV/DNIC/identity"),),
    )


def test_the_fastest_first_and_the_unreachable_last_until_its_retry_time() -> None:
    now = [0.0]
    choice = ProviderChoice(retry_seconds=5.0, clock=lambda: now[0])
    a, b, c = server("a"), server("b"), server("c")
    choice.answered(a, 0.010)
    choice.answered(b, 0.002)
    assert [s.id.code for s in choice.order((a, b, c))] == ["c", "b", "a"]
    choice.answered(c, 0.005)
    assert [s.id.code for s in choice.order((a, b, c))] == ["b", "c", "a"]
    # a moving average: one slow answer does not undo a server's record at once
    choice.answered(b, 0.012)
    assert [s.id.code for s in choice.order((a, b, c))] == ["b", "c", "a"]
    choice.unreachable(b)
    assert [s.id.code for s in choice.order((a, b, c))] == ["c", "a", "b"]
    now[0] = 6.0
    assert [s.id.code for s in choice.order((a, b, c))] == ["b", "c", "a"]
    # a server that answers again is no longer held back
    choice.unreachable(c)
    choice.answered(c, 0.001)
    assert [s.id.code for s in choice.order((a, b, c))] == ["b", "c", "a"]
