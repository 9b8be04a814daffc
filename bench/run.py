"""The worker against the bare consumer, measured in one run on the local RabbitMQ and Redis.

    python -m bench.run [--messages 20000] [--rounds 3] [--cases abcdefgo]

Cases: (a) baseline, a bare aio-pika consumer acknowledging each message and doing nothing else;
(b) the worker, one replica, Redis, keywords classifier, all-unique traffic; (c) 50 % duplicates;
(d) 90 % repeated texts (cache hits); (e) in-memory mode; (f) two replicas; (g) the floor of the
worker's broker traffic: a bare consumer that publishes one confirmed result per message and
acknowledges, nothing else (``bench/publishing_consumer.py``); (o) case (b) with ``AMQP_FAST_PATH=off``,
the replica on stock aio-pika/aiormq; (t) and (u) case (b) with tracing on, every span made,
sampled at 100 % and 1 % (``parentbased_traceidratio``), batched and dropped by the ``discard``
exporter (``worker.observability.tracing``). Every case consumes the same number
of messages published beforehand, so it measures consumption alone; then each worker case gets a
paced phase (``--latency-rate`` messages/s, 1,000 by default, or half the case's own rate if that
is lower, for four seconds) that measures the time from publish to result at the same load for
every case. Prints messages/s, the ratio to (a), p50/p99 latency, each replica's peak RSS, and
Redis memory per remembered message ID, and the CPU each case cost per message in the consumer,
the broker and Redis (they share the machine's cores). Every case runs ``--rounds`` times, the
rounds one after the other (a, b, ... g, then again); the table shows each case's median, and the
ratio of each round's case to that round's (a). Absolute numbers drift on a shared machine; the
ratios are the result, and the rounds show how much they drift.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import orjson
import redis.asyncio as aioredis

from bench.cpu import Services, cpu_seconds
from bench.redis_memory import measure as measure_redis_memory
from worker.amqp import fastpath
from worker.amqp.results import ResultOut
from worker.cli import publish
from worker.cli.replicas import ReplicaGroup, ReplicaNames, listen_for_results, replica_env
from worker.cli.samples import generate_sample
from worker.core.settings import UNROUTED_SUFFIX
from worker.redisio.keys import RedisKeys

RABBITMQ_URL = os.environ.get("RABBITMQ_URL") or "amqp://guest:guest@127.0.0.1:5672/"
REDIS_URL = os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379/0"
ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    key: str
    title: str
    bare: bool = False
    publishing: bool = False
    redis: bool = True
    duplicates: float = 0.0
    repeated_texts: float = 0.0
    replicas: int = 1
    fast_path: bool = True
    env: tuple[tuple[str, str], ...] = ()  # extra settings of the replicas


def _traced(ratio: str) -> tuple[tuple[str, str], ...]:
    """Tracing on, spans made, sampled at ``ratio`` and batched, then dropped (no collector)."""
    sampler = ("OTEL_TRACES_SAMPLER", "parentbased_traceidratio")
    return (("OTEL_TRACES_EXPORTER", "discard"), sampler, ("OTEL_TRACES_SAMPLER_ARG", ratio))


CASES = [
    Case("a", "bare aio-pika consumer, ack each (baseline)", bare=True),
    Case("b", "worker, Redis, all unique"),
    Case("c", "worker, Redis, 50% duplicates", duplicates=0.5),
    Case("d", "worker, Redis, 90% repeated texts", repeated_texts=0.9),
    Case("e", "worker, in-memory mode", redis=False),
    Case("f", "worker, Redis, two replicas", replicas=2),
    Case("g", "bare consumer + one confirmed publish each", bare=True, publishing=True),
    Case("o", "worker, Redis, all unique, AMQP_FAST_PATH=off", fast_path=False),
    Case("t", "worker, Redis, all unique, tracing on, 100% sampled", env=_traced("1.0")),
    Case("u", "worker, Redis, all unique, tracing on, 1% sampled", env=_traced("0.01")),
]


@dataclass
class Outcome:
    case: Case
    per_second: float = 0.0
    p50_ms: float | None = None
    p99_ms: float | None = None
    peak_rss_mb: list[float] = field(default_factory=list)
    # CPU µs per message during the measured phase: consumer (all replicas), broker, Redis
    cpu_us: tuple[float, float, float] | None = None
    rounds: list[float] = field(default_factory=list)  # msg/s of each round


def cpu_per_message(
    consumer_s: float, services: tuple[float, float], count: int
) -> tuple[float, float, float]:
    return (
        consumer_s / count * 1e6,
        services[0] / count * 1e6,
        services[1] / count * 1e6,
    )


def bench_names() -> ReplicaNames:
    tag = uuid.uuid4().hex[:8]
    return ReplicaNames(
        tag, f"bench.{tag}.in", f"bench.{tag}.out", f"bench.{tag}.dead", f"bench:{tag}:"
    )


def bodies(count: int, case: Case, seed: int) -> list[dict[str, Any]]:
    plan = generate_sample(count, case.duplicates, case.repeated_texts, seed=seed)
    return [m.to_body() for m in plan.messages]


async def prefill(names: ReplicaNames, messages: list[dict[str, Any]]) -> None:
    """Publish ``messages`` to the case's queue, confirmed, through the worker's batched publisher
    (aio-pika's ``publish``, one coroutine a message, took half the benchmark's time)."""
    connection = await aiormq.connect(RABBITMQ_URL)
    try:
        channel = await connection.channel(publisher_confirms=True)
        assert isinstance(channel, aiormq.Channel)
        await channel.queue_declare(names.input_queue, durable=True)

        async def current() -> aiormq.Channel:
            return channel

        # Direct publishing as before, without installing the frame reader in this process.
        out = ResultOut(
            current, "", fast_path=fastpath.decide()
        )  # the default exchange: routed by the queue's name
        for start in range(0, len(messages), 5000):
            await asyncio.gather(
                *(
                    out.publish(orjson.dumps(m), names.input_queue, str(m["message_id"]))
                    for m in messages[start : start + 5000]
                )
            )
    finally:
        await connection.close()


def case_env(names: ReplicaNames, case: Case) -> dict[str, str]:
    env = replica_env(
        os.environ,
        names,
        drop={"REDIS_URL", "FAULT_INJECTION"},
        RABBITMQ_URL=RABBITMQ_URL,
        LOG_LEVEL="info",
    )
    if case.redis:
        env["REDIS_URL"] = REDIS_URL
    env["AMQP_FAST_PATH"] = "on" if case.fast_path else "off"
    env.update(case.env)
    return env


def handled(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/monitoring/stats", timeout=5) as r:
        counters = json.loads(r.read())["replica"]["counters"]
    return int(counters["processed"] + counters["duplicates"] + counters["dead_lettered"])


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


def median_of(runs: list[Outcome]) -> Outcome:
    """One case over its rounds: the median throughput and CPU, the first round's latency (the
    only one measured), the highest peak RSS of each replica."""
    cpu = [o.cpu_us for o in runs if o.cpu_us is not None]
    return Outcome(
        runs[0].case,
        per_second=statistics.median(o.per_second for o in runs),
        p50_ms=runs[0].p50_ms,
        p99_ms=runs[0].p99_ms,
        peak_rss_mb=[max(rss) for rss in zip(*(o.peak_rss_mb for o in runs), strict=True)],
        cpu_us=(
            (
                statistics.median(c[0] for c in cpu),
                statistics.median(c[1] for c in cpu),
                statistics.median(c[2] for c in cpu),
            )
            if cpu
            else None
        ),
        rounds=[o.per_second for o in runs],
    )


async def result_latencies(names: ReplicaNames, rate: float, seconds: float) -> list[float]:
    """Publish at ``rate`` for ``seconds`` with a send timestamp; collect publish-to-result times."""
    latencies: list[float] = []

    async def on_result(message: aio_pika.abc.AbstractIncomingMessage) -> None:
        sent_at = orjson.loads(message.body).get("sent_at")
        if sent_at is not None:
            latencies.append(time.time() - float(sent_at))

    connection = await aio_pika.connect_robust(RABBITMQ_URL)
    try:
        await listen_for_results(connection, names.results_exchange, on_result)
        count = int(rate * seconds)
        paced = [
            publish.Outgoing(
                orjson.dumps(
                    {
                        "message_id": f"lat-{uuid.uuid4()}",
                        "text": f"Где мой заказ {i}? latency probe",
                        "sent_at": 0.0,
                    }
                ),
                None,
            )
            for i in range(count)
        ]
        started = time.perf_counter()
        pub = await connection.channel(publisher_confirms=True)
        pending = []
        for i in range(count):
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            body = orjson.loads(paced[i].body)
            body["sent_at"] = time.time()
            pending.append(
                asyncio.ensure_future(
                    pub.default_exchange.publish(
                        aio_pika.Message(orjson.dumps(body)), routing_key=names.input_queue
                    )
                )
            )
        await asyncio.gather(*pending)
        deadline = time.monotonic() + 30
        while len(latencies) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        await connection.close()
    return latencies


async def run_bare(
    names: ReplicaNames, case: Case, count: int, prefetch: int, services: Services
) -> Outcome:
    await prefill(names, bodies(count, CASES[1], seed=1))
    before = services.sample()
    if case.publishing:
        script = "publishing_consumer.py"
        extra = [names.results_exchange]
    else:
        script, extra = "bare_consumer.py", []
    done = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            str(ROOT / "bench" / script),
            RABBITMQ_URL,
            names.input_queue,
            *extra,
            str(count),
            str(prefetch),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    spent = services.since(before)
    report = json.loads(done.stdout)
    return Outcome(
        case,
        per_second=count / report["seconds"],
        peak_rss_mb=[round(report["peak_rss_mb"], 1)],
        cpu_us=cpu_per_message(report["cpu_seconds"], spent, count),
    )


async def run_worker(
    names: ReplicaNames,
    case: Case,
    count: int,
    latency_rate: float,
    tmp: Path,
    prefetch: int,
    services: Services,
) -> Outcome:
    messages = bodies(count, case, seed=2)
    await prefill(names, messages)
    env = case_env(names, case)
    env["PREFETCH"] = str(prefetch)
    replicas = ReplicaGroup(tmp)
    for index in range(case.replicas):
        # The consumer starts the moment the replica is up: its queue is already full.
        replicas.start(env, f"{names.input_queue}-{index}")
    outcome = Outcome(case)
    try:
        # The clock starts when a replica starts consuming (its queue is already full), read
        # from its log line's timestamp: polling its stats endpoint for the first handled message
        # would wait for its busy event loop, and was late by up to 0.3 s.
        await replicas.started(timeout_s=30, poll_s=0.005)
        started_at = min(r.started_at for r in replicas)
        ports = [r.stats_port for r in replicas]
        consumer_at_start = sum(cpu_seconds(r.pid) for r in replicas)
        services_at_start = services.sample()
        total = 0
        deadline = time.monotonic() + 600
        while total < count and time.monotonic() < deadline:
            total = sum(await asyncio.gather(*(asyncio.to_thread(handled, p) for p in ports)))
            # The stats endpoint costs the replica, the broker and Redis a little each time: poll
            # it rarely until the end is near, then often, so the end is seen within a few ms.
            await asyncio.sleep(0.1 if total < count * 0.9 else 0.005)
        assert total >= count, f"case {case.key}: {total}/{count} handled"
        outcome.per_second = count / (time.time() - started_at)
        consumer_s = sum(cpu_seconds(r.pid) for r in replicas) - consumer_at_start
        outcome.cpu_us = cpu_per_message(consumer_s, services.since(services_at_start), count)
        latencies = []
        if latency_rate > 0:
            rate = min(latency_rate, outcome.per_second / 2)
            latencies = await result_latencies(names, rate, 4.0)
        if latencies:
            latencies.sort()
            outcome.p50_ms = round(statistics.median(latencies) * 1000, 1)
            outcome.p99_ms = round(latencies[int(len(latencies) * 0.99) - 1] * 1000, 1)
        outcome.peak_rss_mb = [round(peak_rss_mb(r.pid), 1) for r in replicas]
    finally:
        await replicas.stop(timeout_s=30)
    return outcome


async def cleanup(names: ReplicaNames) -> None:
    connection = await aio_pika.connect_robust(RABBITMQ_URL)
    try:
        channel = await connection.channel()
        unrouted = names.results_exchange + UNROUTED_SUFFIX  # results nobody bound kept there
        for queue in (names.input_queue, names.dead_letter_queue, unrouted):
            await channel.queue_delete(queue, if_unused=False, if_empty=False)
        for delay in (1000, 2000, 4000, 8000):
            await channel.queue_delete(
                f"{names.input_queue}.retry.{delay}ms", if_unused=False, if_empty=False
            )
        await channel.exchange_delete(names.results_exchange)
        await channel.exchange_delete(unrouted)
    finally:
        await connection.close()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        pattern = RedisKeys(names.key_prefix).everything
        keys = [k async for k in client.scan_iter(match=pattern, count=5000)]
        for start in range(0, len(keys), 5000):
            await client.unlink(*keys[start : start + 5000])
    finally:
        await client.aclose()


def render(outcomes: list[Outcome], memory: dict[str, Any], count: int) -> str:
    first = outcomes[0] if outcomes and outcomes[0].case.key == "a" else None
    base = first.per_second if first else None
    rounds = len(outcomes[0].rounds) if outcomes else 0
    lines = [
        f"{count} messages per case, median of {rounds} round(s); ratios against (a) of this run",
        "",
        f"{'case':<4} {'what':<44} {'msg/s':>8} {'ratio':>6} {'p50 ms':>7} {'p99 ms':>7}"
        f" {'peak RSS MB':>12}  CPU µs/msg: consumer broker Redis",
    ]
    for o in outcomes:
        ratio = f"{o.per_second / base:.2f}" if base else "-"
        p50 = f"{o.p50_ms:.1f}" if o.p50_ms is not None else "-"
        p99 = f"{o.p99_ms:.1f}" if o.p99_ms is not None else "-"
        rss = "/".join(f"{r:.0f}" for r in o.peak_rss_mb)
        cpu = "   ".join(f"{us:>6.0f}" for us in o.cpu_us) if o.cpu_us else ""
        lines.append(
            f"({o.case.key}) {o.case.title:<44} {o.per_second:>8,.0f} {ratio:>6} {p50:>7}"
            f" {p99:>7} {rss:>12}             {cpu}"
        )
    lines.append("")
    if first and rounds > 1:
        lines.append("Ratio to (a) in each round (each round runs every case once, in order):")
        for o in outcomes[1:]:
            each = "  ".join(f"{r / a:.2f}" for r, a in zip(o.rounds, first.rounds, strict=True))
            lines.append(f"  ({o.case.key}) {each}")
        lines.append("")
    by_key = {o.case.key: o for o in outcomes}
    if "b" in by_key and "g" in by_key:
        lines.append(
            f"(b) against the floor of its broker traffic (g): "
            f"{by_key['b'].per_second / by_key['g'].per_second:.2f}"
        )
    lines.append(
        f"Redis memory per remembered message ID: {memory['bytes_per_id']} bytes "
        f"({memory['ids']:,} UUID IDs, prefix {memory['key_prefix']!r})"
    )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description="Benchmark the worker against a bare consumer.")
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument(
        "--rounds", type=int, default=3, help="rounds of every case; each case's median is shown"
    )
    parser.add_argument("--cases", default="abcdefgo")
    parser.add_argument(
        "--prefetch", type=int, default=1024, help="prefetch of every case (the worker's default)"
    )
    parser.add_argument("--memory-ids", type=int, default=100_000)
    parser.add_argument(
        "--latency-rate", type=float, default=1000.0, help="messages/s of the latency phase"
    )
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "neiromatrius-bench"
    tmp.mkdir(parents=True, exist_ok=True)
    services = Services.find()
    rounds: dict[str, list[Outcome]] = {}
    for round_index in range(args.rounds):
        for case in CASES:
            if case.key not in args.cases:
                continue
            names = bench_names()
            try:
                if case.bare:
                    outcome = await run_bare(names, case, args.messages, args.prefetch, services)
                else:
                    # Latency is measured in the first round only: it needs no repeating.
                    rate = args.latency_rate if round_index == 0 else 0.0
                    outcome = await run_worker(
                        names, case, args.messages, rate, tmp, args.prefetch, services
                    )
            finally:
                await cleanup(names)
            rounds.setdefault(case.key, []).append(outcome)
            print(
                f"  round {round_index + 1} ({case.key}) {outcome.per_second:,.0f} msg/s",
                file=sys.stderr,
                flush=True,
            )
    outcomes = [median_of(runs) for runs in rounds.values()]
    memory = await measure_redis_memory(REDIS_URL.rsplit("/", 1)[0] + "/15", args.memory_ids)
    print(render(outcomes, memory, args.messages))


if __name__ == "__main__":
    asyncio.run(main())
