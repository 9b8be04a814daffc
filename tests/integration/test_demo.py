"""``neiromatrius-worker demo`` end to end: real replicas, real broker and Redis, its own names."""

from __future__ import annotations

import asyncio
import os
import re
import subprocess
import sys
from pathlib import Path

import aio_pika
import aiormq
import orjson
import pytest
import redis.asyncio as aioredis

from tests.conftest import RABBITMQ_URL, REDIS_URL
from worker.cli.samples import generate_sample
from worker.core.redaction import redact_url

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]
ARGS = ("--messages", "600", "--duplicates", "0.25", "--repeat-texts", "0.5", "--seed", "5")


def run_demo(cwd: Path, *args: str, redis_url: str = "") -> subprocess.CompletedProcess[str]:
    """The demo as a user runs it, from a directory that is not the checkout."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REDIS_", "PYTEST_"))}
    # This checkout's code, whatever an installed copy of the package points at.
    env.update(RABBITMQ_URL=RABBITMQ_URL, LOG_FORMAT="json", PYTHONPATH=str(ROOT))
    if redis_url:
        env["REDIS_URL"] = redis_url
    return subprocess.run(
        [sys.executable, "-m", "worker", "demo", *ARGS, "--timeout", "60", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def row(table: str, name: str) -> tuple[int, int | None, str]:
    """Count, expected and mark of one row of the final table."""
    match = re.search(rf"^  {name} +([\d,]+)(?: +([\d,]+))?(?: +([✓≈≠]))?", table, re.MULTILINE)
    assert match, f"no row {name!r} in:\n{table}"
    count, expected, mark = match.groups()
    return (
        int(count.replace(",", "")),
        int(expected.replace(",", "")) if expected else None,
        mark or "",
    )


async def assert_cleaned_up(tag: str) -> None:
    connection = await aio_pika.connect(RABBITMQ_URL)
    try:
        for queue in (f"neiromatrius.demo.{tag}.messages", f"neiromatrius.demo.{tag}.dead"):
            channel = await connection.channel()
            with pytest.raises(aiormq.exceptions.ChannelNotFoundEntity):
                await channel.declare_queue(queue, passive=True)
    finally:
        await connection.close()
    client = aioredis.Redis.from_url(REDIS_URL)
    try:
        assert [
            k async for k in client.scan_iter(match=f"neiromatrius:demo:{tag}:*", count=1000)
        ] == []
    finally:
        await client.aclose()


async def test_demo_with_redis_shows_exact_dedup_and_cache(tmp_path: Path) -> None:
    """With Redis, the demo exits 0 after showing progress, and its table shows every unique ID
    processed once, exactly the published duplicates skipped, exactly the repeated texts served
    from the cache (one classifier call per distinct text), and it removes its queues and keys."""
    plan = generate_sample(600, 0.25, 0.5, seed=5)
    done = await asyncio.to_thread(run_demo, tmp_path, "--replicas", "3", redis_url=REDIS_URL)
    assert done.returncode == 0, done.stdout + done.stderr
    table = done.stdout
    assert f"3 replicas, Redis {redact_url(REDIS_URL)}" in table
    assert f"published {len(plan.messages)}/{len(plan.messages)}" in done.stderr

    assert row(table, "published")[0] == len(plan.messages), table
    assert row(table, "processed") == (plan.unique_ids, plan.unique_ids, "✓"), table
    skipped = (plan.duplicate_count, plan.duplicate_count, "✓")
    assert row(table, "duplicates skipped") == skipped, table
    # Each distinct text is classified once for the whole cluster; every other message is a hit.
    expected_hits = plan.unique_ids - plan.distinct_texts
    assert row(table, "cache hits") == (expected_hits, expected_hits, "✓"), table
    assert row(table, "classifier calls")[0] == plan.distinct_texts, table
    assert row(table, "results published") == (plan.unique_ids, plan.unique_ids, "✓"), table
    assert "cluster counters in Redis equal the replicas' sum: yes" in table, table

    tag = re.search(r"\(run ([0-9a-f]+)\)", done.stderr)
    assert tag, done.stderr
    await assert_cleaned_up(tag.group(1))


async def test_demo_without_redis_reports_per_replica_dedup(tmp_path: Path) -> None:
    """Without Redis the demo says duplicates across replicas are possible, exits 0, and its JSON
    summary accounts for every published message as processed or skipped."""
    plan = generate_sample(600, 0.25, 0.5, seed=5)
    done = await asyncio.to_thread(run_demo, tmp_path, "--replicas", "2", "--json")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "duplicates across replicas are possible" in done.stderr
    summary = orjson.loads(done.stdout)
    assert summary["mode"] == "memory"
    assert summary["published"] == len(plan.messages)
    assert summary["processed"] + summary["duplicates_skipped"] == len(plan.messages)
    assert summary["processed"] >= plan.unique_ids
    assert summary["ids_with_results"] == plan.unique_ids
    assert summary["results"] == summary["processed"]
    assert summary["cache_hits"] + summary["cache_misses"] == summary["processed"]
    assert summary["replica_exit_codes"] == [0, 0]
    assert summary["cluster_counters"] is None
    await assert_cleaned_up(summary["names"]["tag"])
