"""Counters: this replica's own, and its share of the cluster's, flushed to Redis in batches.

Counts that belong to a message's completion (processed, cache hits/misses, duplicates) are added
to Redis by the claim scripts themselves, atomically with the done marker, to the counters shard
of the message's hash tag (see ``keys``). Everything else (failures, retries, dead letters, ...)
and anything counted while Redis was unreachable is kept as a pending delta here and written by
``ClusterReporter`` every heartbeat, one transaction per flush into counters shard 0, the slot of
the heartbeats.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import orjson
import structlog
from prometheus_client.core import HistogramMetricFamily

from worker.observability.metrics import CounterName
from worker.observability.tasks import BackgroundErrors
from worker.redisio.keys import HEARTBEAT_SHARD, THROUGHPUT_BUCKET_TTL_S, RedisKeys
from worker.redisio.link import REDIS_ERRORS, RedisFault, RedisLink

log = structlog.get_logger("worker.observability.counters")

WINDOW_S = 300
LATENCY_BUCKETS_S = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class LatencyHistogram:
    """Cumulative-bucket histogram of durations, cheap to observe (one bisect)."""

    def __init__(self, bounds_s: tuple[float, ...] = LATENCY_BUCKETS_S) -> None:
        self._bounds = bounds_s
        self._counts = [0] * (len(bounds_s) + 1)
        self._sum_s = 0.0

    def observe(self, seconds: float, n: int = 1) -> None:
        """Record ``n`` observations of ``seconds`` each."""
        self._counts[bisect.bisect_left(self._bounds, seconds)] += n
        self._sum_s += seconds * n

    def metric(self, name: str, documentation: str) -> HistogramMetricFamily:
        buckets: list[tuple[str, float]] = []
        running = 0
        for bound, count in zip(self._bounds, self._counts, strict=False):
            running += count
            buckets.append((repr(bound), float(running)))
        running += self._counts[-1]
        buckets.append(("+Inf", float(running)))
        return HistogramMetricFamily(name, documentation, buckets=buckets, sum_value=self._sum_s)


class Counters:
    """In-memory tallies: ``local`` for this replica, ``pending`` for Redis, per-second throughput."""

    def __init__(self, *, cluster: bool) -> None:
        self._cluster = cluster
        self.local: Counter[str] = Counter()
        self.pending: Counter[str] = Counter()
        self._seconds: deque[tuple[int, int]] = deque()
        self.latency = LatencyHistogram()

    def record(self, counter: CounterName, n: int = 1, *, in_redis: bool = False) -> None:
        """Count ``n`` events; ``in_redis`` says a Redis script already added them to the cluster."""
        self.local[counter] += n
        if self._cluster and not in_redis:
            self.pending[counter] += n
        if counter is CounterName.PROCESSED:
            self._tick(n)

    def _tick(self, n: int) -> None:
        second = int(time.time())
        if self._seconds and self._seconds[-1][0] == second:
            self._seconds[-1] = (second, self._seconds[-1][1] + n)
        else:
            self._seconds.append((second, n))
            while self._seconds and self._seconds[0][0] <= second - WINDOW_S:
                self._seconds.popleft()

    def throughput(self, window_s: int, now: float | None = None) -> float:
        """Messages per second processed by this replica over the last ``window_s`` full seconds."""
        current = int(now if now is not None else time.time())
        total = sum(n for second, n in self._seconds if current - window_s <= second < current)
        return total / window_s

    def snapshot(self) -> dict[str, int]:
        """This replica's counters, every one present, keyed by plain names."""
        return {c.value: self.local[c] for c in CounterName}

    def take_pending(self) -> dict[str, int]:
        taken = {k: v for k, v in self.pending.items() if v}
        self.pending.clear()
        return taken

    def restore_pending(self, deltas: dict[str, int]) -> None:
        self.pending.update(deltas)


@dataclass(frozen=True, slots=True)
class ReplicaIdentity:
    replica_id: str
    host: str
    pid: int
    started_at: float

    @classmethod
    def create(cls, replica_id: str = "") -> ReplicaIdentity:
        host = socket.gethostname()
        pid = os.getpid()
        return cls(replica_id or f"{host}-{pid}", host, pid, time.time())


class ClusterReporter:
    """Every ``interval_s``: flush pending counters and write this replica's heartbeat."""

    def __init__(
        self,
        link: RedisLink,
        keys: RedisKeys,
        counters: Counters,
        identity: ReplicaIdentity,
        status: Callable[[], dict[str, Any]],
        *,
        interval_s: float,
        errors: BackgroundErrors | None = None,
    ) -> None:
        self._link = link
        self._errors = errors or BackgroundErrors()
        self._keys = keys
        self._counters = counters
        self._identity = identity
        self._status = status
        self._interval_s = interval_s
        self._task: asyncio.Task[None] | None = None

    def heartbeat(self) -> dict[str, Any]:
        return {
            "id": self._identity.replica_id,
            "host": self._identity.host,
            "pid": self._identity.pid,
            "started_at": self._identity.started_at,
            "last_seen": time.time(),
            "processed": self._counters.local[CounterName.PROCESSED],
            **self._status(),
        }

    async def flush(self) -> None:
        """Write pending deltas and the heartbeat in one pipeline; keep the deltas if it fails."""
        if not self._link.available:
            return
        deltas = self._counters.take_pending()
        # Every key here has the heartbeats' hash tag: one slot, so one transaction on a cluster.
        pipe = self._link.client.pipeline(transaction=True)
        stats = self._keys.stats(HEARTBEAT_SHARD)
        for name, value in deltas.items():
            pipe.hincrby(stats, name, value)
        processed = deltas.get(CounterName.PROCESSED, 0)
        if processed:
            now_s = int(time.time())
            bucket = self._keys.throughput(HEARTBEAT_SHARD, now_s)
            pipe.hincrby(bucket, str(now_s), processed)
            pipe.expire(bucket, THROUGHPUT_BUCKET_TTL_S)
        ttl_s = max(1, int(self._interval_s * 3 + 1))
        pipe.set(
            self._keys.replica(self._identity.replica_id), orjson.dumps(self.heartbeat()), ex=ttl_s
        )
        pipe.sadd(self._keys.replicas, self._identity.replica_id)
        try:
            await pipe.execute()
        except BaseException:
            self._counters.restore_pending(deltas)
            raise

    async def _run(self) -> None:
        """Flush every interval; a failed flush is logged, reported and tried again next time."""
        while True:
            try:
                await self.flush()
            except REDIS_ERRORS as exc:
                self._failed(exc)
                with contextlib.suppress(*REDIS_ERRORS):  # an unclassified error is only recorded
                    await self._after_failure(exc)
            except Exception as exc:
                self._failed(exc)
            else:
                self._errors.succeeded("heartbeat")
                self._link.writes_succeeded(scripts=False)
            await asyncio.sleep(self._interval_s)

    async def _after_failure(self, exc: BaseException) -> None:
        """Tell the link; when Redis is full (``noeviction``), keep this replica listed in the
        stats by extending its heartbeat's life: ``EXPIRE`` is allowed when ``SET`` is not."""
        if self._link.report_aside(exc) is RedisFault.NOT_WRITABLE:
            ttl_s = max(1, int(self._interval_s * 3 + 1))
            await self._link.client.expire(self._keys.replica(self._identity.replica_id), ttl_s)

    def _failed(self, exc: BaseException) -> None:
        if self._errors.failed("heartbeat", exc):
            log.warning("heartbeat_failed", error=type(exc).__name__, retry_in_s=self._interval_s)

    async def __aenter__(self) -> ClusterReporter:
        self._task = asyncio.get_running_loop().create_task(self._run())
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Stop the loop, flush what is left and remove this replica's heartbeat."""
        if self._task is None:
            return
        task, self._task = self._task, None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        with contextlib.suppress(*REDIS_ERRORS):
            await self.flush()
        if self._link.available:
            with contextlib.suppress(*REDIS_ERRORS):
                await self._link.client.delete(self._keys.replica(self._identity.replica_id))
                await self._link.client.srem(self._keys.replicas, self._identity.replica_id)  # type: ignore[misc]


async def log_progress(counters: Counters, in_flight: Callable[[], int], interval_s: float) -> None:
    """Log a ``progress`` line every ``interval_s``: in flight, throughput, this replica's counts."""
    while True:
        await asyncio.sleep(interval_s)
        log.info(
            "progress",
            in_flight=in_flight(),
            per_second_60s=round(counters.throughput(60), 1),
            **counters.snapshot(),
        )
