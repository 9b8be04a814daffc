"""The fast path's switch: installed only when asked and when the libraries are the ones it knows."""

from __future__ import annotations

import types
from collections.abc import Iterator
from typing import Any

import aio_pika
import aiormq
import aiormq.connection
import pytest
from structlog.testing import capture_logs

from worker.amqp import fastpath
from worker.amqp.fastpath import NOT_INSTALLED, Libraries
from worker.amqp.fastpath.frames import STOCK_FRAME_RECEIVER, BufferedFrameReceiver
from worker.amqp.fastpath.switch import KNOWN_VERSIONS


@pytest.fixture(autouse=True)
def stock_afterwards() -> Iterator[None]:
    """Every test leaves aiormq as it found it: stock."""
    fastpath.uninstall()
    yield
    fastpath.uninstall()


def without(source: Any, name: str) -> types.SimpleNamespace:
    """A stand-in for a module or class: everything ``source`` has but ``name``."""
    attributes = {k: getattr(source, k) for k in dir(source) if not k.startswith("__")}
    attributes.pop(name)
    return types.SimpleNamespace(__name__=getattr(source, "__name__", "stand-in"), **attributes)


def warnings_of(logs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [entry for entry in logs if entry["log_level"] == "warning"]


def test_the_pinned_libraries_pass_the_check() -> None:
    """The installed aiormq, pamqp and aio-pika have every internal the fast path relies on."""
    assert fastpath.check() == []
    assert fastpath.decide().active


def test_install_swaps_the_frame_receiver_and_uninstall_gives_aiormq_its_own_back() -> None:
    """On, aiormq's connections are made with the buffered receiver; uninstalled, with its own."""
    assert fastpath.current() == NOT_INSTALLED
    with capture_logs() as logs:
        fast = fastpath.install(True)
        again = fastpath.install(True)
    assert fast.active
    assert again == fast == fastpath.current()
    assert aiormq.connection.FrameReceiver is BufferedFrameReceiver
    assert warnings_of(logs) == []
    fastpath.uninstall()
    assert aiormq.connection.FrameReceiver is STOCK_FRAME_RECEIVER
    assert fastpath.current() == NOT_INSTALLED


def test_off_by_setting_runs_stock_and_says_why_once() -> None:
    """AMQP_FAST_PATH=off puts the stock receiver back and logs one warning naming the setting."""
    fastpath.install(True)
    with capture_logs() as logs:
        fast = fastpath.install(False)
    assert not fast.active
    assert fast.reason == "AMQP_FAST_PATH=off"
    assert aiormq.connection.FrameReceiver is STOCK_FRAME_RECEIVER
    assert warnings_of(logs) == [
        {"event": "amqp_fast_path_off", "log_level": "warning", "reason": "AMQP_FAST_PATH=off"}
    ]


@pytest.mark.parametrize(
    ("library", "version"),
    [("aiormq", "7.3.0"), ("aiormq", "7.2.3"), ("pamqp", "5.0.0"), ("aio-pika", "11.0.0")],
)
def test_a_version_the_fast_path_does_not_know_leaves_stock_libraries(
    library: str, version: str
) -> None:
    """Another release of a library than the known range runs stock, and the warning names it."""
    versions = {name: ".".join(map(str, low)) for name, (low, _) in KNOWN_VERSIONS.items()}
    assert fastpath.decide(libraries=Libraries(versions=versions)).active
    versions[library] = version
    with capture_logs() as logs:
        fast = fastpath.install(True, libraries=Libraries(versions=versions))
    assert not fast.active
    assert aiormq.connection.FrameReceiver is STOCK_FRAME_RECEIVER
    [warning] = warnings_of(logs)
    assert warning["event"] == "amqp_fast_path_off"
    assert f"{library} {version} is not a version the fast path knows" in warning["reason"]


@pytest.mark.parametrize(
    ("part", "name"),
    [
        ("connection_module", "FrameReceiver"),
        ("connection_module", "ReceivedFrame"),
        ("channel_class", "_on_deliver_frame"),
        ("channel_class", "_Channel__get_content_header"),
        ("channel_class", "_read_content"),
        ("channel_class", "lock"),
        ("tools_module", "awaitable"),
        ("abc_module", "ChannelFrame"),
        ("aio_pika_module", "RobustQueue"),
    ],
)
def test_a_missing_internal_leaves_stock_libraries_and_names_it(part: str, name: str) -> None:
    """A library lacking one attribute the fast path uses runs stock; the one warning names it."""
    stand_in = without(getattr(Libraries(), part), name)
    with capture_logs() as logs:
        fast = fastpath.install(True, libraries=Libraries(**{part: stand_in}))
    assert not fast.active
    assert name.removeprefix("_Channel_") in fast.reason
    assert aiormq.connection.FrameReceiver is STOCK_FRAME_RECEIVER
    assert [w["reason"] for w in warnings_of(logs)] == [fast.reason]


def test_a_connect_that_no_longer_reads_the_module_global_leaves_stock() -> None:
    """If ``Connection.connect`` stopped looking ``FrameReceiver`` up, the swap would do nothing:
    the check sees it."""

    class Connection:
        async def connect(self) -> None:
            aiormq.connection.BytesIO()  # reads something else

    module = without(aiormq.connection, "Connection")
    module.Connection = Connection
    fast = fastpath.decide(libraries=Libraries(connection_module=module))
    assert not fast.active
    assert "Connection.connect no longer uses FrameReceiver" in fast.reason


def test_a_channel_whose_fields_changed_leaves_stock() -> None:
    """A channel that no longer sets up ``confirmations`` (the direct publisher writes it) fails
    the check."""

    class Channel(aiormq.Channel):
        def __init__(self) -> None:  # sets none of the fields the fast path reads
            pass

    fast = fastpath.decide(libraries=Libraries(channel_class=Channel))
    assert not fast.active
    assert "confirmations" in fast.reason
    assert "write_queue" in fast.reason


def test_the_switch_leaves_aio_pika_and_aiormq_classes_alone() -> None:
    """Installing patches only the frame receiver: channel and queue classes stay aiormq's and
    aio-pika's own (inline deliveries are chosen per connection, not patched in)."""
    before = (aiormq.Channel._on_deliver_frame, aio_pika.RobustQueue.consume)
    fastpath.install(True)
    assert (aiormq.Channel._on_deliver_frame, aio_pika.RobustQueue.consume) == before
