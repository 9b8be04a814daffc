"""RABBITMQ_URL as a cluster's list: parsed and checked address by address, tried in turn from a
random one, and every address's password masked."""

from __future__ import annotations

import inspect
import socket
import subprocess
import sys
from collections import Counter
from pathlib import Path

import aio_pika
import pytest
from aiormq.exceptions import AMQPConnectionError

from worker.amqp.connection import UNREACHABLE, connect, connect_failure, connect_once
from worker.amqp.fastpath.attempts import ATTEMPT_HOOK, ROTATES
from worker.core.addresses import in_turn, listed_urls, split_addresses
from worker.core.errors import ConfigError
from worker.core.redaction import redact_url, scrub, url_secrets
from worker.core.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
CLUSTER = "amqp://app:pw-one@mq1:5672/,amqp://app:pw-two@mq2:5672/, amqps://app:pw-3@mq3:5671/vh"


def test_a_list_is_split_into_its_addresses() -> None:
    """Every comma-separated address is kept, in order, without the blanks around it."""
    settings = Settings(rabbitmq_url=CLUSTER)
    assert settings.rabbitmq_urls == (
        "amqp://app:pw-one@mq1:5672/",
        "amqp://app:pw-two@mq2:5672/",
        "amqps://app:pw-3@mq3:5671/vh",
    )
    assert Settings(rabbitmq_url="amqp://guest:guest@mq:5672/").rabbitmq_urls == (
        "amqp://guest:guest@mq:5672/",
    )


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("amqp://mq1/,http://mq2/", "address 2 of 2 must start with one of amqp://, amqps://"),
        ("amqp://mq1/,amqp://mq2:port/", "address 2 of 2 is not a valid URL"),
        ("amqp://mq1/,,amqp://mq3/", "address 2 of 3 is empty"),
        ("amqp://mq1/,", "address 2 of 2 is empty"),
        ("amqp:///,amqp://mq2/", "address 1 of 2 has no host name"),
    ],
)
def test_a_bad_address_names_the_variable_and_which_address(value: str, problem: str) -> None:
    """A list with one bad address is refused, naming RABBITMQ_URL and the address's place."""
    with pytest.raises(ConfigError) as raised:
        load_settings(rabbitmq_url=value)
    assert str(raised.value).startswith("invalid setting RABBITMQ_URL: ")
    assert problem in str(raised.value)


def test_a_bad_address_does_not_echo_the_passwords() -> None:
    """The refusal of a list never shows the list (its other addresses carry passwords)."""
    with pytest.raises(ConfigError) as raised:
        load_settings(rabbitmq_url="amqp://u:pw-one@mq1/,amqp://u:pw-two@mq2:bad/")
    assert "pw-one" not in str(raised.value)
    assert "pw-two" not in str(raised.value)


def test_a_bad_address_stops_start_up_with_one_line_and_exit_2() -> None:
    """``run`` with a list whose second address is not AMQP prints one line naming RABBITMQ_URL
    and exits 2."""
    env = {
        "PATH": "/usr/bin:/bin",
        "HOME": "/tmp",
        "PYTHONPATH": str(ROOT),
        "RABBITMQ_URL": "amqp://guest:guest@127.0.0.1:5672/,redis://127.0.0.1:6379/0",
    }
    done = subprocess.run(
        [sys.executable, "-m", "worker", "run"],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert "RABBITMQ_URL" in lines[0]
    assert "address 2 of 2" in lines[0]


def test_every_password_of_a_list_is_masked() -> None:
    """Redaction masks the password of each address of a list, and lists each as a secret."""
    shown = redact_url(CLUSTER)
    for password in ("pw-one", "pw-two", "pw-3"):
        assert password not in shown
        assert password in url_secrets(CLUSTER)
    assert shown == (
        "amqp://app:***@mq1:5672/,amqp://app:***@mq2:5672/,amqps://app:***@mq3:5671/vh"
    )
    error = "connect to amqp://app:pw-two@mq2:5672/ failed; tried pw-3 too"
    assert "pw" not in scrub(error, Settings(rabbitmq_url=CLUSTER).secrets)


def test_a_url_with_commas_of_its_own_stays_one_address() -> None:
    """Only a list of full URLs is split: the Sentinel form's host list is one address."""
    sentinel = "redis+sentinel://:pw@h1:26379,h2:26379/mymaster/0"
    assert listed_urls(sentinel) == (sentinel,)
    assert "pw" not in redact_url(sentinel)
    assert split_addresses(" amqp://a/ , amqp://b/ ") == ("amqp://a/", "amqp://b/")


def test_addresses_are_tried_in_turn_from_the_start_given() -> None:
    """From any start, each address comes once, in the listed order, wrapping round."""
    addresses = ("a", "b", "c")
    assert in_turn(addresses, 0) == ("a", "b", "c")
    assert in_turn(addresses, 1) == ("b", "c", "a")
    assert in_turn(addresses, 5) == ("c", "a", "b")
    assert in_turn((), None) == ()


def test_the_first_address_is_random_so_replicas_spread() -> None:
    """Without a start, every address is the first one about as often as the others."""
    firsts = Counter(in_turn(("a", "b", "c"))[0] for _ in range(3_000))
    assert set(firsts) == {"a", "b", "c"}
    assert min(firsts.values()) > 800  # 1,000 each expected; 800 is > 9 standard deviations off


def test_the_attempt_hook_exists_in_the_installed_aio_pika() -> None:
    """Reconnections rotate over the addresses only through aio-pika's per-attempt method: a
    bump of aio-pika that renames it fails here rather than silently pinning one node."""
    assert ROTATES
    assert inspect.iscoroutinefunction(getattr(aio_pika.RobustConnection, ATTEMPT_HOOK))


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_no_address_answering_is_an_unreachable_broker() -> None:
    """When no address of the list answers, both kinds of connection raise the error that the
    commands and the start-up loop report as an unreachable broker (not a refusal)."""
    url = ",".join(f"amqp://guest:guest@127.0.0.1:{_closed_port()}/" for _ in range(3))
    for attempt in (connect_once(url, name="test"), connect(url, name="test")):
        with pytest.raises(AMQPConnectionError) as raised:
            await attempt
        assert connect_failure(raised.value) is UNREACHABLE
