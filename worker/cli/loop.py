"""The event loop a long-running command (``run``, ``demo``) runs on: uvloop, or asyncio.

``EVENT_LOOP=uvloop`` (the default) runs the command on uvloop where it is installed (a dependency
on Linux); where it cannot be imported the command runs on asyncio and says why, once.
``EVENT_LOOP=asyncio`` opts out. The loop actually running is logged at start (an ``event_loop``
line) so that an operator, and the tests, can see which one a replica got. uvloop is imported only
here, through an importer the tests can replace.
"""

from __future__ import annotations

import asyncio
import importlib
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal, TypeVar

import structlog

T = TypeVar("T")
LoopName = Literal["uvloop", "asyncio"]
Importer = Callable[[str], ModuleType]
LoopFactory = Callable[[], asyncio.AbstractEventLoop]


@dataclass(frozen=True, slots=True)
class LoopChoice:
    """The loop to run on: its name, how to make one, and why it is not the one asked for."""

    name: LoopName
    factory: LoopFactory
    fallback_reason: str = ""


def choose_loop(wanted: LoopName, import_module: Importer = importlib.import_module) -> LoopChoice:
    """uvloop's factory when it is wanted and importable, else asyncio's (with the reason)."""
    if wanted == "asyncio":
        return LoopChoice("asyncio", asyncio.new_event_loop)
    try:
        uvloop = import_module("uvloop")
        factory: LoopFactory = uvloop.new_event_loop
    except (ImportError, AttributeError) as exc:
        # ImportError covers a missing module and a broken build (an undefined symbol).
        return LoopChoice("asyncio", asyncio.new_event_loop, f"{type(exc).__name__}: {exc}")
    return LoopChoice("uvloop", factory)


def running_loop_name() -> str:
    """The package whose loop runs this coroutine: ``uvloop`` or ``asyncio``."""
    return type(asyncio.get_running_loop()).__module__.split(".", 1)[0]


def run_on_loop(
    main: Coroutine[Any, Any, T],
    wanted: LoopName,
    *,
    quiet: bool = False,
    import_module: Importer = importlib.import_module,
) -> T:
    """Run ``main`` to completion on the chosen loop (as ``asyncio.run`` does) and return its
    result; logs the loop it runs on first (at debug when ``quiet``: the demo's output is for
    people, and its replicas log their own; a fallback is a warning either way)."""
    choice = choose_loop(wanted, import_module)
    with asyncio.Runner(loop_factory=choice.factory) as runner:
        return runner.run(_announced(main, wanted, choice, quiet=quiet))


async def _announced(
    main: Coroutine[Any, Any, T], wanted: LoopName, choice: LoopChoice, *, quiet: bool
) -> T:
    log = structlog.get_logger("worker")
    if choice.fallback_reason:
        log.warning(
            "event_loop",
            event_loop=running_loop_name(),
            requested=wanted,
            reason=choice.fallback_reason,
            fix="pip install uvloop, or set EVENT_LOOP=asyncio to silence this",
        )
    elif quiet:
        log.debug("event_loop", event_loop=running_loop_name())
    else:
        log.info("event_loop", event_loop=running_loop_name())
    return await main
