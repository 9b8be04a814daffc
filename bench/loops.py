"""The replica on uvloop against the replica on asyncio, measured in one run (``EVENT_LOOP``).

    python -m bench.loops [--messages 20000] [--rate 250] [--seconds 12] [--rounds 3]

Case (b) of ``bench/run.py`` (one replica, Redis, keywords classifier, all-unique traffic), with
that file's helpers, on each loop. The two loops run side by side, each replica on queues of its
own: this machine's load from other work swings a lone replica's CPU per message by tens of per
cent from one minute to the next, and running both at once exposes them to the same swings, so
their ratio holds where their absolute numbers do not. Each round has two phases. Full load: both
replicas consume ``--messages`` published beforehand, each one's clock starting at its
``replica_started`` line. Paced: two fresh replicas get ``--rate`` messages/s each (250: the
machine then carries 500 a second, as a lone replica at 500 would, and is not saturated; at 500
each the benchmark's own publisher falls behind and latency is all queueing), two seconds
unmeasured to warm them up, then ``--seconds`` measured, each result awaited. Both phases report
the CPU each replica spent per message (``bench/cpu.py``); the paced one also the median
publish-to-result latency. The table shows each loop's median over the rounds and the ratio
uvloop/asyncio, then each round's ratio (below 1: uvloop spends less). The replicas' ``event_loop``
lines are checked, so a missing uvloop cannot pass for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

from bench.cpu import cpu_seconds
from bench.run import (
    CASES,
    bench_names,
    bodies,
    case_env,
    cleanup,
    handled,
    prefill,
    result_latencies,
)
from worker.cli.replicas import ReplicaGroup, ReplicaNames, ReplicaProcess

LOOPS = ("asyncio", "uvloop")
CASE = CASES[1]  # (b): the worker, Redis, all unique
STALL_S = 20.0
WARM_UP_S = 2.0  # of the paced phase's rate, before it is measured


@dataclass(frozen=True)
class LoopRun:
    """One replica on one loop: full-load throughput and CPU, paced CPU and latency."""

    loop: str
    full_per_s: float
    full_cpu_us: float
    paced_cpu_us: float
    paced_p50_ms: float


async def consume_prefilled(replica: ReplicaProcess, count: int) -> tuple[float, float]:
    """Until the replica has handled ``count`` messages: (messages/s, CPU µs per message)."""
    cpu_at_start = cpu_seconds(replica.pid)
    total = 0
    progressed_at = time.monotonic()
    # A replica that stops making progress (it fails every message, say) ends the run.
    while total < count and time.monotonic() - progressed_at < STALL_S:
        now = await asyncio.to_thread(handled, replica.stats_port)
        if now > total:
            total, progressed_at = now, time.monotonic()
        # Polling costs the replica a little: rarely until the end is near, as bench/run.py does.
        await asyncio.sleep(0.1 if total < count * 0.9 else 0.005)
    assert total >= count, f"{total}/{count} handled, none for {STALL_S:g} s: {replica.log_path}"
    per_s = count / (time.time() - replica.started_at)
    return per_s, (cpu_seconds(replica.pid) - cpu_at_start) / count * 1e6


async def paced(
    names: ReplicaNames, replica: ReplicaProcess, rate: float, seconds: float
) -> tuple[float, float]:
    """Publish at ``rate`` for ``seconds``, wait for every result: (CPU µs/msg, p50 ms)."""
    count = int(rate * seconds)
    cpu_before = cpu_seconds(replica.pid)
    latencies = await result_latencies(names, rate, seconds)
    spent = cpu_seconds(replica.pid) - cpu_before
    assert len(latencies) >= count, f"{len(latencies)}/{count} results at {rate:g}/s"
    return spent / count * 1e6, statistics.median(latencies) * 1000


Measure = Callable[[ReplicaNames, ReplicaProcess], Awaitable[tuple[float, float]]]


async def side_by_side(
    tmp: Path, messages: int, measure: Measure
) -> dict[str, tuple[float, float]]:
    """One replica per loop at the same time, each on queues of its own prefilled with
    ``messages``; each loop's ``measure``, taken concurrently."""
    named = {loop: bench_names() for loop in LOOPS}
    replicas = ReplicaGroup(tmp)
    try:
        if messages:
            await asyncio.gather(
                *(prefill(n, bodies(messages, CASE, seed=2)) for n in named.values())
            )
        started = {
            loop: replicas.start(
                {**case_env(n, CASE), "EVENT_LOOP": loop}, f"{n.input_queue}-{loop}"
            )
            for loop, n in named.items()
        }
        await replicas.started(timeout_s=30, poll_s=0.005)
        for loop, replica in started.items():
            announced = replica.event("event_loop") or {}
            if announced.get("event_loop") != loop:
                raise SystemExit(f"asked for {loop}, the replica logged {announced}")
        results = await asyncio.gather(*(measure(named[loop], r) for loop, r in started.items()))
        return dict(zip(started, results, strict=True))
    finally:
        await replicas.stop(timeout_s=30)
        for n in named.values():
            await cleanup(n)


async def one_round(args: argparse.Namespace, tmp: Path) -> dict[str, LoopRun]:
    """Full load, then the paced load on fresh replicas, warmed up at the same rate first (right
    after a full load a replica's CPU per paced message is lower and far noisier)."""

    async def full(_: ReplicaNames, replica: ReplicaProcess) -> tuple[float, float]:
        return await consume_prefilled(replica, args.messages)

    async def warmed_then_paced(
        names: ReplicaNames, replica: ReplicaProcess
    ) -> tuple[float, float]:
        await result_latencies(names, args.rate, WARM_UP_S)
        return await paced(names, replica, args.rate, args.seconds)

    fulls = await side_by_side(tmp, args.messages, full)
    paceds = await side_by_side(tmp, 0, warmed_then_paced)
    return {loop: LoopRun(loop, *fulls[loop], *paceds[loop]) for loop in LOOPS}


def render(rounds: list[dict[str, LoopRun]], args: argparse.Namespace) -> str:
    def median(loop: str, field: str) -> float:
        return statistics.median(getattr(r[loop], field) for r in rounds)

    fields = ("full_per_s", "full_cpu_us", "paced_cpu_us", "paced_p50_ms")
    lines = [
        f"{args.messages} messages at full load, then {args.rate:g} msg/s each for {args.seconds:g} s,"
        f" both loops side by side; median of {len(rounds)} round(s); ratios uvloop/asyncio of this run",
        "",
        f"{'loop':<16} {'full msg/s':>11} {'full CPU µs/msg':>16} {'paced CPU µs/msg':>17}"
        f" {'paced p50 ms':>13}",
    ]
    for loop in LOOPS:
        values = [median(loop, f) for f in fields]
        lines.append(
            f"{loop:<16} {values[0]:>11,.0f} {values[1]:>16.0f} {values[2]:>17.0f}"
            f" {values[3]:>13.1f}"
        )
    ratios = [median("uvloop", f) / median("asyncio", f) for f in fields]
    lines.append(
        f"{'uvloop/asyncio':<16} {ratios[0]:>11.2f} {ratios[1]:>16.2f} {ratios[2]:>17.2f}"
        f" {ratios[3]:>13.2f}"
    )
    lines += ["", "uvloop/asyncio in each round (CPU per message; below 1: uvloop spends less):"]
    for label, field in (("full load", "full_cpu_us"), ("paced", "paced_cpu_us")):
        each = "  ".join(
            f"{getattr(r['uvloop'], field) / getattr(r['asyncio'], field):.2f}" for r in rounds
        )
        lines.append(f"  {label:<10} {each}")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description="The replica on uvloop against asyncio.")
    parser.add_argument("--messages", type=int, default=20_000, help="full-load messages")
    parser.add_argument(
        "--rate", type=float, default=250.0, help="messages/s to each replica in the paced phase"
    )
    parser.add_argument("--seconds", type=float, default=12.0, help="measured paced phase")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "neiromatrius-bench"
    tmp.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, LoopRun]] = []
    for index in range(args.rounds):
        rounds.append(runs := await one_round(args, tmp))
        for run in runs.values():
            print(
                f"  round {index + 1} {run.loop}: full {run.full_cpu_us:.0f} µs/msg"
                f" ({run.full_per_s:,.0f} msg/s), paced {run.paced_cpu_us:.0f} µs/msg",
                file=sys.stderr,
                flush=True,
            )
    print(render(rounds, args))


if __name__ == "__main__":
    asyncio.run(main())
