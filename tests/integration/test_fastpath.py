"""The fast path against the real broker and a real replica: in effect when on, absent when off or
never installed, and the replica works and says which either way."""

from __future__ import annotations

from pathlib import Path

import aio_pika
import pytest

from tests.conftest import RABBITMQ_URL, Names
from tests.integration.support import Replicas, ResultSink, publish_bodies
from worker.amqp import fastpath
from worker.amqp.connection import connect
from worker.amqp.fastpath.frames import BufferedFrameReceiver
from worker.amqp.fastpath.inline import DirectChannel


async def open_and_close(name: str) -> tuple[int, bool]:
    """Connect as the worker does: how many buffered receivers that made, and whether its
    channels can deliver inline."""
    before = BufferedFrameReceiver.made
    connection = await connect(RABBITMQ_URL, name=name)
    try:
        channel = await connection.channel()
        return BufferedFrameReceiver.made - before, isinstance(channel, DirectChannel)
    finally:
        await connection.close()


@pytest.mark.parametrize("enabled", [True, False], ids=["on", "off"])
async def test_a_connection_opened_after_install_follows_the_switch(
    names: Names, enabled: bool
) -> None:
    """On, a new connection reads frames with the buffered receiver and its channels deliver
    inline; off, neither."""
    fastpath.install(enabled)
    try:
        assert await open_and_close(f"test-{names.tag}") == (int(enabled), enabled)
    finally:
        fastpath.uninstall()


async def test_a_process_that_never_installs_runs_on_the_stock_libraries(names: Names) -> None:
    """Without ``install`` (``publish``, ``stats``, ``check``, tests), connecting patches nothing."""
    fastpath.uninstall()
    assert await open_and_close(f"test-{names.tag}") == (0, False)
    assert not fastpath.current().active


@pytest.mark.parametrize("setting", ["on", "off"])
async def test_a_replica_works_and_logs_its_mode_either_way(
    names: Names, amqp: aio_pika.abc.AbstractRobustConnection, tmp_path: Path, setting: str
) -> None:
    """A replica with AMQP_FAST_PATH on or off classifies what it is sent; off, it logs the one
    warning saying why, on, that the fast path is on."""
    messages = [{"message_id": f"m-{i}", "text": f"Где мой заказ {i}?"} for i in range(20)]
    replicas = Replicas(tmp_path)
    try:
        async with ResultSink(names) as sink:
            replica = replicas.start(names.env(redis=False, AMQP_FAST_PATH=setting))
            await replica.started()
            await publish_bodies(names, messages)
            await sink.wait_for_ids({m["message_id"] for m in messages}, timeout_s=30)
        events = replica.events()
        off = [e for e in events if e.get("event") == "amqp_fast_path_off"]
        on = [e for e in events if e.get("event") == "amqp_fast_path_on"]
        if setting == "off":
            assert [(e["level"], e["reason"]) for e in off] == [("warning", "AMQP_FAST_PATH=off")]
            assert on == []
        else:
            assert off == []
            assert len(on) == 1
    finally:
        replicas.close()
