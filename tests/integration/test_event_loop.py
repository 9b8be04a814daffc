"""The event loop a replica runs on: uvloop by default, asyncio with ``EVENT_LOOP=asyncio``."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis.asyncio as aioredis

from tests.conftest import Names
from tests.integration.support import Replicas, ResultSink, body, publish_bodies

pytestmark = pytest.mark.integration


@pytest.mark.parametrize(
    ("setting", "expected"),
    [({}, "uvloop"), ({"EVENT_LOOP": "asyncio"}, "asyncio"), ({"EVENT_LOOP": "uvloop"}, "uvloop")],
    ids=["default", "asyncio", "uvloop"],
)
async def test_replica_logs_the_loop_it_runs_on_and_processes_on_it(
    names: Names,
    redis_client: aioredis.Redis,
    amqp: object,
    tmp_path: Path,
    setting: dict[str, str],
    expected: str,
) -> None:
    """A replica logs, at start, the event loop EVENT_LOOP chose (uvloop unless told asyncio),
    once and without a fallback warning, and processes a message on it."""
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(names.env(**setting))
            await replica.started()
            await publish_bodies(names, [body("loop-1", "Где мой заказ?")])
            await sink.wait_for_ids({"loop-1"}, timeout_s=20)
        announced = [e for e in replica.events() if e.get("event") == "event_loop"]
        assert len(announced) == 1, announced
        assert announced[0]["event_loop"] == expected
        assert announced[0]["level"] == "info"
        assert "reason" not in announced[0]
    finally:
        replicas.close()
