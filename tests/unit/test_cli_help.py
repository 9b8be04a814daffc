"""Each command's ``--help`` tells a newcomer what it does and what configures it."""

from __future__ import annotations

import pytest

from worker.cli.main import main

MAIN_VARIABLES = ("RABBITMQ_URL", "REDIS_URL", "INPUT_QUEUE", "STATS_PORT", "LOG_LEVEL")


def help_of(capsys: pytest.CaptureFixture[str], *command: str) -> str:
    with pytest.raises(SystemExit) as exited:
        main([*command, "--help"])
    assert exited.value.code == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("command", ["run", "check"])
def test_run_and_check_describe_themselves_and_list_the_main_variables(
    capsys: pytest.CaptureFixture[str], command: str
) -> None:
    """``run --help`` and ``check --help`` have a description, list the main environment
    variables with their defaults, and point to the README's table."""
    text = help_of(capsys, command)
    description = text.split("\n\n")[1]
    assert len(description.split()) > 15, description
    for name in MAIN_VARIABLES:
        assert f"\n  {name} " in text, name
    assert "(default amqp://guest:guest@localhost:5672/)" in text
    assert "(default 8080)" in text
    assert 'README, "Configuration"' in text


def test_publish_help_names_the_queue_it_writes_to(capsys: pytest.CaptureFixture[str]) -> None:
    """``publish --help`` says it writes to INPUT_QUEUE and gives that queue's default name."""
    text = " ".join(help_of(capsys, "publish").split())
    assert "INPUT_QUEUE (default neiromatrius.messages)" in text


def test_the_command_list_says_which_queue_publish_writes_to(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The top-level help's line for ``publish`` names INPUT_QUEUE."""
    text = " ".join(help_of(capsys).split())
    assert "publish send messages to the input queue (INPUT_QUEUE" in text


def test_demo_timeout_shows_its_default(capsys: pytest.CaptureFixture[str]) -> None:
    """``demo --help`` gives the default of ``--timeout``."""
    text = " ".join(help_of(capsys, "demo").split())
    assert "--timeout SECONDS give up after this (default 120)" in text
