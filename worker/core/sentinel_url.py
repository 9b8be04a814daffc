"""The sentinel form of ``REDIS_URL``: ``redis+sentinel://[[user]:password@]host1:26379,host2:26379/MASTER_NAME/DB``.

Parsed here, in the core, because the settings validate it at start-up (a bad one stops start-up
naming ``REDIS_URL``) and ``worker.redisio.sentinel`` builds the client from the same parse.
``rediss+sentinel://`` speaks TLS to the master (and to the sentinels). The password in the URL is
the master's; the sentinels' own is ``REDIS_SENTINEL_PASSWORD``. Query parameters (``ssl_ca_certs``,
``ssl_cert_reqs``, ...) are passed to the master's connections as in a plain ``redis://`` URL.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import parse_qsl, unquote, urlsplit

SENTINEL_SCHEMES = frozenset({"redis+sentinel", "rediss+sentinel"})
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True, slots=True)
class SentinelUrl:
    """What a sentinel URL says: where the sentinels are and which master to ask them for."""

    sentinels: tuple[tuple[str, int], ...]
    master_name: str
    db: int
    username: str | None
    password: str | None
    tls: bool
    options: tuple[tuple[str, str], ...]  # the query string's parameters, in order


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0].lower() in SENTINEL_SCHEMES


def _address(text: str) -> tuple[str, int]:
    host, colon, port = text.strip().rpartition(":")
    if not colon:
        host, port = text.strip(), str(DEFAULT_SENTINEL_PORT)
    host = host.removeprefix("[").removesuffix("]")
    if not host:
        raise ValueError(f"lists a sentinel without a host ({text.strip()!r})")
    if not port.isdigit() or not 0 < int(port) < 65_536:
        raise ValueError(f"lists a sentinel with a bad port ({text.strip()!r})")
    return host, int(port)


def parse_sentinel_url(url: str) -> SentinelUrl:
    """The parts of a sentinel URL; ``ValueError`` saying what is wrong (never echoing a password)."""
    parts = urlsplit(url)
    if parts.scheme.lower() not in SENTINEL_SCHEMES:
        raise ValueError("must start with redis+sentinel:// or rediss+sentinel://")
    userinfo, at, hosts = parts.netloc.rpartition("@")
    if not at:
        userinfo, hosts = "", parts.netloc
    username, colon, password = userinfo.partition(":")
    if not hosts:
        raise ValueError("lists no sentinel (redis+sentinel://host1:26379,host2:26379/MASTER/0)")
    sentinels = tuple(_address(host) for host in hosts.split(","))
    path = [segment for segment in parts.path.split("/") if segment]
    if not path:
        raise ValueError("names no master (redis+sentinel://host:26379/MASTER_NAME/0)")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("must end with /MASTER_NAME or /MASTER_NAME/DB (a number)")
    return SentinelUrl(
        sentinels=sentinels,
        master_name=unquote(path[0]),
        db=int(path[1]) if len(path) == 2 else 0,
        username=unquote(username) or None,
        password=unquote(password) if colon else None,
        tls=parts.scheme.lower().startswith("rediss"),
        options=tuple(parse_qsl(parts.query)),
    )
