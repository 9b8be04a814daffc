"""``neiromatrius-worker demo``: replicas, generated traffic, live progress and a final table.

The demo starts ``--replicas`` processes of ``neiromatrius-worker run`` against the configured
RabbitMQ (and Redis, when ``REDIS_URL`` or ``--redis-url`` is given), publishes sample traffic with
a known number of duplicate deliveries and repeated texts, shows progress while the replicas work,
and ends with what deduplication and the cache did, checked against what it published.

Everything it creates belongs to one run: queues, exchange and Redis keys are named after a random
run tag (``neiromatrius.demo.{tag}.*``, ``neiromatrius:demo:{tag}:``), so a real deployment on the
same broker and Redis is never disturbed, and all of it is removed at the end (TTLs are short in
case the demo is killed before it can clean up).

Without Redis every replica deduplicates and caches on its own: a duplicate that reaches a replica
which has not seen its ID is processed again, and the table says how often that happened.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import aio_pika
import aiohttp
import orjson

from worker.amqp.broker import Topology
from worker.cli import publish
from worker.cli.samples import SamplePlan, generate_sample
from worker.core.redaction import redact_url
from worker.core.settings import Settings
from worker.observability.metrics import CounterName
from worker.observability.stats import QUEUE_PROBE_ERRORS, read_counters
from worker.redisio.keys import RedisKeys
from worker.redisio.link import REDIS_UNAVAILABLE, make_redis

START_TIMEOUT_S = 30.0
POLL_INTERVAL_S = 0.25  # each poll asks every replica for its stats: keep it light
PROGRESS_INTERVAL_S = 0.5
QUIET_PROGRESS_INTERVAL_S = 2.0  # when stderr is not a terminal, a new line every 2 s
DEMO_TTL_S = 3600  # done markers and cache entries of a demo expire within the hour
ACCOUNTED = (
    CounterName.PROCESSED,
    CounterName.DUPLICATES,
    CounterName.REDELIVERED_DONE,
    CounterName.DEAD_LETTERED,
)
COMPARED = (
    CounterName.PROCESSED,
    CounterName.DUPLICATES,
    CounterName.CACHE_HITS,
    CounterName.CACHE_MISSES,
    CounterName.CLASSIFIER_CALLS,
)


class DemoFailed(Exception):
    """The demo could not run to the end; the message says why."""


@dataclass(frozen=True, slots=True)
class DemoOptions:
    replicas: int = 3
    messages: int = 2000
    duplicates: float = 0.2
    repeat_texts: float = 0.5
    rate_per_s: float = 0.0
    seed: int | None = None
    redis_url: str = ""
    timeout_s: float = 120.0
    as_json: bool = False


@dataclass(frozen=True, slots=True)
class DemoNames:
    """The broker and Redis names of one demo run."""

    tag: str

    @classmethod
    def create(cls) -> DemoNames:
        return cls(uuid.uuid4().hex[:8])

    @property
    def input_queue(self) -> str:
        return f"neiromatrius.demo.{self.tag}.messages"

    @property
    def results_exchange(self) -> str:
        return f"neiromatrius.demo.{self.tag}.classified"

    @property
    def dead_letter_queue(self) -> str:
        return f"neiromatrius.demo.{self.tag}.dead"

    @property
    def key_prefix(self) -> str:
        return f"neiromatrius:demo:{self.tag}:"

    def as_dict(self) -> dict[str, str]:
        return {
            "tag": self.tag,
            "input_queue": self.input_queue,
            "results_exchange": self.results_exchange,
            "dead_letter_queue": self.dead_letter_queue,
            "key_prefix": self.key_prefix,
        }


class DemoReplica:
    """One ``python -m worker run`` child; its JSON log goes to a file the demo reads."""

    def __init__(self, replica_id: str, log_path: Path) -> None:
        self.replica_id = replica_id
        self.log_path = log_path
        self.process: asyncio.subprocess.Process | None = None
        self.port: int | None = None

    async def start(self, env: dict[str, str]) -> None:
        with self.log_path.open("wb") as log_file:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "worker", "run", env=env, stdout=log_file, stderr=log_file
            )

    def _events(self) -> list[dict[str, Any]]:
        events = []
        for line in self.log_path.read_bytes().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict):
                    events.append(event)
        return events

    def log_tail(self, lines: int = 15) -> str:
        text = self.log_path.read_text(encoding="utf-8", errors="replace")
        return "\n".join(text.splitlines()[-lines:])

    @property
    def exited(self) -> bool:
        return self.process is None or self.process.returncode is not None

    async def wait_started(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            events = self._events()
            for event in events:
                if event.get("event") == "monitoring_listening":
                    self.port = int(event["port"])
            if self.port is not None and any(e.get("event") == "replica_started" for e in events):
                return
            if self.exited:
                raise DemoFailed(f"replica {self.replica_id} exited:\n{self.log_tail()}")
            await asyncio.sleep(0.1)
        raise DemoFailed(f"replica {self.replica_id} did not start in {timeout_s:.0f}s")

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM, wait for the drain, kill if it takes longer; the exit code."""
        if self.process is None:
            return None
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.process.wait(), timeout_s)
            except TimeoutError:
                with contextlib.suppress(ProcessLookupError):
                    self.process.kill()
                await self.process.wait()
        return self.process.returncode


@dataclass(slots=True)
class ResultCounter:
    """Counts the results the replicas publish, by message ID."""

    by_id: Counter[str] = field(default_factory=Counter)
    total: int = 0
    last_at: float = 0.0

    async def on_result(self, message: aio_pika.abc.AbstractIncomingMessage) -> None:
        self.by_id[message.message_id or ""] += 1
        self.total += 1
        self.last_at = time.monotonic()


@dataclass(slots=True)
class Progress:
    """What the replicas reported at the last poll."""

    published: int = 0
    per_replica: dict[str, dict[str, int]] = field(default_factory=dict)
    in_flight: int = 0

    def total(self, counter: CounterName) -> int:
        return sum(c.get(counter, 0) for c in self.per_replica.values())

    @property
    def accounted(self) -> int:
        return sum(self.total(c) for c in ACCOUNTED)


class Demo:
    """One run: set up, start replicas, publish, watch, report, clean up."""

    def __init__(
        self, settings: Settings, options: DemoOptions, stop: asyncio.Event, err: TextIO
    ) -> None:
        self.settings = settings
        self.options = options
        self.stop = stop
        self.err = err
        self.names = DemoNames.create()
        self.topology = Topology(
            input_queue=self.names.input_queue,
            results_exchange=self.names.results_exchange,
            dead_letter_queue=self.names.dead_letter_queue,
            retry_base_delay_s=settings.retry_base_delay_s,
            max_attempts=settings.max_attempts,
        )
        self.replicas: list[DemoReplica] = []
        self.results = ResultCounter()
        self.progress = Progress()

    def child_env(self, replica_id: str) -> dict[str, str]:
        # The children get this process's environment (so .env and every other setting apply to
        # them as to us), with the demo's own names and a port chosen by the system.
        env = dict(os.environ)
        env.update(
            REDIS_URL=self.options.redis_url,
            RABBITMQ_URL=self.settings.rabbitmq_url,
            INPUT_QUEUE=self.names.input_queue,
            RESULTS_EXCHANGE=self.names.results_exchange,
            DEAD_LETTER_QUEUE=self.names.dead_letter_queue,
            REDIS_KEY_PREFIX=self.names.key_prefix,
            DEDUP_TTL_S=str(DEMO_TTL_S),
            CACHE_TTL_S=str(DEMO_TTL_S),
            STATS_HOST="127.0.0.1",
            STATS_PORT="0",
            LOG_FORMAT="json",
            LOG_LEVEL="info",
            HEARTBEAT_INTERVAL_S="0.5",
            REPLICA_ID=replica_id,
            FAULT_INJECTION="",
        )
        return env

    async def preflight(self) -> aio_pika.abc.AbstractConnection:
        """Reach the broker (and Redis), so a wrong URL is one clear line, not a hang."""
        where = redact_url(self.settings.rabbitmq_url)
        try:
            connection = await asyncio.wait_for(aio_pika.connect(self.settings.rabbitmq_url), 10)
        except QUEUE_PROBE_ERRORS as exc:
            raise DemoFailed(
                f"cannot reach RabbitMQ at {where} ({type(exc).__name__}); "
                "start it or set RABBITMQ_URL"
            ) from None
        if self.options.redis_url:
            client = make_redis(self.options.redis_url, self.settings.redis_timeout_s)
            try:
                await client.ping()  # type: ignore[misc]
            except REDIS_UNAVAILABLE as exc:
                await connection.close()
                raise DemoFailed(
                    f"⚠️ Redis connection failed: {redact_url(self.options.redis_url)} "
                    f"({type(exc).__name__}); start it, or run the demo without Redis (--no-redis)"
                ) from None
            finally:
                await client.aclose()
        return connection

    async def listen_for_results(self, connection: aio_pika.abc.AbstractConnection) -> None:
        channel = await connection.channel()
        exchange = await channel.declare_exchange(
            self.names.results_exchange, aio_pika.ExchangeType.TOPIC, durable=True
        )
        queue = await channel.declare_queue(exclusive=True, auto_delete=True)
        await queue.bind(exchange, routing_key="#")
        await queue.consume(self.results.on_result, no_ack=True)

    async def start_replicas(self, log_dir: Path) -> None:
        for n in range(1, self.options.replicas + 1):
            replica_id = f"demo-{self.names.tag}-{n}"
            replica = DemoReplica(replica_id, log_dir / f"{replica_id}.log")
            self.replicas.append(replica)
            await replica.start(self.child_env(replica_id))
        await asyncio.gather(*(r.wait_started(START_TIMEOUT_S) for r in self.replicas))

    async def publish_plan(self, plan: SamplePlan) -> None:
        messages = publish.from_bodies(m.to_body() for m in plan.messages)
        rate = self.options.rate_per_s
        # Chunks, so progress can show what is published; about half a second each when paced.
        size = max(1, int(rate / 2)) if rate > 0 else 200
        for start in range(0, len(messages), size):
            if self.stop.is_set():
                return
            chunk = messages[start : start + size]
            await publish.publish(
                self.settings.rabbitmq_url, self.names.input_queue, chunk, rate_per_s=rate
            )
            self.progress.published += len(chunk)

    async def poll(self, session: aiohttp.ClientSession) -> None:
        """Read every replica's own counters from its stats endpoint."""
        in_flight = 0
        for replica in self.replicas:
            if replica.exited and not self.stop.is_set():  # Ctrl-C reaches the replicas too
                raise DemoFailed(f"replica {replica.replica_id} exited:\n{replica.log_tail()}")
            url = f"http://127.0.0.1:{replica.port}/api/monitoring/stats"
            try:
                async with session.get(url) as response:
                    own = (await response.json())["replica"]
            except (aiohttp.ClientError, TimeoutError, ValueError, KeyError):
                continue  # keep the previous numbers for this tick
            self.progress.per_replica[replica.replica_id] = own["counters"]
            in_flight += int(own["in_flight"])
        self.progress.in_flight = in_flight

    def show_progress(self, started: float, total: int, final: bool = False) -> None:
        p = self.progress
        line = (
            f"  {time.monotonic() - started:5.1f}s  published {p.published:,}/{total:,}"
            f"  processed {p.total(CounterName.PROCESSED):,}"
            f"  duplicates skipped {p.total(CounterName.DUPLICATES):,}"
            f"  cache hits {p.total(CounterName.CACHE_HITS):,}  in flight {p.in_flight}"
        )
        if self.err.isatty():
            self.err.write("\r\x1b[K" + line + ("\n" if final else ""))
        else:
            self.err.write(line + "\n")
        self.err.flush()

    async def watch(self, plan: SamplePlan, started: float) -> bool:
        """Poll until every delivery is accounted for; ``False`` if stopped or timed out."""
        total = len(plan.messages)
        publishing = asyncio.get_running_loop().create_task(self.publish_plan(plan))
        interval_s = PROGRESS_INTERVAL_S if self.err.isatty() else QUIET_PROGRESS_INTERVAL_S
        shown = 0.0
        deadline: float | None = None
        timeout = aiohttp.ClientTimeout(total=5)
        try:
            async with aiohttp.ClientSession(timeout=timeout) as session:
                while not self.stop.is_set():
                    await self.poll(session)
                    if publishing.done():
                        failure = publishing.exception()
                        if failure is not None:
                            where = redact_url(self.settings.rabbitmq_url)
                            raise DemoFailed(
                                f"publishing to {where} failed ({type(failure).__name__})"
                            )
                        deadline = deadline or time.monotonic() + self.options.timeout_s
                    done = publishing.done() and self.progress.accounted >= total
                    if done or time.monotonic() - shown >= interval_s:
                        shown = time.monotonic()
                        self.show_progress(started, total, final=done)
                    if done:
                        return True
                    if deadline is not None and time.monotonic() > deadline:
                        raise DemoFailed(
                            f"not every message was handled within {self.options.timeout_s:.0f}s"
                        )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.stop.wait(), POLL_INTERVAL_S)
        finally:
            # Interrupted: let the chunk in progress finish (cancelling it mid-way leaves its
            # publishes dangling), unless the broker stopped answering.
            with contextlib.suppress(Exception):
                await asyncio.wait_for(publishing, timeout=10)
        return False

    async def settle(self) -> dict[str, int] | None:
        """Wait for the last results and, with Redis, for the cluster counters to catch up."""
        deadline = time.monotonic() + 5
        while self.results.total < self.progress.total(CounterName.PROCESSED):
            if time.monotonic() > deadline:
                break
            await asyncio.sleep(0.05)
        if not self.options.redis_url:
            return None
        client = make_redis(self.options.redis_url, self.settings.redis_timeout_s)
        try:
            cluster = await read_counters(client, RedisKeys(self.names.key_prefix))
            while any(cluster[c] != self.progress.total(c) for c in COMPARED):
                if time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.2)
                cluster = await read_counters(client, RedisKeys(self.names.key_prefix))
            return cluster
        except REDIS_UNAVAILABLE:
            return None
        finally:
            await client.aclose()

    async def cleanup(self) -> None:
        """Remove the run's queues, exchange and Redis keys (each step on its own: best effort)."""
        queues = [self.names.input_queue, self.names.dead_letter_queue]
        queues += [self.topology.retry_queue(a) for a in range(1, self.settings.max_attempts)]
        with contextlib.suppress(*QUEUE_PROBE_ERRORS):
            connection = await asyncio.wait_for(aio_pika.connect(self.settings.rabbitmq_url), 10)
            try:
                for queue in queues:
                    with contextlib.suppress(*QUEUE_PROBE_ERRORS):
                        channel = await connection.channel()
                        await channel.queue_delete(queue)
                        await channel.close()
                with contextlib.suppress(*QUEUE_PROBE_ERRORS):
                    channel = await connection.channel()
                    await channel.exchange_delete(self.names.results_exchange)
                    await channel.close()
            finally:
                await connection.close()
        if self.options.redis_url:
            client = make_redis(self.options.redis_url, self.settings.redis_timeout_s)
            try:
                pattern = RedisKeys(self.names.key_prefix).everything
                keys = [k async for k in client.scan_iter(match=pattern, count=1000)]
                for start in range(0, len(keys), 500):
                    await client.delete(*keys[start : start + 500])
            except REDIS_UNAVAILABLE:
                self.err.write("demo: could not remove the run's Redis keys (they expire)\n")
            finally:
                await client.aclose()

    async def stop_replicas(self) -> list[int | None]:
        timeout_s = self.settings.drain_timeout_s + 10
        return list(await asyncio.gather(*(r.stop(timeout_s) for r in self.replicas)))

    async def run(self) -> dict[str, Any] | None:
        """The whole run; the summary, or ``None`` if interrupted."""
        o = self.options
        plan = generate_sample(o.messages, o.duplicates, o.repeat_texts, seed=o.seed)
        connection = await self.preflight()
        cluster: dict[str, int] | None = None
        elapsed_s = 0.0
        try:
            with tempfile.TemporaryDirectory(prefix="neiromatrius-demo-") as log_dir:
                try:
                    await self.listen_for_results(connection)
                    self.err.write(f"demo: starting {o.replicas} replicas (run {self.names.tag})\n")
                    await self.start_replicas(Path(log_dir))
                    started = time.monotonic()
                    if not await self.watch(plan, started):
                        return None
                    cluster = await self.settle()
                    elapsed_s = max(self.results.last_at - started, 1e-3)
                finally:
                    codes = await self.stop_replicas()
        finally:
            await connection.close()
            await self.cleanup()
        return self.summary(plan, cluster, elapsed_s, codes)

    def summary(
        self,
        plan: SamplePlan,
        cluster: dict[str, int] | None,
        elapsed_s: float,
        exit_codes: list[int | None],
    ) -> dict[str, Any]:
        p = self.progress
        processed = p.total(CounterName.PROCESSED)
        return {
            "mode": "redis" if self.options.redis_url else "memory",
            "redis": redact_url(self.options.redis_url) if self.options.redis_url else None,
            "replicas": len(self.replicas),
            "published": len(plan.messages),
            "unique_ids": plan.unique_ids,
            "duplicates_published": plan.duplicate_count,
            "distinct_texts": plan.distinct_texts,
            "processed": processed,
            "results": self.results.total,
            "ids_with_results": len(self.results.by_id),
            "duplicates_skipped": p.total(CounterName.DUPLICATES)
            + p.total(CounterName.REDELIVERED_DONE),
            "cache_hits": p.total(CounterName.CACHE_HITS),
            "cache_misses": p.total(CounterName.CACHE_MISSES),
            "classifier_calls": p.total(CounterName.CLASSIFIER_CALLS),
            "dead_lettered": p.total(CounterName.DEAD_LETTERED),
            "seconds": round(elapsed_s, 3),
            "throughput_per_s": round(len(plan.messages) / elapsed_s, 1),
            "rate_per_s": self.options.rate_per_s,
            "per_replica": {
                rid: c.get(CounterName.PROCESSED, 0) for rid, c in p.per_replica.items()
            },
            "cluster_counters": cluster,
            "cluster_counters_agree": None
            if cluster is None
            else all(cluster[c] == p.total(c) for c in COMPARED),
            "replica_exit_codes": exit_codes,
            "names": self.names.as_dict(),
        }


def _row(name: str, count: int, expected: int | None, note: str = "", mark: str = "") -> str:
    shown = "" if expected is None else f"{expected:>10,}"
    if expected is not None and not mark:
        mark = "✓" if count == expected else "≠"
    return f"  {name:<30}{count:>10,}{shown}  {mark:<1}  {note}".rstrip()


def render_summary(s: dict[str, Any]) -> str:
    """The final table, with what each number should be given what was published."""
    redis = s["mode"] == "redis"
    expected_hits = s["unique_ids"] - s["distinct_texts"]
    lines = [
        f"Neiromatrius demo: {s['replicas']} replicas, "
        + (f"Redis {s['redis']} (cluster-wide dedup and cache)" if redis else "no Redis"),
        "",
        f"  {'':<30}{'count':>10}{'expected':>10}",
        _row("published", s["published"], None),
        _row("  unique message IDs", s["unique_ids"], None),
        _row("  duplicate deliveries", s["duplicates_published"], None),
        _row("  distinct texts", s["distinct_texts"], None),
    ]
    if redis:
        lines.append(_row("processed", s["processed"], s["unique_ids"], "each ID once"))
        lines.append(_row("duplicates skipped", s["duplicates_skipped"], s["duplicates_published"]))
        # A replica that waited too long for another's classification of the same text computes
        # it itself: a hit less and a call more, so hits + misses stay exact.
        races = expected_hits - s["cache_hits"]
        exact = s["cache_hits"] + s["cache_misses"] == s["processed"] and races >= 0
        hits_note = f"{races} texts were classified by two replicas" if races and exact else ""
        mark = "≈" if races and exact else ""
        lines.append(_row("cache hits", s["cache_hits"], expected_hits, hits_note, mark))
    else:
        again = s["processed"] - s["unique_ids"]
        lines.append(_row("processed", s["processed"], s["unique_ids"], f"{again} processed again"))
        lines.append(_row("duplicates skipped", s["duplicates_skipped"], s["duplicates_published"]))
        lines.append(_row("cache hits", s["cache_hits"], None, "each replica has its own cache"))
    lines += [
        _row("classifier calls", s["classifier_calls"], None),
        _row("results published", s["results"], s["processed"]),
        _row("dead-lettered", s["dead_lettered"], 0),
        "",
        f"  throughput  {s['throughput_per_s']:,.0f} messages/s"
        f"  ({s['published']:,} deliveries in {s['seconds']:.1f}s"
        + (f", publishing paced at {s['rate_per_s']:g}/s)" if s["rate_per_s"] else ")"),
        "  processed per replica  "
        + "  ".join(f"{rid}: {n:,}" for rid, n in sorted(s["per_replica"].items())),
    ]
    if s["cluster_counters_agree"] is not None:
        agree = "yes ✓" if s["cluster_counters_agree"] else "NO"
        lines.append(f"  cluster counters in Redis equal the replicas' sum: {agree}")
    if not redis:
        lines += [
            "",
            "  Without Redis each replica remembers only the IDs and texts it has seen itself:",
            "  duplicates that land on another replica are processed again, and each replica",
            "  classifies each text once. Run with --redis-url redis://127.0.0.1:6379/0 to see",
            "  the cluster process every message once.",
        ]
    return "\n".join(lines)


async def run_demo(settings: Settings, options: DemoOptions, stop: asyncio.Event) -> int:
    """Run the demo and print its report; the exit code."""
    err = sys.stderr
    if not options.redis_url:
        err.write(
            "demo: no Redis (set REDIS_URL or pass --redis-url): in-memory replicas, so "
            "duplicates across replicas are possible and the numbers will show it\n"
        )
    demo = Demo(settings, options, stop, err)
    try:
        summary = await demo.run()
    except DemoFailed as exc:
        err.write(f"demo: {exc}\n")
        return 1
    if summary is None:
        err.write("demo: interrupted; replicas stopped and the run's queues and keys removed\n")
        return 130
    if options.as_json:
        print(orjson.dumps(summary, option=orjson.OPT_INDENT_2).decode())
    else:
        print(render_summary(summary))
    problems = check_summary(summary)
    for problem in problems:
        err.write(f"demo: {problem}\n")
    return 1 if problems else 0


def check_summary(s: dict[str, Any]) -> list[str]:
    """What does not add up; with Redis every number is exact, without it only the totals are."""
    problems = []
    if s["ids_with_results"] != s["unique_ids"]:
        problems.append(f"{s['ids_with_results']} of {s['unique_ids']} IDs got a result")
    if s["processed"] + s["duplicates_skipped"] + s["dead_lettered"] != s["published"]:
        problems.append("processed + duplicates skipped + dead-lettered != published")
    if s["mode"] == "redis":
        if s["processed"] != s["unique_ids"] or s["results"] != s["unique_ids"]:
            problems.append("with Redis every unique message must be processed exactly once")
        if s["cluster_counters_agree"] is False:
            problems.append("the cluster counters in Redis differ from the replicas' own")
    if any(code != 0 for code in s["replica_exit_codes"]):
        problems.append(f"replica exit codes: {s['replica_exit_codes']}")
    return problems
