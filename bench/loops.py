"""The replica on uvloop against the replica on asyncio, measured in one run (``EVENT_LOOP``).

    python -m bench.loops [--messages 20000] [--rate 500] [--seconds 8] [--rounds 3]

Each round starts one replica per loop (Redis, keywords classifier, all-unique traffic: case (b) of
``bench/run.py``, with its helpers). At full load the replica consumes ``--messages`` published
beforehand, its clock starting at its ``replica_started`` line; then, on the same replica, a paced
phase publishes ``--rate`` messages/s for ``--seconds`` and waits for every result. Both phases
report the CPU the replica spent per message (``bench/cpu.py``); the paced one also the median
publish-to-result latency. The loops alternate which goes first from round to round; the table
shows each loop's median and the ratio uvloop/asyncio, and each round's ratio (below 1: uvloop
spends less). The replica's ``event_loop`` line is checked, so a missing uvloop cannot pass for it.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
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
    deadline = time.monotonic() + 600
    while total < count and time.monotonic() < deadline:
        total = await asyncio.to_thread(handled, replica.stats_port)
        # Polling costs the replica a little: rarely until the end is near, as bench/run.py does.
        await asyncio.sleep(0.1 if total < count * 0.9 else 0.005)
    assert total >= count, f"{total}/{count} handled"
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


async def one_replica(loop: str, args: argparse.Namespace, tmp: Path) -> LoopRun:
    names = bench_names()
    replicas = ReplicaGroup(tmp)
    try:
        await prefill(names, bodies(args.messages, CASE, seed=2))
        env = {**case_env(names, CASE), "EVENT_LOOP": loop}
        replica = replicas.start(env, f"{names.input_queue}-{loop}")
        await replica.started(timeout_s=30, poll_s=0.005)
        announced = replica.event("event_loop") or {}
        if announced.get("event_loop") != loop:
            raise SystemExit(f"asked for {loop}, the replica logged {announced}")
        per_s, full_cpu = await consume_prefilled(replica, args.messages)
        paced_cpu, p50 = await paced(names, replica, args.rate, args.seconds)
    finally:
        await replicas.stop(timeout_s=30)
        await cleanup(names)
    return LoopRun(loop, per_s, full_cpu, paced_cpu, p50)


def render(rounds: list[dict[str, LoopRun]], args: argparse.Namespace) -> str:
    def median(loop: str, field: str) -> float:
        return statistics.median(getattr(r[loop], field) for r in rounds)

    fields = ("full_per_s", "full_cpu_us", "paced_cpu_us", "paced_p50_ms")
    lines = [
        f"{args.messages} messages at full load, then {args.rate:g} msg/s for {args.seconds:g} s,"
        f" one replica per loop; median of {len(rounds)} round(s); ratios uvloop/asyncio of this run",
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
    parser.add_argument("--rate", type=float, default=500.0, help="messages/s of the paced phase")
    parser.add_argument("--seconds", type=float, default=8.0, help="length of the paced phase")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    tmp = Path(os.environ.get("TMPDIR", "/tmp")) / "neiromatrius-bench"
    tmp.mkdir(parents=True, exist_ok=True)
    rounds: list[dict[str, LoopRun]] = []
    for index in range(args.rounds):
        order = LOOPS if index % 2 == 0 else LOOPS[::-1]
        runs = {}
        for loop in order:
            runs[loop] = run = await one_replica(loop, args, tmp)
            print(
                f"  round {index + 1} {loop}: full {run.full_cpu_us:.0f} µs/msg"
                f" ({run.full_per_s:,.0f} msg/s), paced {run.paced_cpu_us:.0f} µs/msg",
                file=sys.stderr,
                flush=True,
            )
        rounds.append(runs)
    print(render(rounds, args))


if __name__ == "__main__":
    asyncio.run(main())
