"""``neiromatrius-worker check``: what works and what does not, one line each."""

from __future__ import annotations

import asyncio

from worker.amqp.broker import connect
from worker.classification.classifiers.factory import build_classifier
from worker.core.errors import ConfigError
from worker.core.redaction import redact_url, scrub
from worker.core.settings import Settings
from worker.redisio.link import REDIS_UNAVAILABLE, make_redis


async def run_checks(settings: Settings) -> int:
    """Print one line per dependency; exit code 0 only when everything configured works."""
    failures = 0
    if settings.redis_enabled:
        client = make_redis(settings.redis_url, settings.redis_timeout_s)
        try:
            info = await client.info("server")
            print(
                f"ok    redis     {redact_url(settings.redis_url)} (Redis {info.get('redis_version')})"
            )
        except REDIS_UNAVAILABLE as exc:
            failures += 1
            print(
                f"FAIL  redis     {redact_url(settings.redis_url)}: "
                f"{scrub(str(exc), settings.secrets) or type(exc).__name__}"
            )
        finally:
            await client.aclose()
    else:
        print(
            "info  redis     REDIS_URL not set: in-memory mode (duplicates possible across replicas)"
        )
    try:
        connection = await asyncio.wait_for(connect(settings.rabbitmq_url), timeout=10)
        await connection.close()
        print(f"ok    rabbitmq  {redact_url(settings.rabbitmq_url)}")
    except Exception as exc:
        failures += 1
        print(
            f"FAIL  rabbitmq  {redact_url(settings.rabbitmq_url)}: "
            f"{scrub(str(exc), settings.secrets) or type(exc).__name__}"
        )
    try:
        classifier = build_classifier(settings)
        print(f"ok    classifier {classifier.identity}")
        await classifier.aclose()
    except ConfigError as exc:
        failures += 1
        print(f"FAIL  classifier {exc}")
    return 0 if failures == 0 else 1
