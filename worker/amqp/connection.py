"""The broker connection: aio-pika's robust one, reconnecting with a backoff, named per replica.

Reconnection: at once, then after half as long as the broker has been away, between
``RECONNECT_MIN_S`` and ``RECONNECT_MAX_S``. Channels, queues and consumers are restored after a
reconnection; deliveries unacknowledged when the connection dropped are redelivered by the broker,
and the claim protocol keeps them from being processed twice. Until the first connection the
start-up loop (``connect_until_stopped``) retries within the same bounds, doubling the delay.

A cluster: ``RABBITMQ_URL`` may list several comma-separated addresses. The first connection tries
them in turn from a random one (so replicas given the same list spread over the nodes); once
connected, each reconnection attempt goes to the next address in the list, wrapping round, so a
replica whose node died moves to a live one at its first attempt (``fastpath.attempts``). The
commands' plain connections (``connect_once``) try the addresses in turn the same way.

A failed attempt is told apart by ``connect_failure``: a refused login (or a broker that refuses
the connection) is a configuration problem, said with its fix; a broker that cannot be reached is
a transient one. Logs, readiness (``BrokerStatus``) and the commands use the same words.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, urlsplit

import aio_pika
import structlog
from aio_pika.abc import AbstractConnection, AbstractRobustConnection
from aiormq.exceptions import (
    AMQPError,
    AuthenticationError,
    ConnectionNotAllowed,
    IncompatibleProtocolError,
    ProbableAuthenticationError,
)

from worker.amqp.fastpath import FastPath, current
from worker.amqp.fastpath.attempts import ROTATES, RotatingRobustConnection
from worker.amqp.fastpath.inline import DirectChannel
from worker.core.addresses import in_turn, split_addresses
from worker.core.redaction import redact_url, scrub
from worker.observability.stats import BROKER_UNREACHABLE

log = structlog.get_logger("worker.amqp.connection")

RECONNECT_MIN_S = 0.5
RECONNECT_MAX_S = 15.0
CONNECTION_NAME = "neiromatrius-worker"
CONNECT_TIMEOUT_S = 10.0  # for the commands: a broker that does not answer is unreachable

# What connecting raises: unreachable (``OSError``, ``TimeoutError``, aiormq's connection errors)
# or refused (the rest of ``AMQPError``: a login, a virtual host, a port that is not AMQP).
CONNECT_ERRORS: tuple[type[BaseException], ...] = (TimeoutError, OSError, AMQPError)


@dataclass(frozen=True, slots=True)
class ConnectFailure:
    """Why an attempt to connect failed: its log event, what went wrong, and what to do."""

    event: str
    problem: str
    fix: str
    config: bool  # a configuration problem: retrying cannot help until the setting is fixed

    def reason(self) -> str:
        """For readiness: the problem, and the fix when it is the configuration's."""
        return f"{self.problem}: {self.fix}" if self.config else self.problem

    def line(self, where: str, error: str) -> str:
        """One line for a command: where, what, the library's words (``error``), the fix."""
        problem = self.problem.removeprefix("the broker ")
        return f"RabbitMQ at {where} {problem} ({error}); {self.fix}"


REFUSED_LOGIN = ConnectFailure(
    "broker_refused_login",
    "the broker refused the login",
    "check the user and password in RABBITMQ_URL",
    config=True,
)
REFUSED = ConnectFailure(
    "broker_refused_connection",
    "the broker refused the connection",
    "check RABBITMQ_URL (its port, virtual host and the user's permissions)",
    config=True,
)
UNREACHABLE = ConnectFailure(
    "broker_unreachable", BROKER_UNREACHABLE, "start it or set RABBITMQ_URL", config=False
)


def connect_failure(exc: BaseException) -> ConnectFailure:
    """What a failed connection attempt means (one of ``CONNECT_ERRORS``, or anything else)."""
    if isinstance(exc, ProbableAuthenticationError | AuthenticationError):
        return REFUSED_LOGIN
    if isinstance(exc, ConnectionNotAllowed | IncompatibleProtocolError):
        return REFUSED
    if isinstance(exc, TimeoutError | OSError):  # aiormq's connection errors are OSErrors
        return UNREACHABLE
    return REFUSED


def describe_failure(url: str, exc: BaseException, secrets: tuple[str, ...] = ()) -> str:
    """One line for a command that could not connect to ``url`` (its password masked)."""
    error = scrub(str(exc), secrets) or type(exc).__name__
    return connect_failure(exc).line(redact_url(url), error)


@dataclass(slots=True)
class BrokerStatus:
    """The last failure of the start-up connection loop (``None`` once connected), for readiness."""

    failure: ConnectFailure | None = None

    def reason(self) -> str | None:
        return None if self.failure is None else self.failure.reason()


class BackoffRobustConnection(RotatingRobustConnection):
    """aio-pika's robust connection, waiting longer between attempts the longer the broker is away
    (and making each attempt to the next address of a cluster list).

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


def _most_telling(failures: list[BaseException]) -> BaseException:
    """Of the failures of one round over the addresses: a refusal (the configuration's, to fix)
    before an unreachable node, else the last one."""
    refused = [exc for exc in failures if connect_failure(exc).config]
    return refused[0] if refused else failures[-1]


async def connect(
    url: str, *, name: str = CONNECTION_NAME, fast_path: FastPath | None = None
) -> AbstractRobustConnection:
    """A robust connection named ``name`` (shown by ``rabbitmqctl list_connections``) to one of
    the addresses of ``url`` (one, or several comma-separated: tried in turn from a random one;
    the last failure is raised when none answers, a refusal first). Its channels deliver inline
    when ``fast_path`` (by default what this process installed) is active. Frames are read by
    whatever ``worker.amqp.fastpath.install`` left in aiormq."""
    fast = fast_path or current()
    kind = InlineBackoffRobustConnection if fast.active else BackoffRobustConnection
    order = in_turn(split_addresses(url))
    if len(order) > 1 and not ROTATES:
        log.warning("broker_address_rotation_unavailable", broker=redact_url(url))
    failures: list[BaseException] = []
    for first in range(len(order)):
        try:
            return await _connect_robust(kind, (*order[first:], *order[:first]), name)
        except CONNECT_ERRORS as exc:
            failures.append(exc)
    raise _most_telling(failures)


async def _connect_robust(
    kind: type[BackoffRobustConnection], order: tuple[str, ...], name: str
) -> AbstractRobustConnection:
    """Connect to ``order[0]``; reconnections go on to the next addresses of ``order``."""
    extra: dict[str, Any] = {}
    if "reconnect_interval" not in parse_qs(urlsplit(order[0]).query):
        extra["reconnect_interval"] = RECONNECT_MIN_S
    addresses = [aio_pika.connection.make_url(address, **extra) for address in order]
    connection = kind(addresses[0], client_properties={"connection_name": name}, **extra)
    connection.rotate_over(addresses)
    try:
        await connection.connect()
    except BaseException:
        with contextlib.suppress(Exception):
            await connection.close()
        raise
    _log_changes(connection)
    log.info("broker_connected", broker=_node(connection))
    return connection


def _node(connection: BackoffRobustConnection) -> str:
    """The address of the node the connection is on (or trying), without password or options."""
    return redact_url(str(connection.address.with_query(None)))


def _log_changes(connection: BackoffRobustConnection) -> None:
    """Say when the connection is lost and which node it is back on."""

    def lost(_: object, exc: BaseException | None) -> None:
        # Closing it on purpose (``close()``) hands the callbacks a CancelledError.
        if exc is not None and not isinstance(exc, asyncio.CancelledError):
            log.warning("broker_connection_lost", broker=_node(connection))

    def back(_: object) -> None:
        log.info("broker_reconnected", broker=_node(connection))

    connection.close_callbacks.add(lost)
    connection.reconnect_callbacks.add(back)


async def connect_once(
    url: str, *, name: str, timeout_s: float = CONNECT_TIMEOUT_S
) -> AbstractConnection:
    """A plain (not robust) connection to one of the addresses of ``url``, tried in turn from a
    random one, ``timeout_s`` each; the most telling failure is raised when none answers. Not a
    robust one: a robust connection cancelled while it connects goes on reconnecting and keeps a
    command from exiting."""
    failures: list[BaseException] = []
    for address in in_turn(split_addresses(url)):
        try:
            return await asyncio.wait_for(
                aio_pika.connect(address, client_properties={"connection_name": name}), timeout_s
            )
        except CONNECT_ERRORS as exc:
            failures.append(exc)
    raise _most_telling(failures)


async def connect_until_stopped(
    url: str,
    stop: asyncio.Event,
    *,
    name: str = CONNECTION_NAME,
    secrets: tuple[str, ...] = (),
    status: BrokerStatus | None = None,
) -> AbstractRobustConnection | None:
    """Connect, retrying with backoff while the broker is down or refuses; ``None`` if asked to
    stop first. Each failure is logged (a configuration one as an error, with its fix) and left
    in ``status``. ``secrets`` are masked in the logs (the URL's password is never printed)."""
    status = status or BrokerStatus()
    delay_s = RECONNECT_MIN_S
    where = redact_url(url)
    while not stop.is_set():
        try:
            connection = await connect(url, name=name)
        except Exception as exc:  # anything a connection attempt raises is retried
            failure = status.failure = connect_failure(exc)
            error = scrub(f"{type(exc).__name__}: {exc}", secrets)
            report = log.error if failure.config else log.warning
            report(failure.event, broker=where, retry_in_s=delay_s, error=error, fix=failure.fix)
        else:
            status.failure = None
            return connection
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), timeout=delay_s)
        delay_s = min(delay_s * 2, RECONNECT_MAX_S)
    return None
