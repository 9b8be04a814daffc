"""Keeping secrets out of logs, stats and error messages."""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (user names stay, they help debugging)."""
    try:
        parts = urlsplit(url)
        password = parts.password
        host = parts.hostname
    except ValueError:
        return "<unparseable URL>"
    if password is None:
        return url
    user = parts.username or ""
    netloc = f"{user}:***@" if user else ":***@"
    if host is not None:
        netloc += f"[{host}]" if ":" in host else host
    try:
        port = parts.port
    except ValueError:
        port = None
    if port is not None:
        netloc += f":{port}"
    return urlunsplit((parts.scheme, netloc, parts.path, parts.query, parts.fragment))


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Remove every non-empty secret from ``text`` (for exception messages that echo a URL)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, "***")
    return text
