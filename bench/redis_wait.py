"""What ``REDIS_WAIT_REPLICAS`` costs: the claim store's completions with and without ``WAIT``.

``python -m bench.redis_wait`` starts a master and a replica of its own (loopback ports, no
persistence), then, for ``REDIS_WAIT_REPLICAS`` 0 and 1 in turn, claims and completes
``--messages`` IDs in batches of ``--batch`` through ``RedisClaimStore`` (the worker's own scripts
and pipeline), and prints messages per second and the per-batch completion latency (p50, p99),
with the ratio of 1 to 0 measured in the same run. Only Redis is measured: no broker, no
classifier. What ``WAIT`` buys is measured by ``tests/integration/test_redis_sentinel.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

from bench.redis_cluster import _wait_port, free_port
from worker.claims.protocol import ClaimAsk, Completion, TokenSource
from worker.claims.redis_store import RedisClaimStore
from worker.redisio.clients import make_redis
from worker.redisio.keys import RedisKeys


def start_pair(directory: Path) -> tuple[list[subprocess.Popen[bytes]], int]:
    """A master and its replica; the master's port once the replica is in sync."""
    binary = shutil.which("redis-server")
    assert binary, "redis-server is not installed"
    master, replica = free_port(), free_port()
    processes = []
    for port in (master, replica):
        args = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", ""]
        args += ["--appendonly", "no", "--dir", str(directory)]
        args += ["--dbfilename", f"dump-{port}.rdb"]
        if port == replica:
            args += ["--replicaof", "127.0.0.1", str(master)]
        process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        processes.append(process)
        _wait_port(port, process)
    return processes, master


async def wait_for_sync(port: int) -> None:
    client = make_redis(f"redis://127.0.0.1:{port}/0", 2.0)
    try:
        for _ in range(200):
            info = await client.info("replication")
            replica = info.get("slave0")
            if isinstance(replica, dict) and replica.get("state") == "online":
                return
            await asyncio.sleep(0.05)
        raise RuntimeError("the replica did not connect")
    finally:
        await client.aclose()


async def measure(
    port: int, wait_replicas: int, messages: int, batch: int
) -> tuple[float, list[float]]:
    """Messages per second and per-batch completion latencies (ms) for one setting."""
    client = make_redis(f"redis://127.0.0.1:{port}/0", 2.0)
    keys = RedisKeys(f"bench-wait-{wait_replicas}-{time.time_ns()}:")
    store = RedisClaimStore(
        client,
        keys,
        TokenSource("bench"),
        lease_s=30.0,
        dedup_ttl_s=600,
        wait_replicas=wait_replicas,
        wait_timeout_ms=1000,
    )
    latencies_ms: list[float] = []
    started = time.perf_counter()
    try:
        for start in range(0, messages, batch):
            ids = [f"m-{i}" for i in range(start, min(start + batch, messages))]
            claims = await store.claim_many([ClaimAsk(i) for i in ids])
            completions = [Completion(i, c.token, False) for i, c in zip(ids, claims, strict=True)]
            completing = time.perf_counter()
            await store.complete_many(completions)
            latencies_ms.append((time.perf_counter() - completing) * 1000)
        elapsed_s = time.perf_counter() - started
    finally:
        await store.aclose()
        await client.aclose()
    return messages / elapsed_s, latencies_ms


def percentile(values: list[float], share: float) -> float:
    return (
        statistics.quantiles(values, n=100)[int(share * 100) - 1] if len(values) > 1 else values[0]
    )


async def run(messages: int, batch: int, rounds: int) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-wait-") as folder:
        processes, port = start_pair(Path(folder))
        try:
            await wait_for_sync(port)
            results: dict[int, list[tuple[float, list[float]]]] = {0: [], 1: []}
            for _ in range(rounds):  # interleaved, so both settings see the same machine
                for wait_replicas in (0, 1):
                    results[wait_replicas].append(
                        await measure(port, wait_replicas, messages, batch)
                    )
        finally:
            for process in processes:
                process.terminate()
                process.wait(timeout=10)
    rates = {w: statistics.median(r for r, _ in runs) for w, runs in results.items()}
    print(f"{messages:,} messages in batches of {batch}, {rounds} rounds, master + 1 replica")
    for wait_replicas, runs in results.items():
        latencies = [ms for _, per_batch in runs for ms in per_batch]
        print(
            f"  REDIS_WAIT_REPLICAS={wait_replicas}: {rates[wait_replicas]:>9,.0f} messages/s"
            f"  completion p50 {percentile(latencies, 0.5):.2f} ms  p99 {percentile(latencies, 0.99):.2f} ms"
        )
    print(f"  ratio 1/0: {rates[1] / rates[0]:.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(run(args.messages, args.batch, args.rounds))


if __name__ == "__main__":
    main()
