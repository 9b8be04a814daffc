"""What a URL-valued setting must look like: its scheme and host (the values' own checks live
beside their parsers: ``addresses``, ``sentinel_url``, ``redis_tls``)."""

from __future__ import annotations

from urllib.parse import urlsplit

REDIS_SCHEMES = frozenset({"redis", "rediss", "unix"})
AMQP_SCHEMES = frozenset({"amqp", "amqps"})


def check_url(value: str, schemes: frozenset[str], *, needs_host: bool = True) -> str:
    """``value`` if it parses, has one of ``schemes`` and (unless ``needs_host`` is false, or
    it is a unix socket) a host; else a ``ValueError`` saying which of these it lacks."""
    try:
        parts = urlsplit(value)
        _ = parts.port  # raises ValueError on a non-numeric port
    except ValueError as exc:
        raise ValueError("is not a valid URL") from exc
    if parts.scheme not in schemes:
        raise ValueError(f"must start with one of {', '.join(s + '://' for s in sorted(schemes))}")
    if needs_host and parts.scheme != "unix" and not parts.hostname:
        raise ValueError("has no host name")
    return value
