"""The sentinel form of REDIS_URL is read once, at start-up, and its mistakes are named."""

from __future__ import annotations

import pytest

from worker.core.errors import ConfigError
from worker.core.redaction import redact_url
from worker.core.sentinel_url import parse_sentinel_url
from worker.core.settings import load_settings
from worker.redisio.sentinel import connection_options


def test_every_part_of_a_sentinel_url_is_read() -> None:
    """Hosts (default port 26379), master name, database, password and TLS come from the URL;
    the query's TLS options reach the master's connections with the worker's timeouts."""
    parsed = parse_sentinel_url(
        "rediss+sentinel://:p%40ss@10.0.0.1:26380,sentinel-b/mymaster/3?ssl_cert_reqs=none"
    )
    assert parsed.sentinels == (("10.0.0.1", 26380), ("sentinel-b", 26379))
    assert parsed.master_name == "mymaster"
    assert parsed.db == 3
    assert parsed.password == "p@ss"
    assert parsed.tls
    options = connection_options(parsed, 2.0)
    assert options["ssl"] is True
    assert options["ssl_cert_reqs"] == "none"
    assert options["socket_timeout"] == 2.0
    assert "host" not in options


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://a:26379", "names no master"),
        ("redis+sentinel:///mymaster", "lists no sentinel"),
        ("redis+sentinel://a:x/mymaster", "bad port"),
        ("redis+sentinel://a/mymaster/zero", "MASTER_NAME/DB"),
    ],
)
def test_a_bad_sentinel_url_stops_start_up_naming_the_variable(url: str, says: str) -> None:
    """Each mistake is one line naming REDIS_URL and what is wrong."""
    with pytest.raises(ConfigError, match="REDIS_URL") as raised:
        load_settings(redis_url=url)
    assert says in str(raised.value)


def test_sentinel_passwords_never_show() -> None:
    """The master's password is masked with the hosts left readable, and the sentinels' password
    is one of the secrets scrubbed from every message."""
    url = "redis+sentinel://:master-pw@h1:26379,h2:26379/m/0"
    assert redact_url(url) == "redis+sentinel://:***@h1:26379,h2:26379/m/0"
    settings = load_settings(redis_url=url, redis_sentinel_password="sentinel-pw")
    assert {"master-pw", "sentinel-pw"} <= set(settings.secrets)
