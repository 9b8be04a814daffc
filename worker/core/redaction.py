"""Keeping secrets out of logs, stats and error messages.

A URL may carry a secret in two places: its password (``redis://:secret@host``) and, for clients
that read connection options from the query string, a ``password``-like parameter
(``rediss://host/0?password=secret``). Both are masked by ``redact_url`` and listed by
``url_secrets`` (as written and percent-decoded) for ``scrub`` to remove from free text. A list of
URLs (``RABBITMQ_URL=amqp://u:p@a/,amqp://u:q@b/``) has every address's secrets masked and listed.
"""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlencode, urlsplit, urlunsplit

from worker.core.addresses import listed_urls

MASK = "***"
SECRET_QUERY_KEYS = frozenset({"password", "pass", "passwd", "ssl_password", "token", "secret"})


def redact_url(url: str) -> str:
    """Return ``url`` with any password replaced by ``***`` (user names stay, they help debugging);
    for a comma-separated list of URLs, every one of them."""
    return ",".join(_redact_one(address) for address in listed_urls(url))


def _redact_one(url: str) -> str:
    try:
        parts = urlsplit(url)
        password = parts.password
        query = parse_qsl(parts.query, keep_blank_values=True)
    except ValueError:
        return "<unparseable URL>"
    netloc = parts.netloc
    if password is not None:
        # Only the user information is rewritten: the hosts stay as written (a sentinel URL
        # lists several ``host:port`` pairs, which ``hostname`` and ``port`` cannot describe).
        user = parts.username or ""
        netloc = f"{user}:{MASK}@{netloc.rpartition('@')[2]}"
    if any(key.lower() in SECRET_QUERY_KEYS for key, _ in query):
        masked = [(k, MASK if k.lower() in SECRET_QUERY_KEYS else v) for k, v in query]
        query_text = urlencode(masked, safe="*/")
    else:
        query_text = parts.query
    if password is None and query_text == parts.query:
        return url
    return urlunsplit((parts.scheme, netloc, parts.path, query_text, parts.fragment))


def url_secrets(url: str) -> tuple[str, ...]:
    """The secrets inside ``url`` (every URL of a list): its password and password-like query
    values, raw and decoded."""
    found: list[str] = []
    for address in listed_urls(url):
        try:
            parts = urlsplit(address)
            found.append(parts.password or "")
            found += [v for k, v in parse_qsl(parts.query) if k.lower() in SECRET_QUERY_KEYS]
        except ValueError:
            continue
    every = {s for secret in found for s in (secret, unquote(secret)) if s}
    return tuple(sorted(every, key=len, reverse=True))  # longest first: no partial leftovers


def scrub(text: str, secrets: tuple[str, ...]) -> str:
    """Remove every non-empty secret from ``text`` (for exception messages that echo a URL)."""
    for secret in secrets:
        if secret:
            text = text.replace(secret, MASK)
    return text
