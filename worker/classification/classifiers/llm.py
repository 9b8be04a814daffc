"""The ``llm`` classifier: any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
LM Studio, llama.cpp server, ...), at ``POST {LLM_BASE_URL}/chat/completions``.

Request: the system prompt (the template with ``{labels}`` filled in), the text as the user message
(normalised as for the cache key, so the answer depends on nothing the key does not cover),
``temperature`` 0, and the answer format ``LLM_RESPONSE_FORMAT`` asks for: ``json_schema`` (a
schema whose ``label`` is an enum of the labels; OpenAI, vLLM, LM Studio, recent Ollama),
``json_object`` (JSON mode) or ``none`` (the prompt alone). The API key, if any, is sent only as
``Authorization: Bearer ...``; it never appears in a log line, an error or a stat.

Answer: the message content must hold a JSON object ``{"label": ..., "confidence": ...}``
(surrounding prose or a code fence is tolerated), validated with pydantic. The label must be one of
``LLM_LABELS`` (case-insensitive); anything else is an error, never a result. ``confidence`` is
optional (1.0 when missing) and clamped to [0, 1].

Failures inside one classification: timeouts, connection errors, 5xx and answers that fail
validation are retried up to ``LLM_MAX_RETRIES`` times with exponential backoff and jitter; a 429
waits for its ``Retry-After`` (and holds every replica for that long, see ``ratelimit``). Other
4xx answers (bad key, unknown model) are not retried here. When a classification still fails it
raises ``ClassifierUnavailable``: nothing is cached and the worker retries the message later.

Prompt file format (``LLM_PROMPT_FILE``; the default is ``data/llm_prompt.json``)::

    {"version": 1,
     "system": "... {labels} ...",          # required, must contain {labels}
     "user": "{text}",                       # optional, must contain {text}
     "label_descriptions": {"spam": "..."}}  # optional; shown next to a label in {labels}

The identity (``llm:v1:{model}:{fingerprint}``) hashes everything that shapes an answer: protocol
version, rendered prompt, user template, labels, answer format and temperature.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import random
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from email.utils import parsedate_to_datetime
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import httpx
import orjson
import structlog
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from worker.classification.cache import normalise
from worker.classification.ratelimit import RateLimiter
from worker.core.classification import Classification
from worker.core.errors import ClassifierUnavailable
from worker.core.redaction import redact_url, scrub
from worker.observability.counters import LatencyHistogram

__all__ = ["LLMClassifier", "LLMConfig", "PromptTemplate", "ResponseFormat"]

log = structlog.get_logger("worker.llm")

_NAME: Final = "llm"
# Bump when the request or the reading of answers changes in a way the fingerprint cannot see.
_PROTOCOL_VERSION: Final = "v1"
_TEMPERATURE: Final = 0
BACKOFF_BASE_S: Final = 0.5
BACKOFF_CAP_S: Final = 8.0
# A longer Retry-After ends the classification (the cool-down still holds the cluster).
MAX_RETRY_AFTER_S: Final = 30.0
_HINTS: Final = {
    401: " (check LLM_API_KEY)",
    403: " (check LLM_API_KEY)",
    404: " (check LLM_BASE_URL and LLM_MODEL)",
}

ResponseFormat = Literal["json_schema", "json_object", "none"]


class _PromptFile(BaseModel):
    model_config = ConfigDict(extra="forbid")

    version: Literal[1]
    description: str = ""
    system: str = Field(min_length=1)
    user: str = "{text}"
    label_descriptions: dict[str, str] = Field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class PromptTemplate:
    """The system prompt template, the user message template and optional label descriptions."""

    system: str
    user: str = "{text}"
    label_descriptions: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_json(cls, raw: str | bytes) -> PromptTemplate:
        try:
            spec = _PromptFile.model_validate_json(raw)
        except ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(part) for part in first["loc"]) or "file"
            raise ValueError(f"{where}: {first['msg']}") from None
        if "{labels}" not in spec.system:
            raise ValueError("system: must contain {labels}")
        if "{text}" not in spec.user:
            raise ValueError("user: must contain {text}")
        descriptions = {k.strip().lower(): v.strip() for k, v in spec.label_descriptions.items()}
        return cls(spec.system, spec.user, descriptions)

    @classmethod
    def from_file(cls, path: str | Path) -> PromptTemplate:
        return cls.from_json(Path(path).read_bytes())

    @classmethod
    def default(cls) -> PromptTemplate:
        data = resources.files("worker.classification.classifiers").joinpath("data/llm_prompt.json")
        return cls.from_json(data.read_bytes())

    def render_system(self, labels: tuple[str, ...]) -> str:
        lines = []
        for label in labels:
            description = self.label_descriptions.get(label)
            lines.append(f"- {label}: {description}" if description else f"- {label}")
        return self.system.replace("{labels}", "\n".join(lines))

    def render_user(self, text: str) -> str:
        return self.user.replace("{text}", text)


@dataclass(frozen=True, slots=True)
class LLMConfig:
    """What the LLM classifier needs from the settings."""

    base_url: str
    model: str
    labels: tuple[str, ...]
    prompt: PromptTemplate
    api_key: SecretStr = field(default_factory=lambda: SecretStr(""))
    response_format: ResponseFormat = "json_schema"
    timeout_s: float = 30.0
    max_retries: int = 3
    backoff_base_s: float = BACKOFF_BASE_S
    max_retry_after_s: float = MAX_RETRY_AFTER_S


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message


class _Completion(BaseModel):
    choices: list[_Choice] = Field(min_length=1)


class _Answer(BaseModel):
    label: str
    confidence: float | None = Field(default=None, allow_inf_nan=False)


class _AttemptFailed(Exception):
    """One HTTP exchange that did not give a classification; ``kind`` names it in the tallies."""

    def __init__(
        self, kind: str, detail: str, *, retryable: bool = True, retry_after_s: float | None = None
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retryable = retryable
        self.retry_after_s = retry_after_s


def retry_after_s(headers: httpx.Headers, now: float | None = None) -> float | None:
    """Seconds a 429 asks us to wait: ``retry-after-ms``, or ``Retry-After`` (seconds or a date)."""
    raw_ms = headers.get("retry-after-ms")
    if raw_ms:
        try:
            return max(0.0, float(raw_ms) / 1000)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if not raw:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        pass
    try:
        when = parsedate_to_datetime(raw).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def _json_object_in(content: str) -> str:
    """The JSON object of an answer, tolerating a code fence or words around it."""
    stripped = content.strip()
    if stripped.startswith("{"):
        return stripped
    start, end = stripped.find("{"), stripped.rfind("}")
    return stripped[start : end + 1] if 0 <= start < end else stripped


class LLMClassifier:
    """Classifies a text with one chat completion; see the module docstring."""

    def __init__(self, config: LLMConfig, limiter: RateLimiter, *, max_connections: int = 64):
        self._config = config
        self._limiter = limiter
        self._labels = config.labels
        self._by_lower = {label.lower(): label for label in config.labels}
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._where = redact_url(self._url)
        self._secrets = _secrets_of(config)
        key = config.api_key.get_secret_value()
        self._headers = {"Content-Type": "application/json"}
        if key:
            self._headers["Authorization"] = f"Bearer {key}"
        system = config.prompt.render_system(config.labels)
        self._request: dict[str, Any] = {
            "model": config.model,
            "temperature": _TEMPERATURE,
            "messages": [{"role": "system", "content": system}],
        }
        response_format = _response_format(config.response_format, config.labels)
        if response_format is not None:
            self._request["response_format"] = response_format
        fingerprint = {
            "protocol": _PROTOCOL_VERSION,
            "system": system,
            "user": config.prompt.user,
            "labels": config.labels,
            "response_format": config.response_format,
            "temperature": _TEMPERATURE,
        }
        digest = hashlib.sha256(orjson.dumps(fingerprint, option=orjson.OPT_SORT_KEYS)).hexdigest()
        self._identity = f"{_NAME}:{_PROTOCOL_VERSION}:{config.model}:{digest[:12]}"
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            trust_env=False,  # settings come from Settings only, proxies included
            follow_redirects=False,
        )
        self._connections = asyncio.Semaphore(max_connections)
        self.tallies: Counter[str] = Counter()
        self.latency = LatencyHistogram()
        self._latency_ms_sum = 0.0

    @property
    def name(self) -> str:
        return _NAME

    @property
    def identity(self) -> str:
        """``llm:v1:{model}:{fingerprint}``; changes with the model, prompt, labels or format."""
        return self._identity

    @property
    def labels(self) -> tuple[str, ...]:
        return self._labels

    async def classify(self, text: str) -> Classification:
        """One classification: up to ``1 + max_retries`` calls, each paced by the rate limiter."""
        body = orjson.dumps(
            {
                **self._request,
                "messages": [
                    *self._request["messages"],
                    {"role": "user", "content": self._config.prompt.render_user(normalise(text))},
                ],
            }
        )
        attempts = self._config.max_retries + 1
        attempt = 0
        failure: _AttemptFailed | None = None
        while attempt < attempts:
            attempt += 1
            try:
                # A connection first, then the rate limiter's slot: a call leaves as soon as its
                # slot comes, and waiting for a connection never counts against the timeout.
                async with self._connections:
                    await self._limiter.acquire()
                    result = await self._call(body)
            except _AttemptFailed as exc:
                failure = exc
                self.tallies[f"llm_errors_{exc.kind}"] += 1
                delay_s = await self._delay_before_retry(exc, attempt, attempts)
                if delay_s is None:
                    break
                self.tallies["llm_retries"] += 1
                log.warning(
                    "llm_call_failed",
                    kind=exc.kind,
                    error=exc.detail,
                    attempt=attempt,
                    retry_in_s=round(delay_s, 3),
                )
                await asyncio.sleep(delay_s)
                continue
            self.tallies["llm_classifications"] += 1
            return result
        assert failure is not None
        self.tallies["llm_failures"] += 1
        message = f"LLM classification failed after {attempt} call(s): {failure.detail}"
        log.warning(
            "llm_classification_failed", kind=failure.kind, calls=attempt, server=self._where
        )
        raise ClassifierUnavailable(scrub(message, self._secrets))

    async def _delay_before_retry(
        self, failure: _AttemptFailed, attempt: int, attempts: int
    ) -> float | None:
        """How long to wait before the next call, or ``None`` to give up now."""
        if failure.retry_after_s is not None:
            # Every replica holds off for the server's Retry-After, not only this call.
            await self._limiter.cool_down(failure.retry_after_s)
        if not failure.retryable or attempt >= attempts:
            return None
        if failure.retry_after_s is not None:
            if failure.retry_after_s > self._config.max_retry_after_s:
                return None
            # A little jitter so that replicas do not all call again at the same instant.
            return failure.retry_after_s + random.uniform(0, min(1.0, failure.retry_after_s / 10))
        ceiling_s = min(BACKOFF_CAP_S, self._config.backoff_base_s * 2.0 ** (attempt - 1))
        return ceiling_s / 2 + random.uniform(0, ceiling_s / 2)

    async def _call(self, body: bytes) -> Classification:
        self.tallies["llm_requests"] += 1
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self._config.timeout_s):
                response = await self._client.post(self._url, content=body, headers=self._headers)
        except (TimeoutError, httpx.TimeoutException):
            raise _AttemptFailed(
                "timeout", f"no answer from the LLM server within {self._config.timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise _AttemptFailed(
                "connection", f"cannot talk to the LLM server ({type(exc).__name__})"
            ) from None
        elapsed_s = time.perf_counter() - started
        self.latency.observe(elapsed_s)
        self._latency_ms_sum += elapsed_s * 1000
        status = response.status_code
        if status == 429:
            raise _AttemptFailed(
                "rate_limited", "HTTP 429", retry_after_s=retry_after_s(response.headers)
            )
        if status >= 500:
            raise _AttemptFailed("server_error", f"HTTP {status}")
        if not 200 <= status < 300:
            # A bad key or model will not fix itself in a second; the worker retries later.
            raise _AttemptFailed(
                "http_error", f"HTTP {status}{_HINTS.get(status, '')}", retryable=False
            )
        return self._read(response.content)

    def _read(self, content: bytes) -> Classification:
        try:
            completion = _Completion.model_validate_json(content)
        except ValidationError:
            raise _AttemptFailed(
                "invalid_answer", "the LLM server's reply is not a chat completion"
            ) from None
        answer_text = _json_object_in(completion.choices[0].message.content or "")
        try:
            answer = _Answer.model_validate_json(answer_text)
        except ValidationError:
            raise _AttemptFailed(
                "invalid_answer", "the model's answer is not the JSON object asked for"
            ) from None
        # The label itself is never echoed: model output may quote the message text.
        label = self._by_lower.get(answer.label.strip().lower())
        if label is None:
            raise _AttemptFailed("unknown_label", "the model named a label outside LLM_LABELS")
        confidence = 1.0 if answer.confidence is None else min(1.0, max(0.0, answer.confidence))
        return Classification(label, round(confidence, 3), _NAME)

    def snapshot(self) -> dict[str, int]:
        """Calls, errors by kind, retries, total latency, and the rate limiter's waits."""
        found = {name: self.tallies[name] for name in _TALLY_NAMES}
        found["llm_latency_ms_sum"] = round(self._latency_ms_sum)
        found.update(self._limiter.snapshot())
        return found

    async def aclose(self) -> None:
        await self._client.aclose()


_ERROR_KINDS: Final = (
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "http_error",
    "invalid_answer",
    "unknown_label",
)
_TALLY_NAMES: Final = (
    "llm_requests",
    "llm_classifications",
    "llm_failures",
    "llm_retries",
    *(f"llm_errors_{kind}" for kind in _ERROR_KINDS),
)


def _response_format(kind: ResponseFormat, labels: tuple[str, ...]) -> dict[str, Any] | None:
    if kind == "none":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    schema = {
        "type": "object",
        "properties": {
            "label": {"type": "string", "enum": list(labels)},
            "confidence": {"type": "number"},
        },
        "required": ["label", "confidence"],
        "additionalProperties": False,
    }
    return {
        "type": "json_schema",
        "json_schema": {"name": "classification", "strict": True, "schema": schema},
    }


def _secrets_of(config: LLMConfig) -> tuple[str, ...]:
    found = [config.api_key.get_secret_value()]
    with contextlib.suppress(ValueError):
        found.append(urlsplit(config.base_url).password or "")
    return tuple(secret for secret in found if secret)
