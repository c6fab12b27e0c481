"""`gateway bench --audit`: the message log at scale (at least a million records).

1. **Append**: RECORDS records through `MessageLog.append` (hash chain, group commit,
   SQLite `synchronous=FULL` or PostgreSQL's default durable commit), from 64 concurrent
   producers; the rate of each fifth of the run is measured and the median reported.
   Records look like real ones: a signed header (one of 16, really signed with a P-256
   key whose certificate is in the log's evidence), a unique message id, one of 10,000
   data subjects (pseudonyms), four services, two purposes.
2. **Search** through the auditor API (aiohttp on loopback, a real ES256 token verified
   per request, per-result verification including the ECDSA signature, and the durable
   audit-query record each query appends): by message id and by data subject (first
   page, 50 records), one query at a time; p50 and p99 per repeat, medians over repeats.
   The same lookups made directly with one indexed SQL query each are measured in the
   same run: the ratio is the API's cost over the database's.
3. **Verify**: `verify_log` over the whole log (every hash and link), in records per
   second, median over repeats; beside it, the rate at which the same rows are only read.
"""

from __future__ import annotations

import asyncio
import random
import shutil
import statistics
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import sqlalchemy as sa
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from sqlalchemy.ext.asyncio import create_async_engine

from gateway.audit import RecordKind, Role
from gateway.pseudonym import subject_pseudonym
from gateway.records import record
from gateway.settings import database_url
from gateway.signing import EcdsaSigner
from gateway_ops.auth import Role as TokenRole
from gateway_ops.auth import TokenIssuer, TokenVerifier
from security_server.audit import verify_log
from security_server.auditor_api import AuditorApi, start
from security_server.message_log import MessageLog, iterate_records, message_log
from security_server.search import Searcher

SUBJECTS = 10_000
SECRET = b"bench-pseudonym-key-0123456789ab"
SERVICES = [f"UY/GOV/DNIC/identity/service-{i}/v1" for i in range(4)]
PURPOSES = ["healthcare-identification", "benefit-eligibility"]


def _percentile(values: list[float], fraction: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _signer() -> tuple[EcdsaSigner, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "UY/GOV/MSP")])
    now = datetime.now(UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(now + timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return EcdsaSigner(key, certificate), certificate.public_bytes(serialization.Encoding.DER)


async def _fill(url: str, total: int) -> tuple[list[float], list[str]]:
    """Append `total` records; return the rate of each fifth and a sample of message ids."""
    signer, der = _signer()
    headers = []
    for i in range(16):
        header = (b'{"bench":%d,"type":"request","pad":"' % i) + b"x" * 300 + b'"}'
        headers.append((header, signer.sign(header)))
    evidence = {signer.certificate_sha256: ("certificate", der)}
    log = await MessageLog.open(url, chain="bench", max_batch=2048)
    rng = random.Random(7)
    subjects = [subject_pseudonym(SECRET, f"CI {n}") for n in range(SUBJECTS)]
    sample: list[str] = []
    rates: list[float] = []
    fifth = max(1, total // 5)
    start = datetime(2026, 1, 1, tzinfo=UTC)
    made = 0

    def fields(n: int) -> dict[str, Any]:
        header, signature = headers[n % 16]
        return record(
            kind=RecordKind.REQUEST if n % 2 == 0 else RecordKind.RESPONSE,
            role=Role.PROVIDER,
            logged_at=start + timedelta(milliseconds=n),
            message_id=f"{n // 2:012d}-{uuid.UUID(int=rng.getrandbits(128)).hex[:16]}",
            client="UY/GOV/MSP/clinics",
            service=SERVICES[n % 4],
            method="/demo.population.v1.PopulationRegistry/GetPerson",
            purpose=PURPOSES[n % 2],
            agreement_id="AGR-2026-0001",
            user_id="dr.rodriguez",
            subject_ref=subjects[rng.randrange(SUBJECTS)],
            peer="UY/GOV/MSP/ss1",
            header=header,
            signature=signature,
            signer_certificate_sha256=signer.certificate_sha256,
            body_sha256="0" * 64,
        )

    async def producer(items: list[dict[str, Any]]) -> None:
        for item in items:
            await log.append(item, evidence)

    try:
        while made < total:
            count = min(fifth, total - made)
            items = [fields(made + i) for i in range(count)]
            sample += [str(items[i]["message_id"]) for i in range(0, count, max(1, count // 400))]
            began = time.perf_counter()
            await asyncio.gather(*(producer(items[k::64]) for k in range(64)))
            rates.append(count / (time.perf_counter() - began))
            made += count
            print(f"   appended {made:>9,} records ({rates[-1]:,.0f} records/s)", flush=True)
    finally:
        await log.close()
    return rates, sample


async def _search(url: str, sample: list[str], queries: int, repeats: int) -> dict[str, Any]:
    key = ec.generate_private_key(ec.SECP256R1())
    issuer = TokenIssuer(key, issuer="gateway-registry:UY", audience="gateway-registry:UY")
    token = issuer.issue(
        subject="bench-auditor",
        role=TokenRole.AUDITOR,
        now=datetime.now(UTC),
        ttl=timedelta(hours=2),
    )
    log = await MessageLog.open(url, chain="bench-auditor")
    searcher = Searcher(log.engine)
    api = AuditorApi(
        log,
        lambda s: None if s is None else subject_pseudonym(SECRET, s),
        searcher,
        TokenVerifier(issuer=issuer),
    )
    runner, port = await start(api, "127.0.0.1:0")
    base = f"http://127.0.0.1:{port}/audit/v1/records"
    rng = random.Random(11)
    out: dict[str, Any] = {}
    direct_engine = create_async_engine(url)
    try:
        async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {token}"}) as http:

            async def by_api(params: dict[str, str]) -> int:
                async with http.get(base, params=params) as response:
                    doc = await response.json()
                    if response.status != 200:
                        raise RuntimeError(f"auditor API answered {response.status}: {doc}")
                    bad = [r for r in doc["records"] if not r["verified"]]
                    if bad:
                        raise RuntimeError(f"a record did not verify: {bad[0]['problems']}")
                    return len(doc["records"])

            async def by_sql(column: str, value: str) -> int:
                c = message_log.c
                async with direct_engine.connect() as conn:
                    rows = await conn.execute(
                        sa.select(message_log)
                        .where(c[column] == value, c.kind.in_(("request", "response", "refusal")))
                        .order_by(c.logged_at, c.chain, c.seq)
                        .limit(51)
                    )
                    return len(rows.all())

            def make(column: str) -> str:
                if column == "message_id":
                    return rng.choice(sample)
                return f"CI {rng.randrange(SUBJECTS)}"

            for name, column in (("message id", "message_id"), ("data subject", "subject_ref")):
                api_runs: list[tuple[float, float]] = []
                sql_runs: list[tuple[float, float]] = []
                for repeat in range(repeats):
                    values = [make(column) for _ in range(queries)]
                    for target in ("api", "sql") if repeat % 2 == 0 else ("sql", "api"):
                        times: list[float] = []
                        found = 0
                        for value in values:
                            began = time.perf_counter()
                            if target == "api":
                                key_name = "subject" if column == "subject_ref" else column
                                found += await by_api({key_name: value, "limit": "50"})
                            else:
                                wanted = (
                                    subject_pseudonym(SECRET, value)
                                    if column == "subject_ref"
                                    else value
                                )
                                found += await by_sql(column, wanted)
                            times.append((time.perf_counter() - began) * 1000)
                        if found == 0:
                            raise RuntimeError(f"no records found searching by {name}")
                        run = (_percentile(times, 0.5), _percentile(times, 0.99))
                        (api_runs if target == "api" else sql_runs).append(run)
                        print(
                            f"   search by {name:<12} {target:<4} repeat {repeat + 1}: "
                            f"p50 {run[0]:.2f} ms  p99 {run[1]:.2f} ms  "
                            f"({found / queries:.1f} records per query)",
                            flush=True,
                        )
                out[name] = {
                    "api_p50": statistics.median(r[0] for r in api_runs),
                    "api_p99": statistics.median(r[1] for r in api_runs),
                    "sql_p50": statistics.median(r[0] for r in sql_runs),
                    "sql_p99": statistics.median(r[1] for r in sql_runs),
                }
    finally:
        await runner.cleanup()
        await direct_engine.dispose()
        await log.close()
    return out


async def _verify(url: str, repeats: int) -> tuple[float, float, int]:
    verify_rates, read_rates = [], []
    records = 0
    for repeat in range(repeats):
        began = time.perf_counter()
        report = await verify_log(url)
        elapsed = time.perf_counter() - began
        records = report.records
        verify_rates.append(records / elapsed)
        engine = create_async_engine(url)
        began = time.perf_counter()
        count = 0
        for chain in report.heads:
            async for _ in iterate_records(engine, chain):
                count += 1
        read_rates.append(count / (time.perf_counter() - began))
        await engine.dispose()
        print(
            f"   verify repeat {repeat + 1}: {records:,} records in {elapsed:.1f} s "
            f"({verify_rates[-1]:,.0f} records/s; reading alone {read_rates[-1]:,.0f} records/s)",
            flush=True,
        )
    return statistics.median(verify_rates), statistics.median(read_rates), records


def run_audit_bench(
    *, workdir: Path, records: int, repeats: int, queries: int, database: str | None
) -> int:
    if records < 1 or repeats < 1 or queries < 1:
        print("bench: --records, --repeats and --queries must be >= 1")
        return 2
    if database is None:
        shutil.rmtree(workdir, ignore_errors=True)
        workdir.mkdir(parents=True, exist_ok=True)
        workdir = workdir.resolve()
        url = database_url(str(workdir / "messagelog.db"), base=workdir)
        where = f"SQLite {workdir / 'messagelog.db'} (WAL, synchronous=FULL)"
    else:
        url = database_url(database, base=Path.cwd())
        where = f"PostgreSQL {database} (its tables are dropped first)"
    import logging

    import structlog

    # the servers' per-query log lines would drown the figures
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    print("== gateway bench --audit")
    print(f"   log: {where}; {records:,} records; {repeats} repeats of {queries} queries")

    async def main() -> int:
        if database is not None:
            from gateway_demo.pg import reset_message_log

            await reset_message_log(url)
        print("\n-- 1. append (hash chain, group commit, durable)")
        rates, sample = await _fill(url, records)
        print("\n-- 2. search through the auditor API, against the same lookup in SQL")
        search = await _search(url, sample, queries, repeats)
        print("\n-- 3. verify the whole log")
        verify_rate, read_rate, verified = await _verify(url, repeats)
        print("\n== results (medians)")
        print(f"   append: {statistics.median(rates):,.0f} records/s (durable; 64 producers)")
        for name, m in search.items():
            print(
                f"   search by {name}: API p50 {m['api_p50']:.2f} ms, p99 {m['api_p99']:.2f} ms; "
                f"SQL alone p50 {m['sql_p50']:.2f} ms, p99 {m['sql_p99']:.2f} ms; "
                f"ratio API/SQL p50 {m['api_p50'] / m['sql_p50']:.1f}"
            )
        print(
            f"   verify: {verify_rate:,.0f} records/s over {verified:,} records "
            f"(reading alone {read_rate:,.0f} records/s; ratio {verify_rate / read_rate:.2f})"
        )
        return 0

    return asyncio.run(main())
