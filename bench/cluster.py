"""Case (b) with two replicas against one Redis and against a local 3-master Redis Cluster.

    python -m bench.cluster [--messages 20000] [--rounds 3] [--masters 3]

Both Redis setups are started by the benchmark on free loopback ports (a standalone
``redis-server`` and ``bench.redis_cluster.LocalCluster``, each master with a replica), so neither
shares its CPU with anything else; the broker is the local RabbitMQ. Each round runs both targets
one after the other, on queues filled beforehand. Printed per target: messages/s (median and each
round), and each master's Redis CPU per message (``used_cpu_sys + used_cpu_user`` of ``INFO cpu``
before and after the measured phase): one Redis does all the work in one process, the cluster
spreads it over its masters. The machine's cores are shared by the replicas, the broker and every
Redis process, so the cluster's throughput here shows the cost of the split, not the gain of more
machines; the per-master CPU shows how much of one Redis core each master needs.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.cpu import cpu_seconds as process_cpu_seconds
from bench.redis_cluster import ClusterNode, LocalCluster, cpu_seconds, free_port, wait_port
from bench.run import CASES as RUN_CASES
from bench.run import bench_names, bodies, case_env, cleanup, handled, prefill
from worker.cli.replicas import ReplicaGroup

CASE_B = RUN_CASES[1]


@dataclass
class Target:
    """A Redis setup the replicas are pointed at: its URL and the masters to read CPU from."""

    name: str
    url: str
    masters: list[ClusterNode]


@dataclass
class Measured:
    per_second: list[float] = field(default_factory=list)
    replica_cpu_us: list[float] = field(default_factory=list)  # both replicas, per message
    cpu_us_per_master: list[list[float]] = field(default_factory=list)


def start_standalone(directory: Path) -> tuple[Target, subprocess.Popen[bytes]]:
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    node = ClusterNode(free_port(), directory)
    directory.mkdir(parents=True, exist_ok=True)
    args = [binary, "--bind", "127.0.0.1", "--port", str(node.port), "--dir", str(directory)]
    process = subprocess.Popen(
        [*args, "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_port(node.port, process)
    node.process = process
    return Target("one Redis", f"redis://{node.address}/0", [node]), process


async def run_case(
    target: Target, count: int, prefetch: int, tmp: Path
) -> tuple[float, float, list[float]]:
    """Two replicas over ``count`` prefilled messages: msg/s, the replicas' CPU µs/message and
    each master's."""
    names = bench_names()
    try:
        await prefill(names, bodies(count, CASE_B, seed=2))
        env = case_env(names, CASE_B)
        env["REDIS_URL"] = target.url
        env["PREFETCH"] = str(prefetch)
        replicas = ReplicaGroup(tmp)
        for index in range(2):
            replicas.start(env, f"{names.input_queue}-{index}")
        try:
            await replicas.started(timeout_s=30, poll_s=0.005)
            started_at = min(r.started_at for r in replicas)
            cpu_before = [cpu_seconds(m) for m in target.masters]
            replicas_before = sum(process_cpu_seconds(r.pid) for r in replicas)
            ports = [r.stats_port for r in replicas]
            total, deadline = 0, time.monotonic() + 600
            while total < count and time.monotonic() < deadline:
                total = sum(await asyncio.gather(*(asyncio.to_thread(_handled, p) for p in ports)))
                await asyncio.sleep(0.1 if total < count * 0.9 else 0.005)
            assert total >= count, f"{target.name}: {total}/{count} handled"
            per_second = count / (time.time() - started_at)
            replica_us = (
                sum(process_cpu_seconds(r.pid) for r in replicas) - replicas_before
            ) / count
            cpu_us = [
                (cpu_seconds(m) - before) / count * 1e6
                for m, before in zip(target.masters, cpu_before, strict=True)
            ]
        finally:
            await replicas.stop(timeout_s=30)
    finally:
        await cleanup(names)
    return per_second, replica_us * 1e6, cpu_us


def _handled(port: int) -> int:
    """``handled``, or 0 when a busy replica's stats endpoint is too slow to answer this time."""
    try:
        return handled(port)
    except (TimeoutError, OSError):
        return 0


def render(results: dict[str, Measured], count: int) -> str:
    lines = [
        f"case (b), two replicas, {count} messages, median of "
        f"{len(next(iter(results.values())).per_second)} round(s)",
        "",
        f"{'target':<22} {'msg/s':>8}  {'rounds':<24} {'replicas µs/msg':>15}"
        "  Redis CPU µs/msg per master (median)",
    ]
    for name, measured in results.items():
        rounds = " ".join(f"{r:,.0f}" for r in measured.per_second)
        per_master = [
            statistics.median(column) for column in zip(*measured.cpu_us_per_master, strict=True)
        ]
        cpu = "  ".join(f"{us:.1f}" for us in per_master)
        lines.append(
            f"{name:<22} {statistics.median(measured.per_second):>8,.0f}  {rounds:<24}"
            f" {statistics.median(measured.replica_cpu_us):>15.0f}  {cpu}"
            f"  (sum {sum(per_master):.1f})"
        )
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--masters", type=int, default=3)
    parser.add_argument("--prefetch", type=int, default=1024)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="neiromatrius-bench-cluster-"))
    single, single_process = start_standalone(work / "standalone")
    cluster = LocalCluster(work / "cluster", masters=args.masters).start()
    try:
        targets = [
            single,
            Target(f"cluster, {args.masters} masters", cluster.url, cluster.master_nodes()),
        ]
        results = {t.name: Measured() for t in targets}
        for round_index in range(args.rounds):
            for target in targets:
                per_second, replica_us, cpu_us = await run_case(
                    target, args.messages, args.prefetch, work
                )
                results[target.name].per_second.append(per_second)
                results[target.name].replica_cpu_us.append(replica_us)
                results[target.name].cpu_us_per_master.append(cpu_us)
                print(
                    f"  round {round_index + 1} {target.name}: {per_second:,.0f} msg/s", flush=True
                )
        print(render(results, args.messages))
    finally:
        cluster.stop()
        single_process.terminate()
        single_process.wait(timeout=10)
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
