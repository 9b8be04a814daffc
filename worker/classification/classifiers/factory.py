"""Builds the classifier the settings ask for."""

from __future__ import annotations

from worker.classification.breaker import BreakerConfig, CircuitBreaker
from worker.classification.classifiers.base import Classifier
from worker.classification.classifiers.keywords import KeywordClassifier
from worker.classification.classifiers.llm import LLMClassifier, LLMConfig, PromptTemplate
from worker.classification.ratelimit import RateLimiter
from worker.core.errors import ConfigError
from worker.core.settings import Settings
from worker.observability.counters import Counters
from worker.redisio.keys import RedisKeys
from worker.redisio.link import RedisLink


def build_classifier(
    settings: Settings, *, link: RedisLink | None = None, counters: Counters | None = None
) -> Classifier:
    """The configured classifier; ``link`` (when the replicas share a Redis) makes the LLM rate
    limit and circuit breaker cluster-wide instead of per replica."""
    delay_s = settings.classifier_delay_ms / 1000
    if settings.classifier == "llm":
        return build_llm_classifier(settings, link=link, counters=counters)
    if settings.keywords_file:
        try:
            return KeywordClassifier.from_file(settings.keywords_file, delay_s=delay_s)
        except (OSError, ValueError) as exc:
            raise ConfigError(f"invalid setting KEYWORDS_FILE: {exc}") from None
    return KeywordClassifier.default(delay_s=delay_s)


def build_llm_classifier(
    settings: Settings, *, link: RedisLink | None = None, counters: Counters | None = None
) -> LLMClassifier:
    try:
        prompt = (
            PromptTemplate.from_file(settings.llm_prompt_file)
            if settings.llm_prompt_file
            else PromptTemplate.default()
        )
    except OSError as exc:
        raise ConfigError(
            f"invalid setting LLM_PROMPT_FILE: cannot read it ({exc.strerror})"
        ) from None
    except ValueError as exc:
        raise ConfigError(f"invalid setting LLM_PROMPT_FILE: {exc}") from None
    limiter = RateLimiter(settings.llm_max_rps, RedisKeys(settings.redis_key_prefix), link)
    config = LLMConfig(
        base_url=settings.llm_base_url,
        model=settings.llm_model,
        labels=settings.llm_label_set,
        prompt=prompt,
        api_key=settings.llm_api_key,
        response_format=settings.llm_response_format,
        timeout_s=settings.llm_timeout_s,
        max_retries=settings.llm_max_retries,
    )
    classifier = LLMClassifier(config, limiter)
    classifier.use_breaker(
        CircuitBreaker(
            breaker_config(settings),
            key=RedisKeys(settings.redis_key_prefix).breaker(classifier.identity),
            link=link,
            counters=counters,
        )
    )
    return classifier


def breaker_of(classifier: Classifier) -> CircuitBreaker | None:
    """The circuit breaker a classifier reports to (the LLM's), if it has one."""
    return classifier.breaker if isinstance(classifier, LLMClassifier) else None


def breaker_config(settings: Settings) -> BreakerConfig:
    """The ``LLM_BREAKER_*`` settings; a probe's lease outlasts the longest call it can make."""
    return BreakerConfig(
        failures=settings.llm_breaker_failures,
        probe_min_s=settings.llm_breaker_probe_min_s,
        probe_max_s=settings.llm_breaker_probe_max_s,
        config_probe_s=settings.llm_breaker_config_probe_s,
        probe_lease_s=settings.llm_timeout_s + 5,
    )
