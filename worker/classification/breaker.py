"""The circuit breaker of a classifier: when the provider is down, or refuses the configuration,
the whole cluster stops asking it, and one replica at a time probes until it answers again.

States (one breaker per classifier identity, in one Redis hash shared by every replica,
``RedisKeys.breaker``; inside the process without Redis or while it is unreachable):

- **closed**: calls go out. Each provider failure (timeout, connection error, 5xx, a 429 past its
  ``Retry-After``) adds to a count of consecutive failures that any answer from the server resets;
  ``LLM_BREAKER_FAILURES`` of them open the breaker. A configuration failure (401/403, 404, a 400
  on ``response_format``) opens it at once.
- **open**: no call goes out (``ClassifierPaused``: the processing layer holds the message without
  spending an attempt, see ``worker.processing.failures``); cache hits still flow. Every replica
  sees it within ``REFRESH_S`` (its readiness answers 503 with the reason). When the next probe is
  due, the first replica to ask takes it (a lease: one probe at a time for the cluster) and sends
  one real request with a text that is waiting. A probe that fails pushes the next one back:
  ``LLM_BREAKER_PROBE_MIN_S`` doubled after each failure up to ``LLM_BREAKER_PROBE_MAX_S`` for an
  outage, ``LLM_BREAKER_CONFIG_PROBE_S`` every time for a configuration error. Any answer from
  the server (even one that fails validation: the server is up) closes it for everyone.

Each step is one script call (``scripts/breaker.lua``) on the Redis clock; ``MemoryBreakerState``
is the same state machine in Python.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import structlog

from worker.observability.counters import Counters
from worker.observability.metrics import CounterName
from worker.redisio.link import REDIS_ERRORS, RedisLink
from worker.redisio.scripts import LuaScript

log = structlog.get_logger("worker.classification.breaker")

BREAKER = LuaScript("worker.classification", "breaker.lua")
REFRESH_S = 1.0  # how often each replica reads the shared state (readiness follows it)
PROVIDER, CONFIGURATION = "provider", "configuration"


@dataclass(frozen=True, slots=True)
class BreakerConfig:
    """The ``LLM_BREAKER_*`` settings."""

    failures: int = 5
    probe_min_s: float = 1.0
    probe_max_s: float = 3.0
    config_probe_s: float = 30.0
    probe_lease_s: float = 35.0  # longer than one call may take (LLM_TIMEOUT_S)


class Failure(NamedTuple):
    """A failure the breaker hears of: ``kind`` is ``provider`` or ``configuration``."""

    kind: str
    reason: str


class BreakerView(NamedTuple):
    """The breaker as a replica last saw it (``seen_at``: ``time.monotonic()`` then)."""

    open: bool = False
    kind: str = ""
    reason: str = ""
    failures: int = 0
    opened_ms: int = 0  # epoch ms (the Redis clock)
    next_probe_in_s: float = 0.0
    changed: bool = False
    opens: int = 0
    probes: int = 0
    seen_at: float = 0.0


def view_of(answer: list[Any], seen_at: float) -> BreakerView:
    """The ``BreakerView`` of one answer of ``breaker.lua`` (or of ``MemoryBreakerState``)."""

    def text(value: Any) -> str:
        return value.decode() if isinstance(value, bytes) else str(value)

    return BreakerView(
        open=int(answer[0]) == 1,
        kind=text(answer[1]),
        reason=text(answer[2]),
        failures=int(answer[3]),
        opened_ms=int(answer[4]),
        next_probe_in_s=int(answer[5]) / 1000,
        changed=int(answer[6]) == 1,
        opens=int(answer[7]),
        probes=int(answer[8]),
        seen_at=seen_at,
    )


class MemoryBreakerState:
    """``breaker.lua``'s state machine inside the process (epoch milliseconds)."""

    def __init__(self) -> None:
        self.open, self.kind, self.reason = False, "", ""
        self.failures = self.opened = self.next_probe = self.delay = self.probe_until = 0
        self.opens = self.probes = 0

    def step(self, step: str, args: list[str], now: int | None = None) -> list[Any]:
        now = int(time.time() * 1000) if now is None else now
        changed = 0
        if step == "failure":
            changed = self._failure(args, now)
        elif step == "success" and (self.open or self.failures > 0):
            changed = 1 if self.open else 0
            self.open, self.failures, self.kind, self.reason = False, 0, "", ""
        elif step == "probe" and self.open and now >= max(self.next_probe, self.probe_until):
            self.probe_until, self.probes, changed = now + int(args[0]), self.probes + 1, 1
        elif step == "probe_failed" and self.open:
            self.kind, self.reason = args[0], args[1]
            if self.kind == CONFIGURATION:
                self.delay = int(args[3])
            else:
                self.delay = min(int(args[2]), max(self.delay, 1) * 2)
            self.next_probe, self.probe_until = now + self.delay, 0
        return [
            int(self.open), self.kind, self.reason, self.failures, self.opened,
            max(0, self.next_probe - now), changed, self.opens, self.probes,
        ]  # fmt: skip

    def _failure(self, args: list[str], now: int) -> int:
        kind, reason, threshold, first_ms, config_ms = args[0], args[1], *map(int, args[2:5])
        if self.open:
            if kind == CONFIGURATION and self.kind != CONFIGURATION:
                self.kind, self.reason, self.delay = kind, reason, config_ms
                self.next_probe = now + config_ms
            return 0
        self.failures += 1
        if kind != CONFIGURATION and self.failures < threshold:
            return 0
        self.open, self.kind, self.reason, self.opened = True, kind, reason, now
        self.delay = config_ms if kind == CONFIGURATION else first_ms
        self.next_probe, self.probe_until, self.opens = now + self.delay, 0, self.opens + 1
        return 1


Prober = Callable[[], Awaitable[Failure | None]]  # one request: ``None`` when the server answered


class CircuitBreaker:
    """One classifier's breaker; see the module docstring. ``start()`` runs its watch (the
    shared state read every ``REFRESH_S``, probes sent when due); ``aclose()`` stops it."""

    def __init__(
        self,
        config: BreakerConfig,
        *,
        key: str,
        link: RedisLink | None = None,
        counters: Counters | None = None,
        refresh_s: float = REFRESH_S,
    ) -> None:
        self.config = config
        self.key = key
        self._link = link
        self._counters = counters
        self._refresh_s = refresh_s
        self._memory = MemoryBreakerState()
        self._script = BREAKER.register(link.client) if link is not None else None
        self.view = BreakerView()
        self._prober: Prober | None = None
        self._probe_ready: Callable[[], bool] = lambda: False
        self._watch: asyncio.Task[None] | None = None

    def is_open(self) -> bool:
        """Whether calls are refused now, as this replica last saw the breaker."""
        return self.view.open

    def problem(self) -> str | None:
        """Why the classifier is paused (readiness), or ``None`` while the breaker is closed."""
        if not self.view.open:
            return None
        return f"LLM circuit breaker open ({self.view.kind}): {self.view.reason}"

    def probe_with(self, prober: Prober, ready: Callable[[], bool]) -> None:
        """How to probe: ``prober`` sends one request; ``ready`` says it has a text to send."""
        self._prober, self._probe_ready = prober, ready

    async def failed(self, failure: Failure) -> bool:
        """Count a failure of the server; whether the breaker is open now."""
        c = self.config
        args = [failure.kind, failure.reason, str(c.failures), _ms(c.probe_min_s)]
        view = await self._step("failure", [*args, _ms(c.config_probe_s)])
        if view.changed and self._counters is not None:
            self._counters.record(CounterName.BREAKER_OPENS)
        return view.open

    async def succeeded(self) -> None:
        """The server answered: close the breaker (only a round trip when it is not closed and
        clean already, as this replica last saw it)."""
        if self.view.open or self.view.failures:
            await self._step("success", [])

    async def probe_now(self) -> bool:
        """Take the cluster's probe if one is due and nobody holds it; ``True`` if taken."""
        if not self.view.open or self._prober is None or not self._probe_ready():
            return False
        view = await self._step("probe", [_ms(self.config.probe_lease_s)])
        if not view.changed:
            return False
        if self._counters is not None:
            self._counters.record(CounterName.BREAKER_PROBES)
        failure = await self._prober()
        log.info("llm_breaker_probe", succeeded=failure is None)
        if failure is None:
            await self._step("success", [])
        else:
            c = self.config
            args = [failure.kind, failure.reason, _ms(c.probe_max_s), _ms(c.config_probe_s)]
            await self._step("probe_failed", args)
        return True

    async def refresh(self) -> BreakerView:
        return await self._step("read", [])

    async def _step(self, step: str, args: list[str]) -> BreakerView:
        now = time.monotonic()
        answer = None
        if self._script is not None and self._link is not None and self._link.available:
            try:
                answer = await self._script(keys=[self.key], args=[step, *args])
            except REDIS_ERRORS as exc:
                self._link.report_aside(exc)
        if answer is None:  # no Redis, or it is away: this replica's own breaker meanwhile
            answer = self._memory.step(step, args)
        view = view_of(answer, now)
        _log_change(self.view, view)
        self.view = view
        return view

    def start(self) -> None:
        if self._watch is None:
            self._watch = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            try:
                view = await self.refresh()
                if view.open and view.next_probe_in_s <= 0:
                    await self.probe_now()
            except Exception:  # the watch must go on: readiness and probes depend on it
                log.exception("llm_breaker_watch_failed")
            wait_s = self._refresh_s
            if self.view.open and self._probe_ready():
                wait_s = min(wait_s, max(0.05, self.view.next_probe_in_s))
            await asyncio.sleep(wait_s)

    def state(self) -> dict[str, Any]:
        """The breaker for the stats JSON, as this replica last saw it."""
        view = self.view
        return {
            "classifier": self.key.rsplit("{", 1)[-1].rstrip("}"),
            "state": "open" if view.open else "closed",
            "kind": view.kind or None,
            "reason": view.reason or None,
            "opened_at": view.opened_ms / 1000 if view.open else None,
            "next_probe_in_s": round(view.next_probe_in_s, 3) if view.open else None,
            "opens": view.opens,
            "probes": view.probes,
        }

    async def aclose(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
            self._watch = None


def _ms(seconds: float) -> str:
    return str(max(1, round(seconds * 1000)))


def _log_change(before: BreakerView, after: BreakerView) -> None:
    """One line per replica when it sees the breaker open (an error when the configuration is
    to blame: it names the setting to fix), turn to a configuration error, or close."""
    if after.open and (not before.open or before.kind != after.kind):
        emit = log.error if after.kind == CONFIGURATION else log.warning
        emit("llm_breaker_open", kind=after.kind, reason=after.reason)
    elif before.open and not after.open:
        log.info("llm_breaker_closed")
