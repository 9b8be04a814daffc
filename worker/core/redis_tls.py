"""The TLS options of a ``rediss://`` URL that redis-py reads from its query string.

``from_url`` passes ``ssl_ca_certs``, ``ssl_certfile``, ``ssl_keyfile``, ``ssl_cert_reqs`` (and the
other ``ssl_*`` options) to its TLS connection. It checks none of them until the first connection:
an unknown ``ssl_cert_reqs`` then raises a ``RedisError`` (a traceback), a missing CA file fails
every connection with "No such file or directory". Both are refused at start-up instead.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

# redis-py's ``ssl_cert_reqs`` values; another one fails only at the first connection, as a
# traceback, so it is refused at start-up with the variable's name.
SSL_CERT_REQS = frozenset({"none", "optional", "required"})


def check_redis_tls(value: str) -> str:
    """The TLS options redis-py reads from a ``rediss://`` URL's query: a known ``ssl_cert_reqs``
    and CA/certificate files that exist (else every connection fails with an unclear error)."""
    for key, option in parse_qsl(urlsplit(value).query):
        if key == "ssl_cert_reqs" and option not in SSL_CERT_REQS:
            raise ValueError(f"ssl_cert_reqs must be one of {', '.join(sorted(SSL_CERT_REQS))}")
        if key in {"ssl_ca_certs", "ssl_certfile", "ssl_keyfile"} and not Path(option).is_file():
            raise ValueError(f"{key}: no such file {option!r}")
    return value
