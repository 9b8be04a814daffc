"""structlog configuration, done once by the command that runs.

JSON lines when stderr is not a terminal (containers, CI), coloured console output on a terminal.
Contract log lines (``✅ Redis cache connected`` ...) are ordinary events whose text operators grep for.

The standard library's records (aiormq, aio-pika, redis-py, aiohttp) go through the same renderer
(structlog's ``ProcessorFormatter``): in JSON a library's message is the ``event``, its logger the
``logger`` and a traceback the ``exception`` field, so every line stays one JSON object. Records
that repeat what another line of the same incident says are demoted to debug (``LIBRARY_NOISE``):
a failed reconnection attempt is then one warning (aio-pika's), not that warning plus aiormq's error.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal

import orjson
import structlog

LogFormat = Literal["console", "json", "auto"]

# (logger, start of the message template, part of the message): records another line says better.
LIBRARY_NOISE: tuple[tuple[str, str, str], ...] = (
    # Each failed connection attempt: aio-pika's robust connection warns with the retry delay.
    ("aiormq.connection", "error when creating transport", ""),
    # A channel's close callback on a connection already closed: the robust connection restores
    # the channel. Other callbacks' errors are kept.
    ("aio_pika.tools", "Callback %r error", "._on_close of"),
)


def _orjson_dumps(obj: Any, default: Any = None) -> str:
    return orjson.dumps(obj, default=default, option=orjson.OPT_NON_STR_KEYS).decode()


class LibraryNoiseFilter(logging.Filter):
    """Demotes the records of ``LIBRARY_NOISE`` to debug, dropping them below ``level``."""

    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        template = str(record.msg)
        if not any(
            record.name == name and template.startswith(start) and part in record.getMessage()
            for name, start, part in LIBRARY_NOISE
        ):
            return True
        if self.level > logging.DEBUG:
            return False
        record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return True


class _StructlogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """The root handler this module installs (told apart from others, so a second call replaces it)."""


def _renderer(use_json: bool) -> list[structlog.types.Processor]:
    if use_json:
        return [
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=_orjson_dumps),
        ]
    return [structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())]


def _route_standard_library(
    shared: list[structlog.types.Processor], use_json: bool, numeric_level: int
) -> None:
    """Send the standard library's records through structlog's renderer, on stderr."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.add_logger_name],
        processors=[
            structlog.stdlib.ProcessorFormatter.remove_processors_meta,
            *_renderer(use_json),
        ],
    )
    # Libraries' info and debug (every frame aiormq sends) would drown the worker's own events.
    library_level = max(numeric_level, logging.WARNING)
    handler = _StructlogHandler(sys.stderr)
    handler.setFormatter(formatter)
    handler.addFilter(LibraryNoiseFilter(numeric_level))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StructlogHandler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(library_level)


def configure_logging(log_format: LogFormat = "auto", level: str = "info") -> None:
    """Route structlog (and the standard library's loggers) to stderr in the chosen format."""
    use_json = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    numeric_level = logging.getLevelName(level.upper())
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[*shared, *_renderer(use_json)],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=True,
    )
    _route_standard_library(shared, use_json, numeric_level)
