"""``neiromatrius-worker check``: what works and what does not, one line each.

Every configured server is contacted: Redis (``INFO server``), RabbitMQ (a connection), and for
``CLASSIFIER=llm`` the LLM endpoint with the cheapest request the OpenAI-compatible API offers,
``GET {LLM_BASE_URL}/models`` (which also says whether ``LLM_MODEL`` is served), falling back to a
one-token chat completion when the server has no ``/models`` (404 or 405).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import httpx

from worker.classification.classifiers.factory import build_classifier
from worker.cli.publish import BrokerUnreachable, open_connection
from worker.core.errors import ConfigError
from worker.core.redaction import redact_url, scrub
from worker.core.settings import Settings
from worker.observability.breakers import breaker_entry
from worker.redisio.keys import RedisKeys
from worker.redisio.link import REDIS_UNAVAILABLE, make_redis

PROBE_TIMEOUT_S = 10.0
NO_MODELS_ROUTE = frozenset({404, 405})
KEY_REFUSED = frozenset({401, 403})


@dataclass(frozen=True, slots=True)
class Outcome:
    """One line of ``check``: whether it works, and what was found."""

    ok: bool
    detail: str


def line(status: str, name: str, detail: str) -> str:
    """One aligned line: the status, the dependency, what was found."""
    return f"{status:<6}{name:<12}{detail}"


async def check_redis(settings: Settings) -> Outcome:
    where = redact_url(settings.redis_url)
    client = make_redis(settings.redis_url, settings.redis_timeout_s)
    try:
        info = await client.info("server")
        return Outcome(True, f"{where} (Redis {info.get('redis_version')})")
    except REDIS_UNAVAILABLE as exc:
        return Outcome(False, f"{where}: {scrub(str(exc), settings.secrets) or type(exc).__name__}")
    finally:
        await client.aclose()


async def check_rabbitmq(settings: Settings) -> Outcome:
    """A plain connection with a timeout (a robust one cancelled while it connects would go on
    reconnecting, and print asyncio's complaints at exit)."""
    try:
        connection = await open_connection(settings.rabbitmq_url, settings.secrets)
    except (ConfigError, BrokerUnreachable) as exc:
        return Outcome(False, str(exc))
    await connection.close()
    return Outcome(True, redact_url(settings.rabbitmq_url))


def _headers(settings: Settings) -> dict[str, str]:
    key = settings.llm_api_key.get_secret_value()
    return {"Authorization": f"Bearer {key}"} if key else {}


def _listed_models(response: httpx.Response) -> list[str] | None:
    """The model IDs of a ``/models`` answer (``{"data": [{"id": ...}]}``), ``None`` if unreadable."""
    try:
        data: Any = response.json().get("data")
        return [str(entry["id"]) for entry in data]
    except (ValueError, AttributeError, TypeError, KeyError):
        return None


def _refused(response: httpx.Response, request: str) -> Outcome | None:
    """The failure an error status means, or ``None`` for a success."""
    if response.status_code in KEY_REFUSED:
        return Outcome(
            False, f"{request}: HTTP {response.status_code}, the key was refused: check LLM_API_KEY"
        )
    if response.is_error:
        return Outcome(
            False, f"{request}: HTTP {response.status_code}: check LLM_BASE_URL and LLM_MODEL"
        )
    return None


def _model_presence(settings: Settings, response: httpx.Response) -> Outcome:
    models = _listed_models(response)
    model = settings.llm_model
    if models is None:
        return Outcome(True, f"GET /models answered (no model list to look for {model!r} in)")
    if model in models:
        return Outcome(True, f"model {model!r} listed by GET /models")
    shown = ", ".join(sorted(models)[:5]) + (", ..." if len(models) > 5 else "")
    return Outcome(
        False,
        f"model {model!r} is not among the {len(models)} GET /models lists ({shown}): "
        "check LLM_MODEL",
    )


async def _completion(client: httpx.AsyncClient, settings: Settings) -> Outcome:
    body = {
        "model": settings.llm_model,
        "messages": [{"role": "user", "content": "ping"}],
        "max_tokens": 1,
    }
    url = settings.llm_base_url.rstrip("/") + "/chat/completions"
    response = await client.post(url, json=body, headers=_headers(settings))
    refused = _refused(response, "POST /chat/completions (no GET /models)")
    return refused or Outcome(
        True, f"model {settings.llm_model!r} answered a one-token completion (no GET /models)"
    )


async def probe_llm(settings: Settings) -> Outcome:
    """Whether the LLM endpoint answers with the configured key, and serves ``LLM_MODEL``."""
    timeout_s = min(settings.llm_timeout_s, PROBE_TIMEOUT_S)
    async with httpx.AsyncClient(
        timeout=timeout_s, trust_env=False, follow_redirects=False
    ) as client:
        try:
            url = settings.llm_base_url.rstrip("/") + "/models"
            response = await client.get(url, headers=_headers(settings))
            if response.status_code in NO_MODELS_ROUTE:
                return await _completion(client, settings)
            return _refused(response, "GET /models") or _model_presence(settings, response)
        except httpx.TimeoutException:
            return Outcome(False, f"unreachable: no answer within {timeout_s:g} s")
        except httpx.HTTPError as exc:
            reason = scrub(str(exc), settings.secrets) or "no connection"
            return Outcome(False, f"unreachable ({type(exc).__name__}: {reason})")


async def check_classifier(settings: Settings) -> Outcome:
    try:
        classifier = build_classifier(settings)
    except ConfigError as exc:
        return Outcome(False, str(exc))
    identity = classifier.identity
    await classifier.aclose()
    if settings.classifier != "llm":
        return Outcome(True, identity)
    probed = await probe_llm(settings)
    return Outcome(probed.ok, f"{identity} at {redact_url(settings.llm_base_url)}: {probed.detail}")


async def check_breaker(settings: Settings) -> Outcome | None:
    """The LLM circuit breaker the replicas share, when there is one to read: an open one is a
    failure, with the reason the replicas give (a configuration error names the setting)."""
    if settings.classifier != "llm" or not settings.redis_enabled:
        return None
    try:
        classifier = build_classifier(settings)
    except ConfigError:
        return None  # the classifier line says why
    identity = classifier.identity
    await classifier.aclose()
    client = make_redis(settings.redis_url, settings.redis_timeout_s)
    try:
        raw = await client.hgetall(RedisKeys(settings.redis_key_prefix).breaker(identity))  # type: ignore[misc]
    except REDIS_UNAVAILABLE:
        return None  # the redis line says why
    finally:
        await client.aclose()
    entry = breaker_entry(identity, {_text(k): _text(v) for k, v in raw.items()})
    if entry["state"] != "open":
        return Outcome(True, f"closed ({entry['opens']} opens so far)")
    return Outcome(False, f"open ({entry['kind']}): {entry['reason']}")


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


async def run_checks(settings: Settings) -> int:
    """Print one line per dependency; exit code 0 only when everything configured works."""
    outcomes: list[tuple[str, Outcome]] = []
    if settings.redis_enabled:
        outcomes.append(("redis", await check_redis(settings)))
    else:
        print(
            line(
                "info",
                "redis",
                "REDIS_URL not set: in-memory mode (duplicates possible across replicas)",
            )
        )
    outcomes.append(("rabbitmq", await check_rabbitmq(settings)))
    outcomes.append(("classifier", await check_classifier(settings)))
    if (breaker := await check_breaker(settings)) is not None:
        outcomes.append(("llm breaker", breaker))
    for name, outcome in outcomes:
        print(line("ok" if outcome.ok else "FAIL", name, outcome.detail))
    return 0 if all(outcome.ok for _, outcome in outcomes) else 1
