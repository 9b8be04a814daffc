"""Replica processes: ``python -m worker run`` children for the demo, the tests and the benchmark.

One harness, so that the three start, watch and stop a replica the same way. A child writes its
output to a log file; ``replica_env`` asks it for JSON events and a monitoring port of the
system's choosing, and the harness reads the log to learn that it started (``replica_started``,
logged once it consumes) and where its monitoring server listens (``monitoring_listening``,
logged before that). Starting is synchronous (a fork and an exec); everything that waits is async
and polls, with a deadline, so it never blocks an event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from signal import SIGTERM, Signals
from typing import IO, Any, Self

import aio_pika
import orjson

from worker.amqp.declaring import ensure_exchange
from worker.amqp.topology import Topology
from worker.core.settings import UNROUTED_SUFFIX, Settings

STARTED_EVENT = "replica_started"
LISTENING_EVENT = "monitoring_listening"
POLL_S = 0.05
# What the harness relies on: JSON events it can read, and a free port it learns from them.
HARNESS_ENV: Mapping[str, str] = {
    "LOG_FORMAT": "json",
    "STATS_HOST": "127.0.0.1",
    "STATS_PORT": "0",
}


OnResult = Callable[[aio_pika.abc.AbstractIncomingMessage], Awaitable[None]]


class ReplicaError(Exception):
    """A replica exited, or did not log what was awaited in time; the message says which."""


@dataclass(frozen=True, slots=True)
class ReplicaNames:
    """The queues, exchange and key prefix a group of replicas shares, named after one run."""

    tag: str
    input_queue: str
    results_exchange: str
    dead_letter_queue: str
    key_prefix: str

    def variables(self) -> dict[str, str]:
        """The settings that point a replica at these names."""
        return {
            "INPUT_QUEUE": self.input_queue,
            "RESULTS_EXCHANGE": self.results_exchange,
            "DEAD_LETTER_QUEUE": self.dead_letter_queue,
            "REDIS_KEY_PREFIX": self.key_prefix,
        }

    def topology(self, settings: Settings) -> Topology:
        """What replicas given these names and ``settings`` declare."""
        named = {"input_queue": self.input_queue, "dead_letter_queue": self.dead_letter_queue}
        named["results_exchange"] = self.results_exchange
        return Topology.of(settings.model_copy(update=named))


def replica_env(
    base: Mapping[str, str],
    names: ReplicaNames,
    *,
    drop: Collection[str] = (),
    **settings: str,
) -> dict[str, str]:
    """``base`` without ``drop``, with ``names``, what the harness needs, then ``settings``."""
    env = {key: value for key, value in base.items() if key not in drop}
    env.update(names.variables())
    env.update(HARNESS_ENV)
    env.update(settings)
    return env


async def listen_for_results(
    connection: aio_pika.abc.AbstractConnection, results_exchange: str, on_result: OnResult
) -> None:
    """Hand every result the replicas publish on ``results_exchange`` to ``on_result``, through
    a queue of the listener's own bound to every routing key (declared here if need be)."""
    # As the replicas declare it (with its alternate exchange), whoever comes first.
    alternate = {"alternate-exchange": results_exchange + UNROUTED_SUFFIX}
    await ensure_exchange(connection, results_exchange, "topic", alternate)
    channel = await connection.channel()
    exchange = await channel.get_exchange(results_exchange, ensure=False)
    queue = await channel.declare_queue(exclusive=True, auto_delete=True)
    await queue.bind(exchange, routing_key="#")
    await queue.consume(on_result, no_ack=True)


class ReplicaProcess:
    """One ``python -m worker run`` child; its stdout and stderr go to ``log_path``."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *, name: str = "replica") -> None:
        self.env = dict(env)
        self.log_path = log_path
        self.name = name
        self.process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._port: int | None = None

    def start(self) -> Self:
        self._log = self.log_path.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "worker", "run"],
            env=self.env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def pid(self) -> int:
        return self._started().pid

    @property
    def returncode(self) -> int | None:
        """The exit code, or ``None`` while it runs (or before it is started)."""
        return None if self.process is None else self.process.poll()

    @property
    def exited(self) -> bool:
        return self.process is None or self.process.poll() is not None

    def log_text(self) -> str:
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 15) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def events(self) -> list[dict[str, Any]]:
        """Every JSON object logged so far (other lines, such as a traceback, are passed over)."""
        found = []
        for line in self.log_text().splitlines():
            with contextlib.suppress(orjson.JSONDecodeError):
                event = orjson.loads(line)
                if isinstance(event, dict):
                    found.append(event)
        return found

    def event(self, name: str) -> dict[str, Any] | None:
        """The first event called ``name`` logged so far."""
        return next((e for e in self.events() if e.get("event") == name), None)

    async def wait_for_log(
        self, text: str, timeout_s: float = 20.0, *, poll_s: float = POLL_S
    ) -> None:
        """Until ``text`` is in the log; ``ReplicaError`` if the replica exits or time runs out."""
        await self._wait(lambda: text in self.log_text(), repr(text), timeout_s, poll_s)

    async def started(self, timeout_s: float = 20.0, *, poll_s: float = POLL_S) -> Self:
        """Until the replica consumes and its monitoring server listens."""

        def up() -> bool:
            logged = {e.get("event") for e in self.events()}
            return STARTED_EVENT in logged and LISTENING_EVENT in logged

        await self._wait(up, STARTED_EVENT, timeout_s, poll_s)
        return self

    @property
    def stats_port(self) -> int:
        """The port of its monitoring server, as it logged it (read once: it does not change)."""
        if self._port is None:
            self._port = int(self._logged(LISTENING_EVENT)["port"])
        return self._port

    @property
    def started_at(self) -> float:
        """The wall-clock time (epoch seconds) at which it logged that it consumes."""
        stamp = str(self._logged(STARTED_EVENT)["timestamp"]).replace("Z", "+00:00")
        return datetime.fromisoformat(stamp).timestamp()

    def signal(self, sig: Signals) -> None:
        self._started().send_signal(sig)

    async def wait_exit(self, timeout_s: float = 30.0) -> int:
        """Until the process exits; its exit code (``-N`` for signal N)."""
        process = self._started()
        deadline = time.monotonic() + timeout_s
        while (code := process.poll()) is None:
            if time.monotonic() > deadline:
                raise ReplicaError(f"{self.name} did not exit within {timeout_s:g}s")
            await asyncio.sleep(POLL_S)
        return code

    async def stop(self, timeout_s: float) -> int | None:
        """SIGTERM, wait for the drain, SIGKILL if it takes longer; the exit code."""
        if self.process is None:
            return None
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.send_signal(SIGTERM)
            with contextlib.suppress(ReplicaError):
                await self.wait_exit(timeout_s)
        self.kill()
        return self.process.returncode

    def kill(self) -> None:
        """SIGKILL now if it still runs, reap it, close its log (idempotent)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
            self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    async def _wait(
        self, logged: Callable[[], bool], what: str, timeout_s: float, poll_s: float
    ) -> None:
        deadline = time.monotonic() + timeout_s
        while not logged():
            # Looked at again after the exit: the last lines may have come just before it.
            if self.exited and not logged():
                raise ReplicaError(
                    f"{self.name} exited ({self.returncode}) before logging {what}:\n"
                    f"{self.log_tail(40)}"
                )
            if time.monotonic() > deadline:
                raise ReplicaError(
                    f"{self.name} did not log {what} in {timeout_s:g}s:\n{self.log_tail(40)}"
                )
            await asyncio.sleep(poll_s)

    def _started(self) -> subprocess.Popen[bytes]:
        if self.process is None:
            raise ReplicaError(f"{self.name} has not been started")
        return self.process

    def _logged(self, name: str) -> dict[str, Any]:
        event = self.event(name)
        if event is None:
            raise ReplicaError(f"{self.name} has not logged {name!r} yet")
        return event


class ReplicaGroup:
    """The replicas of one test, demo run or benchmark case, their logs in one folder."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.all: list[ReplicaProcess] = []

    def __iter__(self) -> Iterator[ReplicaProcess]:
        return iter(self.all)

    def __len__(self) -> int:
        return len(self.all)

    def start(self, env: Mapping[str, str], name: str = "") -> ReplicaProcess:
        name = name or f"replica-{len(self.all)}"
        replica = ReplicaProcess(env, self.log_dir / f"{name}.log", name=name)
        self.all.append(replica.start())
        return replica

    async def started(self, timeout_s: float = 20.0, *, poll_s: float = POLL_S) -> None:
        """Until every replica consumes; ``ReplicaError`` as soon as one exits or times out."""
        await asyncio.gather(*(r.started(timeout_s, poll_s=poll_s) for r in self.all))

    async def stop(self, timeout_s: float) -> list[int | None]:
        """Stop them all at once (SIGTERM, then SIGKILL after ``timeout_s``); their exit codes."""
        return list(await asyncio.gather(*(r.stop(timeout_s) for r in self.all)))

    def kill(self) -> None:
        """SIGKILL whichever still run (the clean-up after a failure; idempotent)."""
        for replica in self.all:
            replica.kill()
