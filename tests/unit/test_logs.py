"""The standard library's records (aiormq, aio-pika) rendered by structlog, in JSON and on a console."""

from __future__ import annotations

import subprocess
import sys

import orjson

# Logs what the libraries log when the broker goes away, after the worker's own configuration.
SCRIPT = """
import logging, sys
from worker.observability.logs import configure_logging
configure_logging(sys.argv[1], sys.argv[2])
try:
    raise ConnectionResetError(104, "Connection reset by peer")
except ConnectionResetError as exc:
    logging.getLogger("aiormq.connection").warning(
        "Cancelling cause reader exited abnormally", exc_info=exc
    )
logging.getLogger("aiormq.connection").error(
    "error when creating transport: %r", ConnectionRefusedError(111, "Connection refused")
)
logging.getLogger("aio_pika.tools").error(
    "Callback %r error: %s: %s",
    "<OneShotCallback: cb=<bound method RobustChannel._on_close of <Channel>>>",
    "ChannelInvalidStateError",
    "closed",
)
logging.getLogger("aio_pika.tools").error(
    "Callback %r error: %s: %s", "<OneShotCallback: cb=<function mine>>", "ValueError", "bug"
)
logging.getLogger("aio_pika.robust_connection").warning(
    'Connection attempt to "%s" failed: %s. Reconnecting after %r seconds.', "amqp://b", "refused", 0.5
)
logging.getLogger("aiormq.connection").info("an info line libraries keep to themselves")
"""


def run(log_format: str, level: str = "info") -> str:
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, log_format, level],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    )
    assert done.stdout == ""
    return done.stderr


def test_library_records_are_json_objects_with_the_traceback_as_a_field() -> None:
    """Under LOG_FORMAT=json every line of a library's output is a JSON object naming its logger,
    and a traceback is the ``exception`` field of its record, not lines of text of its own."""
    lines = run("json").splitlines()
    events = [orjson.loads(line) for line in lines]
    assert [(e["logger"], e["level"]) for e in events] == [
        ("aiormq.connection", "warning"),
        ("aio_pika.tools", "error"),
        ("aio_pika.robust_connection", "warning"),
    ]
    assert "ConnectionResetError: [Errno 104]" in events[0]["exception"]
    assert events[0]["event"] == "Cancelling cause reader exited abnormally"
    assert events[1]["event"].endswith("ValueError: bug")  # a callback's own error is kept
    assert events[2]["event"].endswith("Reconnecting after 0.5 seconds.")
    assert all(e["timestamp"].endswith("Z") for e in events)


def test_a_failed_connection_attempt_is_one_warning() -> None:
    """aiormq's transport error and the closed channel's callback error, said again by the robust
    connection's warning, are dropped at info and kept (as debug) at LOG_LEVEL=debug."""
    assert "error when creating transport" not in run("json")
    debug = [orjson.loads(line) for line in run("json", "debug").splitlines()]
    demoted = [e for e in debug if e["event"].startswith("error when") or "_on_close" in e["event"]]
    assert [e["level"] for e in demoted] == ["debug", "debug"]


def test_console_output_is_readable_lines() -> None:
    """On the console a library's record is one readable line with its level and logger, the
    traceback below it, and no JSON."""
    text = run("console")
    first = text.splitlines()[0]
    assert "warning" in first
    assert "Cancelling cause reader exited abnormally" in first
    assert "aiormq.connection" in first
    assert "ConnectionResetError" in text
    assert not text.lstrip().startswith("{")
