"""Fixtures shared by the unit tests."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest

from worker.redisio.link import RedisLink


@pytest.fixture
async def links() -> AsyncIterator[list[RedisLink]]:
    """Three replicas' links to one (fake) Redis server."""
    server = fakeredis.FakeServer()
    made = [
        RedisLink(fakeredis.FakeAsyncRedis(server=server), "redis://fake:6379/0") for _ in range(3)
    ]
    for link in made:
        assert await link.connect()
    yield made
    for link in made:
        await link.aclose()
