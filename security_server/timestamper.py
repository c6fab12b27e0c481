"""Batch time-stamps of the message log, off the data path.

Every `timestamping.interval_seconds` the records written since the last batch (up to
`timestamping.max_batch`) become the leaves of a Merkle tree (`gateway.merkle`); its root is
sent to the first time-stamping authority of `timestamping.urls` that answers (RFC 3161 over
HTTP), the token is verified against the CAs of the global configuration and stored with
the batch's range of records. A record's inclusion proof is derived from the stored range
when evidence is exported, so the data path never waits for any of this.

When no TSA answers, calls go on and the backlog grows; it is stamped as soon as one answers
again. Once the TSAs have been failing for longer than `timestamping.failure_period_seconds`,
`check()` refuses new messages with `timestamping_unavailable`, and accepts them again by
itself after the next successful batch.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Sequence

import aiohttp
import structlog
from cryptography import x509

from gateway import merkle, tsp
from gateway.errors import Code, GatewayError, UnavailableError
from gateway.timeutil import format_time
from security_server.message_log import MessageLog
from security_server.settings import TimestampingSection

log = structlog.get_logger("security_server.timestamper")

_CONTENT_TYPE = "application/timestamp-query"


class Timestamper:
    def __init__(
        self,
        message_log: MessageLog,
        settings: TimestampingSection,
        cas: Callable[[], Sequence[x509.Certificate]],
    ) -> None:
        self.log = message_log
        self.settings = settings
        self.cas = cas
        self.failing_since: float | None = None
        self.batches = 0
        self.records = 0
        # batches that no TSA stamped, or whose token could not be saved (a metric)
        self.failures = 0
        message_log.stamping = True

    def check(self) -> None:
        """Refuse new messages once the TSAs have been failing past the failure period."""
        since = self.failing_since
        if since is not None and time.monotonic() - since > self.settings.failure_period_seconds:
            raise UnavailableError(
                "no time-stamping authority has answered for more than "
                f"{self.settings.failure_period_seconds:g} s, so new messages cannot be made "
                "provable; calls resume by themselves once one answers",
                code=Code.TIMESTAMPING_UNAVAILABLE,
            )

    async def run(self) -> None:
        """Stamp batches until cancelled (after `MessageLog.load_unstamped` at start-up)."""
        timeout = aiohttp.ClientTimeout(total=self.settings.timeout_seconds)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            while True:
                if not self.log.unstamped:
                    self.log.wrote.clear()
                    await self.log.wrote.wait()
                await asyncio.sleep(self.settings.interval_seconds)
                # one batch per interval; more at once only while a backlog exceeds a batch
                while await self.stamp_once(session) and (
                    len(self.log.unstamped) >= self.settings.max_batch
                ):
                    pass

    async def stamp_once(self, session: aiohttp.ClientSession) -> bool:
        """Stamp the oldest unstamped records; False when there were none, or no TSA gave a
        valid token."""
        batch = self.log.unstamped[: self.settings.max_batch]
        if not batch:
            return False
        leaves = [h for _, h in batch]
        root = (
            merkle.root(leaves)
            if len(leaves) < 2048
            else await asyncio.to_thread(merkle.root, leaves)
        )
        stamped = await self._request(session, root)
        if stamped is None:
            self.failures += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            return False
        url, token, info = stamped
        try:
            await self.log.save_stamp(
                {
                    "first_seq": batch[0][0],
                    "last_seq": batch[-1][0],
                    "root": root,
                    "token": token,
                    "tsa": url,
                    "gen_time": format_time(info.gen_time),
                }
            )
        except Exception as exc:  # the database: retry with the next batch
            log.error("timestamp_not_saved", error=str(exc), kind=type(exc).__name__)
            self.failures += 1
            if self.failing_since is None:
                self.failing_since = time.monotonic()
            return False
        del self.log.unstamped[: len(batch)]
        if self.failing_since is not None:
            log.info(
                "timestamping_recovered",
                tsa=url,
                failing_seconds=round(time.monotonic() - self.failing_since, 3),
            )
        self.failing_since = None
        self.batches += 1
        self.records += len(batch)
        return True

    async def _request(
        self, session: aiohttp.ClientSession, root: bytes
    ) -> tuple[str, bytes, tsp.TimestampInfo] | None:
        for url in self.settings.urls:
            nonce = secrets.randbits(63)
            try:
                async with session.post(
                    url,
                    data=tsp.build_request(root, nonce),
                    headers={"Content-Type": _CONTENT_TYPE},
                ) as answer:
                    if answer.status != 200:
                        raise UnavailableError(
                            f"HTTP {answer.status}", code=Code.TIMESTAMPING_UNAVAILABLE
                        )
                    body = await answer.read()
                token = tsp.token_from_response(body, digest=root, nonce=nonce)
                info = tsp.verify_token(token, digest=root, cas=self.cas())
            except (aiohttp.ClientError, TimeoutError, OSError, GatewayError) as exc:
                message = exc.message if isinstance(exc, GatewayError) else str(exc)
                log.warning("timestamping_failed", tsa=url, error=message or type(exc).__name__)
                continue
            return url, token, info
        return None
