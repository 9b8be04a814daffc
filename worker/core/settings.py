"""Configuration: one ``Settings`` object, read from the environment (and ``.env``) once at start-up.

Nothing else in the worker reads ``os.environ``; components receive the values they need.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from worker.core.addresses import split_addresses
from worker.core.errors import ConfigError
from worker.core.redaction import url_secrets
from worker.core.redis_tls import check_redis_tls
from worker.core.sentinel_url import SENTINEL_SCHEMES, is_sentinel_url, parse_sentinel_url
from worker.core.urls import AMQP_SCHEMES, REDIS_SCHEMES, check_url

# URL-valued settings whose input must never be echoed: they may carry a password.
SECRET_FIELDS = frozenset(
    {"redis_url", "redis_cache_url", "rabbitmq_url", "llm_api_key", "llm_base_url"}
    | {"otel_exporter_otlp_endpoint", "redis_sentinel_password"}
)
UNROUTED_SUFFIX = ".unrouted"  # {RESULTS_EXCHANGE}.unrouted: the name CONTRACT.md fixes
DEFAULT_LLM_LABELS = "question,complaint,order,greeting,spam,other"
# Labels become AMQP routing keys: one topic word (no dots, no wildcards), letters first.
_LLM_LABEL_RE = re.compile(r"[^\W\d_][\w-]{0,63}")


class Settings(BaseSettings):
    """Every setting of a replica; see the README for what each one does."""

    model_config = SettingsConfigDict(
        env_file=".env",
        env_file_encoding="utf-8",
        extra="ignore",
        case_sensitive=False,
        frozen=True,
    )

    redis_url: str = ""
    # ``auto`` asks the server whether it is a cluster node (see worker/redisio/clients.py).
    redis_mode: Literal["auto", "standalone", "cluster", "sentinel"] = "auto"
    # The classification cache and its single-flight locks on a Redis of their own (may evict
    # freely); empty: on REDIS_URL. Claims, done markers, counters and the LLM rate limit stay there.
    redis_cache_url: str = ""
    rabbitmq_url: str = "amqp://guest:guest@localhost:5672/"
    input_queue: str = Field(default="neiromatrius.messages", min_length=1, max_length=200)
    results_exchange: str = Field(default="neiromatrius.classified", min_length=1, max_length=200)
    dead_letter_queue: str = Field(
        default="neiromatrius.messages.dead", min_length=1, max_length=200
    )
    redis_key_prefix: str = Field(default="neiromatrius:", max_length=100)
    dedup_ttl_s: int = Field(default=86_400, gt=0)
    cache_ttl_s: int = Field(default=604_800, gt=0)
    classifier: Literal["keywords", "llm"] = "keywords"
    classifier_delay_ms: float = Field(default=0.0, ge=0, le=600_000)
    keywords_file: str = ""
    llm_base_url: str = ""
    llm_api_key: SecretStr = SecretStr("")
    llm_model: str = ""
    llm_labels: str = DEFAULT_LLM_LABELS
    llm_prompt_file: str = ""
    llm_response_format: Literal["json_schema", "json_object", "none"] = "json_schema"
    llm_timeout_s: float = Field(default=30.0, gt=0, le=600)
    llm_max_retries: int = Field(default=3, ge=0, le=20)
    llm_max_rps: float = Field(default=0.0, ge=0, le=100_000)
    llm_breaker_failures: int = Field(default=5, ge=1, le=10_000)
    llm_breaker_probe_min_s: float = Field(default=1.0, gt=0, le=3_600)
    llm_breaker_probe_max_s: float = Field(default=3.0, gt=0, le=3_600)
    llm_breaker_config_probe_s: float = Field(default=30.0, gt=0, le=3_600)
    llm_breaker_hold_s: float = Field(default=5.0, gt=0, le=600)
    single_flight_wait_s: float = Field(default=30.0, gt=0, le=3_600)
    prefetch: int = Field(default=1024, ge=1, le=65_535)
    stats_host: str = "0.0.0.0"
    stats_port: int = Field(default=8080, ge=0, le=65_535)
    log_format: Literal["console", "json", "auto"] = "auto"
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    claim_lease_s: float = Field(default=30.0, gt=0, le=3_600)
    work_timeout_s: float = Field(default=300.0, gt=0)
    drain_timeout_s: float = Field(default=20.0, ge=0)
    max_attempts: int = Field(default=5, ge=1, le=100)
    retry_base_delay_s: float = Field(default=1.0, gt=0, le=3_600)
    max_message_bytes: int = Field(default=262_144, ge=64)
    local_cache_size: int = Field(default=10_000, ge=0)
    memory_dedup_size: int = Field(default=1_000_000, ge=1)
    heartbeat_interval_s: float = Field(default=2.0, gt=0, le=60)
    redis_timeout_s: float = Field(default=2.0, gt=0, le=60)
    replica_id: str = Field(default="", max_length=100)
    fault_injection: str = ""
    redis_failure_mode: Literal["fallback", "strict"] = "fallback"
    redis_fallback_after_s: float = Field(default=3.0, ge=0, le=3_600)
    redis_sentinel_password: SecretStr = SecretStr("")  # the sentinels' (the master's: REDIS_URL)
    redis_wait_replicas: int = Field(default=0, ge=0, le=100)
    rabbitmq_consumer_timeout_s: float = Field(default=1_800.0, gt=0)
    # The type of the queues the worker creates; a queue that exists is used as it is.
    queue_type: Literal["classic", "quorum"] = "classic"
    # ``keep``: results no binding takes wait in ``{RESULTS_EXCHANGE}.unrouted``; ``discard``: dropped.
    results_unrouted: Literal["keep", "discard"] = "keep"
    # ``off`` runs on stock aio-pika/aiormq (see worker/amqp/fastpath and the README).
    amqp_fast_path: bool = True
    # ``uvloop`` where it is installed (else asyncio, said once at start); ``asyncio`` opts out.
    event_loop: Literal["uvloop", "asyncio"] = "uvloop"
    # Tracing is on when either is set (and OTEL_SDK_DISABLED is not true); the OpenTelemetry SDK
    # reads the rest of its OTEL_* variables itself.
    otel_exporter_otlp_endpoint: str = ""
    otel_traces_exporter: str = ""
    otel_sdk_disabled: bool = False

    @field_validator(
        "classifier",
        "log_format",
        "log_level",
        "llm_response_format",
        "redis_failure_mode",
        "redis_mode",
        "event_loop",
        "queue_type",
        "results_unrouted",
        mode="before",
    )
    @classmethod
    def _lower(cls, value: object) -> object:
        return value.strip().lower() if isinstance(value, str) else value

    @field_validator("redis_url", "redis_cache_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        value = value.strip()
        if value and is_sentinel_url(value):
            parse_sentinel_url(value)  # raises ValueError saying what is wrong
            return value
        return check_redis_tls(check_url(value, REDIS_SCHEMES | SENTINEL_SCHEMES)) if value else ""

    @field_validator("rabbitmq_url")
    @classmethod
    def _rabbitmq_url(cls, value: str) -> str:
        """One address, or a cluster's: several comma-separated, each checked on its own."""
        addresses = [part.strip() for part in value.split(",")]
        if len(addresses) == 1:
            return check_url(addresses[0], AMQP_SCHEMES)
        for number, address in enumerate(addresses, 1):
            where = f"address {number} of {len(addresses)}"
            if not address:
                raise ValueError(f"{where} is empty (a comma too many?)")
            try:
                check_url(address, AMQP_SCHEMES)
            except ValueError as exc:
                raise ValueError(f"{where} {exc}") from None
        return ",".join(addresses)

    @field_validator("llm_base_url")
    @classmethod
    def _llm_base_url(cls, value: str) -> str:
        value = value.strip()
        return check_url(value, frozenset({"http", "https"})) if value else ""

    @field_validator("llm_labels")
    @classmethod
    def _llm_labels(cls, value: str) -> str:
        labels = [label.strip().lower() for label in value.split(",") if label.strip()]
        if len(labels) < 2:
            raise ValueError("needs at least two comma-separated labels")
        if len(set(labels)) != len(labels):
            raise ValueError("lists a label twice")
        for label in labels:
            if not _LLM_LABEL_RE.fullmatch(label):
                raise ValueError(
                    f"label {label!r} must start with a letter and hold only letters, digits, "
                    "'_' or '-' (at most 64)"
                )
        return ",".join(labels)

    @model_validator(mode="after")
    def _reliable(self) -> Settings:
        if self.redis_failure_mode == "strict" and not self.redis_url:
            raise ValueError(
                "REDIS_FAILURE_MODE=strict needs REDIS_URL (without Redis there is nothing to wait for)"
            )
        if self.redis_cache_url and not self.redis_url:
            raise ValueError(
                "REDIS_CACHE_URL needs REDIS_URL: it moves the cache off the claims Redis, and "
                "without REDIS_URL there is none (set REDIS_URL, or leave REDIS_CACHE_URL empty)"
            )
        if self.longest_unacked_s >= self.rabbitmq_consumer_timeout_s:
            raise ValueError(
                "WORK_TIMEOUT_S is too long: 3 × WORK_TIMEOUT_S + CLAIM_LEASE_S (a wait in the "
                "inbox behind a pass, a wait for another replica's work, its own work) must stay "
                f"below RABBITMQ_CONSUMER_TIMEOUT_S ({self.rabbitmq_consumer_timeout_s:g} s, the "
                "broker's consumer_timeout)"
            )
        return self

    @model_validator(mode="after")
    def _breaker(self) -> Settings:
        if self.llm_breaker_probe_max_s < self.llm_breaker_probe_min_s:
            raise ValueError(
                "LLM_BREAKER_PROBE_MAX_S must not be below LLM_BREAKER_PROBE_MIN_S "
                f"({self.llm_breaker_probe_min_s:g} s)"
            )
        return self

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.classifier == "llm":
            if not self.llm_base_url:
                raise ValueError("LLM_BASE_URL is required when CLASSIFIER=llm")
            if not self.llm_model:
                raise ValueError("LLM_MODEL is required when CLASSIFIER=llm")
        return self

    @property
    def llm_label_set(self) -> tuple[str, ...]:
        """``LLM_LABELS`` as a tuple, in the configured order."""
        return tuple(self.llm_labels.split(","))

    @property
    def tracing_enabled(self) -> bool:
        """Whether spans are recorded: an exporter is configured and the SDK is not disabled."""
        configured = bool(self.otel_exporter_otlp_endpoint or self.otel_traces_exporter)
        return configured and not self.otel_sdk_disabled and self.otel_traces_exporter != "none"

    @property
    def rabbitmq_urls(self) -> tuple[str, ...]:
        """The broker's addresses (one, or every node of a cluster), in the order listed."""
        return split_addresses(self.rabbitmq_url)

    @property
    def unrouted_queue(self) -> str | None:
        """Where results no binding takes wait; ``None`` with ``RESULTS_UNROUTED=discard``."""
        return self.results_exchange + UNROUTED_SUFFIX if self.results_unrouted == "keep" else None

    @property
    def longest_unacked_s(self) -> float:
        """The longest a delivery can stay unacknowledged: it waits in the inbox until one of the
        passes ahead of it ends (each bounded by WORK_TIMEOUT_S: the inbox holds at most PREFETCH
        deliveries, which two passes of PREFETCH / 2 take at once, so one pass at most is ahead),
        may then wait for another replica's work on its ID (its lease lapses CLAIM_LEASE_S after
        that work's timeout), then does its own work; all of it before the broker's
        consumer_timeout closes the channel."""
        return 3 * self.work_timeout_s + self.claim_lease_s

    @property
    def redis_enabled(self) -> bool:
        return bool(self.redis_url)

    @property
    def cache_redis_separate(self) -> bool:
        """Whether the cache has a Redis of its own (``REDIS_CACHE_URL`` set, and not ``REDIS_URL``)."""
        return bool(self.redis_cache_url) and self.redis_cache_url != self.redis_url

    @property
    def secrets(self) -> tuple[str, ...]:
        """Strings that must never be printed (passwords inside URLs, the API key)."""
        found = [self.llm_api_key.get_secret_value()]
        found.append(self.redis_sentinel_password.get_secret_value())
        for url in (self.redis_url, self.redis_cache_url, self.rabbitmq_url):
            found += url_secrets(url)
        return tuple(s for s in found if s)


def describe_error(exc: ValidationError) -> str:
    """One line naming the first bad variable, without echoing values that may be secret."""
    error = exc.errors()[0]
    loc = error.get("loc") or ()
    field = str(loc[0]) if loc else ""
    message = str(error.get("msg", "is invalid")).removeprefix("Value error, ")
    if not field:
        return f"invalid configuration: {message}"
    variable = field.upper()
    value = error.get("input")
    shown = "" if field in SECRET_FIELDS or isinstance(value, dict) else f" (got {value!r})"
    return f"invalid setting {variable}: {message}{shown}"


def load_settings(**overrides: object) -> Settings:
    """Build the settings, turning validation failures into a ``ConfigError`` naming the variable."""
    try:
        return Settings(**overrides)  # type: ignore[arg-type]
    except ValidationError as exc:
        raise ConfigError(describe_error(exc)) from None
