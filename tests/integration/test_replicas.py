"""Several replicas of one security server writing one PostgreSQL message log.

Two processes of the Ministry of Health's security server (same identity, same keys),
each with its own hash chain (`log.chain`), share one PostgreSQL database; clients call
both at once. Both chains must verify, with their time-stamps, and every call answered
must have its records in the chain of the replica that served it (nothing lost). A third
process claiming a chain already in use must refuse to start. The population registry's
server (ss-dnic) runs as two replicas on the same log too, so that an envelope one of them
accepted can be replayed to the other. The module creates a database of its own.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import grpc
import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives import serialization
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.envelope import decode_request
from gateway.v1 import exchange_pb2 as pb
from gateway_demo.client import call_raw, routing_metadata
from gateway_demo.generated import population_pb2 as population
from gateway_demo.runner import Runner
from tests.integration.attacker import fetch_ocsp, open_stream, request_frame

from .clinics import signed_request, signer_of
from .conftest import (
    CLINICS,
    DNIC,
    GET_PERSON,
    MSP,
    POPULATION,
    postgres_database,
    run_gateway,
)

POSTGRES = os.environ.get("GATEWAY_TEST_POSTGRES_URL")

pytestmark = pytest.mark.skipif(
    not POSTGRES, reason="GATEWAY_TEST_POSTGRES_URL is not set: PostgreSQL replica tests skipped"
)


@pytest.fixture(scope="module")
def replicas(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Runner, str, str]]:
    """Two replicas of ss-msp (chains msp-a, msp-b) and two of ss-dnic (dnic-a, dnic-b)
    sharing one PostgreSQL log, in a database of this module's own; yields the runner, the
    second ss-msp replica's name and the database's URL."""
    with postgres_database("replicas_test") as (_, url):
        runner = Runner(tmp_path_factory.mktemp("replicas") / "run")
        try:
            runner.prepare()
            runner.set_log(MSP, database=url, chain="msp-a")
            second = runner.add_replica(MSP, "msp-b", database=url)
            runner.set_log(DNIC, database=url, chain="dnic-a")
            runner.add_replica(DNIC, "dnic-b", database=url)
            runner.start_all()
            yield runner, second, url
        finally:
            runner.close()


async def _load(
    address: str, seconds: float, callers: int, *, failures_allowed: bool = False
) -> list[str]:
    """Call GetPerson through one consumer endpoint for `seconds`; the ids answered OK."""
    request = population.GetPersonRequest(national_id="1.234.567-8").SerializeToString()
    answered: list[str] = []
    loop = asyncio.get_running_loop()
    end = loop.time() + seconds
    async with grpc.aio.insecure_channel(address) as channel:

        async def caller() -> None:
            while loop.time() < end:
                outcome = await call_raw(
                    channel,
                    GET_PERSON,
                    request,
                    routing_metadata(
                        client=CLINICS, service=POPULATION, purpose="healthcare-identification"
                    ),
                )
                if outcome.code == grpc.StatusCode.OK:
                    answered.append(outcome.trailing["gateway-id"])
                elif failures_allowed:
                    await asyncio.sleep(0.05)
                else:
                    raise AssertionError(outcome)

        await asyncio.gather(*(caller() for _ in range(callers)))
    return answered


async def _chain_ids(url: str) -> dict[str, dict[str, set[str]]]:
    """Per chain: the message ids of its request and of its response records."""
    engine = create_async_engine(url)
    try:
        async with engine.connect() as conn:
            rows = await conn.execute(
                sa.text("SELECT chain, kind, message_id FROM message_log WHERE role = 'consumer'")
            )
            out: dict[str, dict[str, set[str]]] = {}
            for chain, kind, message_id in rows:
                out.setdefault(chain, {}).setdefault(kind, set()).add(message_id)
            return out
    finally:
        await engine.dispose()


def test_two_replicas_under_load_keep_two_verifiable_chains_and_lose_nothing(
    replicas: tuple[Runner, str, str],
) -> None:
    """Both replicas serve at once into one database; each call answered is in its
    replica's chain (request and response), and `audit verify` passes both chains with
    their time-stamps."""
    runner, second, url = replicas
    first_address = runner.consumers[MSP]
    second_address = runner.processes[second].ready["consumer"]

    async def both() -> tuple[list[str], list[str]]:
        a, b = await asyncio.gather(_load(first_address, 3.0, 6), _load(second_address, 3.0, 6))
        return a, b

    served_a, served_b = asyncio.run(both())
    assert len(served_a) > 50 and len(served_b) > 50
    # graceful stops drain the writers; then every record is on disk
    runner.stop(second)
    runner.stop("ss-msp")
    chains = asyncio.run(_chain_ids(url))
    assert set(chains) == {"msp-a", "msp-b"}
    for chain, served in (("msp-a", served_a), ("msp-b", served_b)):
        assert set(served) <= chains[chain]["request"], f"{chain} lost requests"
        assert set(served) <= chains[chain]["response"], f"{chain} lost responses"
    assert not (set(served_a) & set(served_b))
    result = run_gateway("audit", "verify", "--quiet", "--db", url)
    assert result.returncode == 0, result.stdout + result.stderr
    # ss-dnic's replicas write chains of their own in the same database
    assert "in 3 chain(s)" in result.stdout and "chain dnic-a:" in result.stdout
    assert "chain msp-a:" in result.stdout and "chain msp-b:" in result.stdout


def test_either_replicas_auditor_api_searches_both_chains(
    replicas: tuple[Runner, str, str],
) -> None:
    """On PostgreSQL, the auditor API of one replica finds and verifies records of the other
    replica's chain, and keyset pages walk both chains without duplicates or gaps."""
    from .test_auditor_api import key, search

    runner, second, _ = replicas
    runner.start("ss-msp")
    runner.start(second)
    served = asyncio.run(_load(runner.processes[second].ready["consumer"], 1.0, 2))
    token = runner.token("auditor", subject="auditor@replicas")
    first_api = f"http://{runner.processes['ss-msp'].ready['auditor']}"
    # (ss-dnic's replicas log the same message id as provider, in the same database)
    found = search(first_api, token, {"message_id": served[0], "role": "consumer"})
    assert [(r["chain"], r["kind"]) for r in found] == [("msp-b", "request"), ("msp-b", "response")]
    assert all(r["verified"] and r["signature_status"] == "valid" for r in found), found
    everything = search(first_api, token, {"role": "consumer"}, page=500)
    paged = search(first_api, token, {"role": "consumer"}, page=37)
    assert [key(r) for r in paged] == [key(r) for r in everything] == sorted(map(key, everything))
    assert len({key(r) for r in paged}) == len(paged)
    assert {r["chain"] for r in paged} == {"msp-a", "msp-b"}
    assert all(r["verified"] for r in paged)
    runner.stop(second)
    runner.stop("ss-msp")


def test_a_replica_killed_under_load_loses_no_answered_call(
    replicas: tuple[Runner, str, str],
) -> None:
    """SIGKILL one replica while both serve: every call it answered before dying has its
    records in its chain; restarted, it continues its chain, and both chains verify."""
    runner, second, url = replicas
    runner.start("ss-msp")
    runner.start(second)
    first_address = runner.consumers[MSP]
    second_address = runner.processes[second].ready["consumer"]

    async def load_and_kill() -> tuple[list[str], list[str]]:
        a = asyncio.ensure_future(_load(first_address, 3.0, 6))
        b = asyncio.ensure_future(_load(second_address, 3.0, 6, failures_allowed=True))
        await asyncio.sleep(1.5)
        await asyncio.get_running_loop().run_in_executor(
            None, lambda: runner.stop(second, kill=True)
        )
        return await a, await b

    served_a, served_b = asyncio.run(load_and_kill())
    assert served_a and served_b
    runner.start(second)
    runner.stop(second)
    runner.stop("ss-msp")
    chains = asyncio.run(_chain_ids(url))
    assert set(served_b) <= chains["msp-b"]["request"] & chains["msp-b"]["response"]
    assert set(served_a) <= chains["msp-a"]["request"] & chains["msp-a"]["response"]
    result = run_gateway("audit", "verify", "--quiet", "--db", url)
    assert result.returncode == 0, result.stdout + result.stderr


def test_a_replica_claiming_a_chain_in_use_refuses_to_start(
    replicas: tuple[Runner, str, str],
) -> None:
    """Two writers of one chain would fork it: the second process exits with a clear error."""
    runner, _, url = replicas
    runner.start("ss-msp")  # msp-a is written again
    twin = runner.add_replica(MSP, "msp-a", database=url)
    with pytest.raises(RuntimeError):
        runner.start(twin, timeout=15)
    assert "another process is writing chain 'msp-a'" in runner.tail(twin)


# ---- replay across replicas of a provider -------------------------------------------------


def test_an_envelope_accepted_by_one_replica_is_refused_by_the_other(
    replicas: tuple[Runner, str, str],
) -> None:
    """A correctly signed request accepted by replica dnic-a, sent again to replica dnic-b
    of the same server (one PostgreSQL log), is refused with `replayed_message` and logged
    in dnic-b's chain; a new envelope is still accepted by dnic-b."""
    runner, _, url = replicas
    pki = runner.pki
    ca = (pki / "ca.crt").read_bytes()
    auth_cert = (pki / "auth" / "UY_GOV_MSP_ss1.crt").read_bytes()
    auth_key = (pki / "auth" / "UY_GOV_MSP_ss1.key").read_bytes()
    signer = signer_of(pki, "UY_GOV_MSP")
    signer_ocsp = fetch_ocsp(
        runner.ocsp_url, signer.certificate.public_bytes(serialization.Encoding.PEM), ca
    )

    async def send(provider: str, env: pb.SignedEnvelope) -> pb.Frame:
        staple = fetch_ocsp(runner.ocsp_url, auth_cert, ca)
        async with open_stream(provider, DNIC, ca, auth_cert, auth_key, staple=staple) as stream:
            answer = await stream.send(request_frame(env))
        assert isinstance(answer, pb.Frame), answer
        return answer

    first_provider = runner.providers[DNIC]
    second_provider = runner.processes["ss-dnic-dnic-b"].ready["provider"]
    captured = signed_request(signer, signer_ocsp=signer_ocsp)
    message_id = decode_request(captured.header).message_id
    accepted = asyncio.run(send(first_provider, captured))
    assert accepted.WhichOneof("kind") == "response", accepted
    replayed = asyncio.run(send(second_provider, captured))
    assert replayed.WhichOneof("kind") == "refusal", replayed
    assert replayed.refusal.code == "replayed_message", replayed.refusal
    fresh = asyncio.run(send(second_provider, signed_request(signer, signer_ocsp=signer_ocsp)))
    assert fresh.WhichOneof("kind") == "response", fresh

    async def rows() -> list[tuple[str, str, str, str | None]]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                result = await conn.execute(
                    sa.text(
                        "SELECT chain, kind, status, error_code FROM message_log "
                        "WHERE message_id = :id ORDER BY chain, seq"
                    ),
                    {"id": message_id},
                )
                return [(r[0], r[1], r[2], r[3]) for r in result]
        finally:
            await engine.dispose()

    assert asyncio.run(rows()) == [
        ("dnic-a", "request", "ok", None),
        ("dnic-a", "response", "ok", None),
        ("dnic-b", "refusal", "refused", "replayed_message"),
    ]
