"""The broker connection: aio-pika's robust one, reconnecting with a backoff, named per replica.

Reconnection: at once, then after half as long as the broker has been away, between
``RECONNECT_MIN_S`` and ``RECONNECT_MAX_S``. Channels, queues and consumers are restored after a
reconnection; deliveries unacknowledged when the connection dropped are redelivered by the broker,
and the claim protocol keeps them from being processed twice.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import structlog
from aio_pika.abc import AbstractRobustConnection

from worker.amqp.fastpath import FastPath, current
from worker.amqp.fastpath.inline import DirectChannel
from worker.core.redaction import redact_url, scrub

log = structlog.get_logger("worker.amqp.connection")

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 15.0
CONNECTION_NAME = "neiromatrius-worker"


class BackoffRobustConnection(aio_pika.RobustConnection):
    """aio-pika's robust connection, waiting longer between attempts the longer the broker is away.

    aio-pika sleeps ``reconnect_interval`` after each failed attempt; here that value is computed
    when read: the configured minimum while connected, then half the outage so far (at most
    ``RECONNECT_MAX_S``), so attempts come at roughly 1.5 times the previous delay.
    """

    _min_interval_s: float = RECONNECT_MIN_S
    _lost_at: float | None = None

    @property
    def reconnect_interval(self) -> float:
        if self.connected.is_set():
            self._lost_at = None
            return self._min_interval_s
        now = time.monotonic()
        if self._lost_at is None:
            self._lost_at = now
        return min(RECONNECT_MAX_S, max(self._min_interval_s, (now - self._lost_at) / 2))

    @reconnect_interval.setter
    def reconnect_interval(self, value: float) -> None:
        self._min_interval_s = float(value)


class InlineBackoffRobustConnection(BackoffRobustConnection):
    """The same, with channels whose queues can hand deliveries over inline (the fast path)."""

    CHANNEL_CLASS = DirectChannel


async def connect(
    url: str, *, name: str = CONNECTION_NAME, fast_path: FastPath | None = None
) -> AbstractRobustConnection:
    """A robust connection named ``name`` (shown by ``rabbitmqctl list_connections``); its
    channels deliver inline when ``fast_path`` (by default what this process installed) is
    active. Frames are read by whatever ``worker.amqp.fastpath.install`` left in aiormq."""
    fast = fast_path or current()
    extra: dict[str, Any] = {}
    if "reconnect_interval" not in parse_qs(urlsplit(url).query):
        extra["reconnect_interval"] = RECONNECT_MIN_S
    connection: AbstractRobustConnection = await aio_pika.connect_robust(
        url,
        client_properties={"connection_name": name},
        connection_class=InlineBackoffRobustConnection if fast.active else BackoffRobustConnection,
        **extra,
    )
    return connection


async def connect_until_stopped(
    url: str,
    stop: asyncio.Event,
    *,
    name: str = CONNECTION_NAME,
    secrets: tuple[str, ...] = (),
) -> AbstractRobustConnection | None:
    """Connect, retrying with backoff while the broker is down; ``None`` if asked to stop first.
    ``secrets`` are masked in the warnings (the URL's password is never printed)."""
    delay_s = RECONNECT_MIN_S
    where = redact_url(url)
    while not stop.is_set():
        try:
            return await connect(url, name=name)
        except (TimeoutError, OSError, ConnectionError) as exc:
            event = "broker_unreachable"
            error = scrub(f"{type(exc).__name__}: {exc}", secrets)
        except Exception as exc:  # aiormq raises its own types for refused logins and the like
            event = "broker_connect_failed"
            error = scrub(f"{type(exc).__name__}: {exc}", secrets)
        log.warning(event, broker=where, retry_in_s=delay_s, error=error)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay_s)
        delay_s = min(delay_s * 2, RECONNECT_MAX_S)
    return None
