"""The switch: whether this process runs on the AMQP fast path, decided once, at start-up.

``check`` compares the installed aiormq, pamqp and aio-pika with the versions the fast path was
written against, and looks at every attribute it replaces or reads (see the README section "The
AMQP fast path"). ``install`` runs the check and, when it passes and the setting allows, swaps
aiormq's frame receiver (the one process-wide patch); otherwise it makes sure the stock receiver is
in place and logs one warning saying why. Only the composition root calls it: a process that
never does (``publish``, ``stats``, ``check``, tests) runs on the stock libraries.

The inline deliveries and the direct publishing are not patches: the broker picks them per
connection and per publisher from the ``FastPath`` it is given (``current()`` by default).
"""

from __future__ import annotations

import importlib.metadata
import inspect
import re
import sys
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, fields, is_dataclass
from typing import Any, Final

import aio_pika
import aiormq
import aiormq.abc
import aiormq.connection
import aiormq.tools
import structlog

log = structlog.get_logger("worker.amqp.fastpath")

# [lowest, first unknown): the releases whose internals the fast path was read against and tested
# with (pyproject pins the same ranges).
KNOWN_VERSIONS: Final[Mapping[str, tuple[tuple[int, ...], tuple[int, ...]]]] = {
    "aiormq": ((7, 2, 4), (7, 3)),
    "pamqp": ((4, 0), (5,)),
    "aio-pika": ((9, 4), (11,)),
}
# Channel fields the inline deliveries and the direct publishing read or write.
CHANNEL_FIELDS: Final = (
    "consumers",
    "confirmations",
    "delivery_tag",
    "write_queue",
    "number",
    "max_content_size",
)
OFF_BY_SETTING: Final = "AMQP_FAST_PATH=off"


@dataclass(frozen=True, slots=True)
class FastPath:
    """What this process runs on: ``active`` (the fast path) or not, and why."""

    active: bool
    reason: str

    @property
    def mode(self) -> str:
        return "fast" if self.active else "stock"


NOT_INSTALLED: Final = FastPath(False, "not installed: only a replica's start-up installs it")


@dataclass(frozen=True, slots=True)
class Libraries:
    """What ``check`` inspects: the installed libraries by default; a test passes others."""

    versions: Mapping[str, str] = field(default_factory=lambda: _installed_versions())
    connection_module: Any = aiormq.connection
    channel_class: Any = aiormq.Channel
    tools_module: Any = aiormq.tools
    abc_module: Any = aiormq.abc
    aio_pika_module: Any = aio_pika


def _installed_versions() -> dict[str, str]:
    found: dict[str, str] = {}
    for name in KNOWN_VERSIONS:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = "not installed"
    return found


def _release(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in re.findall(r"\d+", version)[:3])


def _version_problems(versions: Mapping[str, str]) -> Iterator[str]:
    for name, (lowest, unknown) in KNOWN_VERSIONS.items():
        version = versions.get(name, "not installed")
        release = _release(version)
        if not release or not lowest <= release < unknown:
            low, high = ".".join(map(str, lowest)), ".".join(map(str, unknown))
            yield f"{name} {version} is not a version the fast path knows (>={low},<{high})"


def _coroutine(owner: Any, name: str, params: list[str], label: str) -> Iterator[str]:
    function = getattr(owner, name, None)
    if not inspect.iscoroutinefunction(function):
        yield f"{label}.{name} is missing or not a coroutine function"
        return
    got = list(inspect.signature(function).parameters)
    if got != params:
        yield f"{label}.{name} takes {got}, expected {params}"


def _reads(owner: Any, name: str, names: tuple[str, ...], label: str) -> Iterator[str]:
    """``owner.name``'s code refers to each of ``names`` (an attribute or a global it reads)."""
    function = getattr(owner, name, None)
    code = getattr(inspect.unwrap(function), "__code__", None) if function else None
    if code is None:
        yield f"{label}.{name} is missing"
        return
    missing = [n for n in names if n not in code.co_names]
    if missing:
        yield f"{label}.{name} no longer uses {', '.join(missing)}"


def _frame_receiver_problems(module: Any) -> Iterator[str]:
    receiver = getattr(module, "FrameReceiver", None)
    receiver = getattr(receiver, "stock", receiver)  # installed already: check aiormq's own
    label = "aiormq.connection.FrameReceiver"
    if not inspect.isclass(receiver):
        yield f"{label} is missing or not a class"
        return
    if not hasattr(module, "ReceivedFrame"):
        yield "aiormq.connection.ReceivedFrame is missing"
    yield from _coroutine(receiver, "get_frame", ["self"], label)
    if list(inspect.signature(receiver.__init__).parameters) != ["self", "reader"]:
        yield f"{label}() no longer takes just the reader"
    yield from _reads(receiver, "__init__", ("reader", "started", "lock"), label)
    # The swap works only while connect() looks the class up in the module when it runs.
    connection = getattr(module, "Connection", None)
    yield from _reads(connection, "connect", ("FrameReceiver",), "aiormq.connection.Connection")


def _channel_problems(channel: Any) -> Iterator[str]:
    label = "aiormq.Channel"
    yield from _coroutine(channel, "_on_deliver_frame", ["self", "frame"], label)
    yield from _coroutine(channel, "_Channel__get_content_header", ["self"], label)
    yield from _coroutine(channel, "_read_content", ["self", "frame", "header"], label)
    # An instance attribute replaces _on_deliver_frame only while the reader looks it up on self.
    yield from _reads(channel, "_reader", ("_on_deliver_frame",), label)
    yield from _reads(channel, "__init__", CHANNEL_FIELDS, label)
    yield from _reads(channel, "_confirm_delivery", ("confirmations",), label)
    if not isinstance(inspect.getattr_static(channel, "lock", None), property):
        yield f"{label}.lock is missing or not a property"
    if not callable(getattr(channel, "create_future", None)):
        yield f"{label}.create_future is missing"


def _wrapping_problems(tools: Any, abc: Any) -> Iterator[str]:
    def callback(_: object) -> None: ...

    awaitable: Callable[[Any], Any] | None = getattr(tools, "awaitable", None)
    if awaitable is None or getattr(awaitable(callback), "__wrapped__", None) is not callback:
        yield "aiormq.tools.awaitable no longer keeps the callback as __wrapped__"
    frame = getattr(abc, "ChannelFrame", None)
    names = {f.name for f in fields(frame)} if is_dataclass(frame) else set()
    if not {"payload", "should_close"} <= names:
        yield "aiormq.abc.ChannelFrame(payload, should_close) is missing"
    if not hasattr(abc, "DeliveredMessage"):
        yield "aiormq.abc.DeliveredMessage is missing"


def _aio_pika_problems(module: Any) -> Iterator[str]:
    queue = getattr(module, "RobustQueue", None)
    label = "aio_pika.RobustQueue"
    if queue is None:
        yield f"{label} is missing"
        return
    # A raw consumer is restored after a reconnection through RobustQueue's own table.
    yield from _reads(queue, "__init__", ("_consumers",), label)
    yield from _reads(queue, "restore", ("_consumers", "consume"), label)
    if not hasattr(getattr(module, "RobustChannel", None), "QUEUE_CLASS"):
        yield "aio_pika.RobustChannel.QUEUE_CLASS is missing"
    if not hasattr(getattr(module, "RobustConnection", None), "CHANNEL_CLASS"):
        yield "aio_pika.RobustConnection.CHANNEL_CLASS is missing"


def check(libraries: Libraries | None = None) -> list[str]:
    """What keeps the fast path from running on ``libraries`` (nothing: it can run)."""
    lib = libraries or Libraries()
    problems = list(_version_problems(lib.versions))
    problems += _frame_receiver_problems(lib.connection_module)
    problems += _channel_problems(lib.channel_class)
    problems += _wrapping_problems(lib.tools_module, lib.abc_module)
    problems += _aio_pika_problems(lib.aio_pika_module)
    return problems


def decide(enabled: bool = True, libraries: Libraries | None = None) -> FastPath:
    """Whether the fast path would run, and why; changes nothing and logs nothing."""
    if not enabled:
        return FastPath(False, OFF_BY_SETTING)
    problems = check(libraries)
    if problems:
        return FastPath(False, "; ".join(problems))
    versions = (libraries or Libraries()).versions
    return FastPath(True, f"aiormq {versions.get('aiormq')} is a version the fast path knows")


_current: FastPath = NOT_INSTALLED


def current() -> FastPath:
    """What the last ``install`` decided (``NOT_INSTALLED`` in a process that never called it)."""
    return _current


def install(enabled: bool = True, *, libraries: Libraries | None = None) -> FastPath:
    """Run the check; when it passes and ``enabled``, have aiormq read frames with the fast reader
    on connections opened from now on, else make sure the stock reader is in place and log one
    warning saying why. Idempotent; ``uninstall`` reverses it. ``libraries`` only changes what is
    checked: the patch always goes to the aiormq this process imported."""
    global _current
    fast = decide(enabled, libraries)
    if fast.active:
        try:
            from worker.amqp.fastpath import frames  # only now: it subclasses an aiormq internal

            frames.install()
        except Exception as exc:  # an internal the check did not foresee: run stock, say why
            fast = FastPath(False, f"the frame reader failed to install: {type(exc).__name__}")
    if fast.active:
        log.info("amqp_fast_path_on", reason=fast.reason)
    else:
        _restore_stock()
        log.warning("amqp_fast_path_off", reason=fast.reason)
    _current = fast
    return fast


def uninstall() -> None:
    """Put aiormq's own frame receiver back and forget the decision (for tests and tools)."""
    global _current
    _restore_stock()
    _current = NOT_INSTALLED


def _restore_stock() -> None:
    frames = sys.modules.get("worker.amqp.fastpath.frames")
    if frames is not None:  # never imported: nothing was swapped
        frames.uninstall()
