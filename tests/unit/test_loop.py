"""The runner of ``run`` and ``demo``: uvloop when wanted and importable, else asyncio, said once."""

from __future__ import annotations

from types import ModuleType

import pytest
from structlog.testing import capture_logs

from worker.cli.loop import Importer, choose_loop, run_on_loop, running_loop_name


def missing_uvloop(name: str) -> ModuleType:
    raise ModuleNotFoundError(f"No module named {name!r}", name=name)


def refusing_importer(imported: list[str]) -> Importer:
    def import_module(name: str) -> ModuleType:
        imported.append(name)
        raise AssertionError(f"{name} was imported")

    return import_module


async def loop_name() -> str:
    return running_loop_name()


def test_uvloop_asked_for_but_missing_runs_on_asyncio_and_says_why_once() -> None:
    """Without an importable uvloop the command still runs (on asyncio), and one warning gives
    the reason and the fix."""
    with capture_logs() as logs:
        ran_on = run_on_loop(loop_name(), "uvloop", import_module=missing_uvloop)
    assert ran_on == "asyncio"
    assert [e["log_level"] for e in logs] == ["warning"]
    (warning,) = logs
    assert warning["event"] == "event_loop"
    assert warning["event_loop"] == "asyncio"
    assert warning["requested"] == "uvloop"
    assert "No module named 'uvloop'" in warning["reason"]
    assert "EVENT_LOOP=asyncio" in warning["fix"]


def test_a_broken_uvloop_build_falls_back_like_a_missing_one() -> None:
    """An uvloop that imports but offers no loop factory is treated as missing, not a crash."""
    choice = choose_loop("uvloop", import_module=lambda name: ModuleType(name))
    assert choice.name == "asyncio"
    assert "AttributeError" in choice.fallback_reason


def test_asyncio_opt_out_never_imports_uvloop() -> None:
    """EVENT_LOOP=asyncio runs on asyncio without importing uvloop, and logs it at info."""
    imported: list[str] = []
    with capture_logs() as logs:
        ran_on = run_on_loop(loop_name(), "asyncio", import_module=refusing_importer(imported))
    assert ran_on == "asyncio"
    assert imported == []
    assert logs == [{"event": "event_loop", "event_loop": "asyncio", "log_level": "info"}]


def test_installed_uvloop_runs_the_coroutine_and_returns_its_result() -> None:
    """With uvloop installed (a Linux dependency) the coroutine runs on it and its result is
    returned, and the line logged at start names uvloop."""
    pytest.importorskip("uvloop")
    with capture_logs() as logs:
        ran_on = run_on_loop(loop_name(), "uvloop")
    assert ran_on == "uvloop"
    assert logs == [{"event": "event_loop", "event_loop": "uvloop", "log_level": "info"}]


def test_quiet_run_logs_its_loop_at_debug_but_a_fallback_still_warns() -> None:
    """The demo's runner (quiet) keeps the loop line out of its output's info level, while a
    missing uvloop is still said as a warning."""
    with capture_logs() as logs:
        run_on_loop(loop_name(), "asyncio", quiet=True)
        run_on_loop(loop_name(), "uvloop", quiet=True, import_module=missing_uvloop)
    assert [(e["log_level"], e["event_loop"]) for e in logs] == [
        ("debug", "asyncio"),
        ("warning", "asyncio"),
    ]
