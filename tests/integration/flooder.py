"""A flood of junk requests, run as a process of its own so that the test measuring real
exchanges meanwhile shares no event loop (and no GIL) with it.

    python -m tests.integration.flooder auditor http://HOST:PORT SECONDS CONCURRENCY
    python -m tests.integration.flooder consumer HOST:PORT SECONDS CONCURRENCY

The auditor flood alternates requests without a token and with a 5.5 KB junk token (its
`iss` claim); the consumer flood alternates calls without metadata and calls from a client
no server serves. It prints "started" when the flood begins, then one JSON line: how many
requests were sent and how they were answered (HTTP status, or gateway-error code).

It runs at a lower CPU priority (nice 10): a real attacker spends their own machine's CPU,
not the server's, and on a 2-core test machine its client would otherwise take one of the
two cores from the topology under test. It still gets every core-cycle left idle.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import sys
from collections import Counter
from typing import Any

JUNK_ISSUER = "attacker-" + "A" * 5500
PATH = "/audit/v1/records"
POPULATION = "UY/GOV/DNIC/identity/population/v1"
GET_PERSON = "/demo.population.v1.PopulationRegistry/GetPerson"


def _b64(data: dict[str, Any]) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()


def junk_token() -> str:
    header = _b64({"alg": "ES256", "typ": "JWT", "kid": "junk"})
    claims = _b64({"iss": JUNK_ISSUER, "sub": "nobody", "aud": "gateway", "exp": 4102444800})
    return f"{header}.{claims}.{'A' * 86}"


async def flood_auditor(base: str, seconds: float, concurrency: int) -> Counter[str]:
    import aiohttp

    answers: Counter[str] = Counter()
    junk = {"Authorization": "Bearer " + junk_token()}
    loop = asyncio.get_running_loop()
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:
        print("started", flush=True)
        deadline = loop.time() + seconds

        async def worker(i: int) -> None:
            while loop.time() < deadline:
                i += 1
                async with session.get(base + PATH, headers=junk if i % 2 else {}) as response:
                    await response.read()
                    answers[str(response.status)] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return answers


async def flood_consumer(address: str, seconds: float, concurrency: int) -> Counter[str]:
    import grpc

    answers: Counter[str] = Counter()
    loop = asyncio.get_running_loop()
    stranger = [
        ("gateway-client", "UY/GOV/NOBODY/stray"),
        ("gateway-service", POPULATION),
        ("gateway-purpose", "healthcare-identification"),
    ]
    async with grpc.aio.insecure_channel(address) as channel:
        call: Any = channel.unary_unary(GET_PERSON, None, None)
        print("started", flush=True)
        deadline = loop.time() + seconds

        async def worker(i: int) -> None:
            while loop.time() < deadline:
                i += 1
                try:
                    await call(b"junk", metadata=stranger if i % 2 else (), timeout=10)
                    answers["ok"] += 1
                except grpc.aio.AioRpcError as exc:
                    pairs: Any = exc.trailing_metadata() or ()
                    trailing = {str(k): str(v) for k, v in pairs}
                    answers[trailing.get("gateway-error", exc.code().name)] += 1

        await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return answers


def main() -> None:
    kind, target, seconds, concurrency = sys.argv[1:5]
    os.nice(10)
    flood = flood_auditor if kind == "auditor" else flood_consumer
    answers = asyncio.run(flood(target, float(seconds), int(concurrency)))
    print(json.dumps({"sent": sum(answers.values()), "answers": dict(answers)}), flush=True)


if __name__ == "__main__":
    main()
