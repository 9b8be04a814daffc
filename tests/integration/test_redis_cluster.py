"""Replicas on a Redis Cluster (3 masters + 3 replicas of this test's own): exactly once, counters
summed over the shards, keys spread over every master, and a manual failover survived."""

from __future__ import annotations

import asyncio
import json
import random
import time
import urllib.request
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import RedisCluster

from bench.redis_cluster import ClusterNode, LocalCluster
from tests.conftest import REDIS_URL, Names
from tests.integration.support import (
    Replicas,
    ResultSink,
    body,
    cluster_counters,
    publish_bodies,
    run_cli,
    wait_counter,
)
from worker.observability.metrics import CounterName
from worker.redisio.clients import make_client

pytestmark = pytest.mark.integration

UNIQUE = 3000
DUPLICATES = 1000
# Per-delivery debug events: each delivery of an ID ends in one of them (or in a failure).
DELIVERY_EVENTS = ("message_processed", "duplicate_skipped")


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    started = LocalCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    try:
        yield started
    finally:
        started.stop()


def traffic(seed: int) -> tuple[list[dict[str, Any]], set[str]]:
    """3,000 unique messages with 1,000 copies of some of them mixed in."""
    rng = random.Random(seed)
    uniques = [body(f"m-{i}", f"Где мой заказ номер {i}? Order #{i} status") for i in range(UNIQUE)]
    copies = [dict(uniques[i]) for i in rng.sample(range(UNIQUE), DUPLICATES)]
    mixed = uniques + copies
    rng.shuffle(mixed[UNIQUE // 2 :])  # copies arrive among the second half
    return mixed, {m["message_id"] for m in uniques}


def get_stats(port: int) -> tuple[int, dict[str, Any]]:
    with urllib.request.urlopen(
        f"http://127.0.0.1:{port}/api/monitoring/stats", timeout=10
    ) as response:
        return response.status, dict(json.loads(response.read()))


def deliveries_per_id(replicas: Replicas) -> Counter[str]:
    seen: Counter[str] = Counter()
    for replica in replicas:
        for event in replica.events():
            if event.get("event") in DELIVERY_EVENTS and "message_id" in event:
                seen[event["message_id"]] += 1
    return seen


def keys_per_master(cluster: LocalCluster, prefix: str) -> dict[str, int]:
    def count(node: ClusterNode) -> int:
        return len(node.cli("--scan", "--pattern", f"{prefix}*").split())

    return {node.address: count(node) for node in cluster.master_nodes()}


async def test_three_replicas_on_a_cluster_process_each_id_once(
    cluster: LocalCluster, names: Names, amqp: object, tmp_path: Path
) -> None:
    """3,000 unique + 1,000 duplicate messages through 3 replicas pointed at one node of a
    cluster (mode detected): one result per ID, duplicates = 1,000 summed over the shards, the
    stats endpoint answers 200 with ``redis_connected``, and every master holds keys."""
    bodies, ids = traffic(seed=3)
    client = await make_client(cluster.url, "auto", 2.0)
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(3):
                replicas.start(names.env(REDIS_URL=cluster.url, PREFETCH="128"))
            await replicas.started()
            await publish_bodies(names, bodies)
            await sink.wait_for_ids(ids, timeout_s=120)
            counters = await wait_counter(
                client, names, CounterName.DUPLICATES, DUPLICATES, timeout_s=60
            )
            await sink.settle(quiet_s=1.0)

            assert sink.total == UNIQUE
            assert all(len(results) == 1 for results in sink.by_id.values())
            assert counters[CounterName.DUPLICATES] == DUPLICATES
            assert counters[CounterName.PROCESSED] == UNIQUE
            status, stats = await asyncio.to_thread(get_stats, next(iter(replicas)).stats_port)
            assert status == 200
            assert stats["cache"] == {"status": "redis_connected", "type": "redis"}
            assert stats["scope"] == "cluster"
            assert stats["counters"][CounterName.DUPLICATES] == DUPLICATES
            assert len(stats["replicas"]) == 3
            assert stats["redis"]["cluster_masters"] == 3
            spread = keys_per_master(cluster, names.key_prefix)
            assert len(spread) == 3
            assert all(n > UNIQUE // 6 for n in spread.values()), spread
    finally:
        replicas.close()
        await client.aclose()


async def test_a_manual_failover_during_the_run_loses_nothing(
    cluster: LocalCluster, names: Names, amqp: object, tmp_path: Path
) -> None:
    """``CLUSTER FAILOVER`` on a replica of one shard while 4,000 messages go through 3 replicas:
    every unique ID gets a result, at most 0.5 % get two, and no delivery loops (at most 3
    deliveries per ID, no handling failure)."""
    bodies, ids = traffic(seed=4)
    client = await make_client(cluster.url, "auto", 2.0)
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            for _ in range(3):
                env = names.env(REDIS_URL=cluster.url, PREFETCH="128", LOG_LEVEL="debug")
                replicas.start(env)
            await replicas.started()
            publishing = asyncio.create_task(publish_bodies(names, bodies))
            deadline = time.monotonic() + 60
            while len(sink.by_id) < UNIQUE // 4 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            old_master = cluster.master_nodes()[0]
            promoted = cluster.replica_of(old_master)
            promoted.cli("CLUSTER", "FAILOVER")
            while promoted.info("replication").get("role") != "master":
                assert time.monotonic() < deadline, "the failover did not happen"
                await asyncio.sleep(0.05)
            results_at_failover = len(sink.by_id)
            await publishing
            await sink.wait_for_ids(ids, timeout_s=120)
            await sink.settle(quiet_s=1.5)

            assert results_at_failover < UNIQUE  # the failover happened during the run
            twice = [i for i, results in sink.by_id.items() if len(results) > 1]
            assert len(twice) <= UNIQUE * 0.005
            per_id = deliveries_per_id(replicas)
            assert max(per_id.values()) <= 3
            assert not [
                e
                for r in replicas
                for e in r.events()
                if e.get("event") == "message_handling_failed"
            ]
            counters = await cluster_counters(client, names)
            assert counters[CounterName.PROCESSED] >= UNIQUE
    finally:
        replicas.close()
        await client.aclose()


async def test_the_mode_is_detected_even_for_a_user_refused_info(cluster: LocalCluster) -> None:
    """``auto`` makes a cluster client for a cluster node, also for an ACL user refused ``INFO``
    (asked ``CLUSTER INFO`` instead), and a standalone client for a single Redis;
    ``?cluster=true`` forces a cluster client."""
    node = cluster.nodes[0]
    node.cli("ACL", "SETUSER", "no-info", "on", ">pw", "~*", "+@all", "-info")
    try:
        for url in (cluster.url, f"redis://no-info:pw@{node.address}/0"):
            client = await make_client(url, "auto", 2.0)
            assert isinstance(client, RedisCluster), url
            await client.aclose()
        forced = await make_client(f"{cluster.url}?cluster=true", "standalone", 2.0)
        assert isinstance(forced, RedisCluster)
        await forced.aclose()
        single = await make_client(REDIS_URL, "auto", 2.0)
        assert not isinstance(single, RedisCluster)
        await single.aclose()
    finally:
        node.cli("ACL", "DELUSER", "no-info")


def test_check_and_stats_work_with_a_cluster_url(cluster: LocalCluster, names: Names) -> None:
    """``check`` and ``stats --json`` with ``REDIS_URL=...?cluster=true`` answer without a
    traceback: ``check`` says redis is ok, ``stats`` lists every counter (summed shards)."""
    env = names.env(REDIS_URL=f"{cluster.url}?cluster=true")
    code, lines = run_cli(env, "check")
    assert [line.split()[:2] for line in lines if "redis" in line] == [["ok", "redis"]], lines
    assert not [line for line in lines if "Traceback" in line]
    code, lines = run_cli(env, "stats", "--json")
    assert code == 0, lines
    stats = json.loads("\n".join(lines))
    assert stats["counters"][CounterName.PROCESSED] == 0
    assert stats["redis"]["cluster_masters"] == 3


def test_cluster_mode_forced_on_a_single_redis_is_one_line(names: Names) -> None:
    """``?cluster=true`` on a Redis that is no cluster node stops ``check`` with one line naming
    REDIS_URL and exit code 2, not redis-py's traceback."""
    code, lines = run_cli(names.env(REDIS_URL=f"{REDIS_URL}?cluster=true"), "check")
    assert code == 2
    assert len(lines) == 1
    assert "REDIS_URL" in lines[0]
    assert "not a Redis Cluster node" in lines[0]
