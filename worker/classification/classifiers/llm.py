"""The ``llm`` classifier: any OpenAI-compatible chat-completions server (OpenAI, vLLM, Ollama,
LM Studio, llama.cpp server, ...), at ``POST {LLM_BASE_URL}/chat/completions``.

Request (``llm_prompt``): the system prompt (the template with ``{labels}`` filled in), the text as
the user message (normalised as for the cache key, so the answer depends on nothing the key does not
cover), ``temperature`` 0, and the answer format ``LLM_RESPONSE_FORMAT`` asks for. The API key, if
any, is sent only as ``Authorization: Bearer ...``; it never appears in a log line, an error or a
stat.

Answer (``llm_http``): a JSON object ``{"label": ..., "confidence": ...}`` in the message content;
the label must be one of ``LLM_LABELS``, anything else is an error, never a result.

Failures inside one classification: timeouts, connection errors, 5xx and answers that fail
validation are retried up to ``LLM_MAX_RETRIES`` times with exponential backoff and jitter; a 429
waits for its ``Retry-After`` (and holds every replica for that long, see ``ratelimit``). Other
4xx answers (bad key, unknown model) are not retried here. When a classification still fails it
raises ``ClassifierUnavailable``: nothing is cached and the worker retries the message later.

The provider's and the configuration's failures (``llm_http.Blame``) also go to the circuit
breaker (``worker.classification.breaker``): while it is open no call leaves, not even a retry
inside a classification, and ``ClassifierPaused`` tells the worker to hold the message without
spending an attempt; the last text refused is what this replica probes with. Calls in flight are
bounded by a window that shrinks to one on a provider failure (``worker.classification.window``).

The identity (``llm:v1:{model}:{fingerprint}``) hashes everything that shapes an answer: protocol
version, rendered prompt, user template, labels, answer format and temperature.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from typing import Final

import httpx
import orjson
import structlog

from worker.classification.breaker import CircuitBreaker, Failure
from worker.classification.classifiers.llm_http import (
    ERROR_KINDS,
    AttemptFailed,
    breaker_failure,
    check_status,
    read_answer,
    retry_after_s,
)
from worker.classification.classifiers.llm_prompt import (
    BACKOFF_BASE_S,
    MAX_RETRY_AFTER_S,
    LLMConfig,
    PromptTemplate,
    ResponseFormat,
    base_request,
    fingerprint,
    request_headers,
    secrets_of,
)
from worker.classification.ratelimit import RateLimiter
from worker.classification.text import normalise
from worker.classification.window import CallWindow
from worker.core.classification import Classification
from worker.core.errors import ClassifierPaused, ClassifierUnavailable
from worker.core.redaction import redact_url, scrub
from worker.observability.counters import LatencyHistogram

__all__ = [
    "BACKOFF_BASE_S",
    "BACKOFF_CAP_S",
    "MAX_RETRY_AFTER_S",
    "LLMClassifier",
    "LLMConfig",
    "PromptTemplate",
    "ResponseFormat",
    "retry_after_s",
]

log = structlog.get_logger("worker.llm")

_NAME: Final = "llm"
# Bump when the request or the reading of answers changes in a way the fingerprint cannot see.
_PROTOCOL_VERSION: Final = "v1"
BACKOFF_CAP_S: Final = 8.0
_TALLY_NAMES: Final = (
    "llm_requests",
    "llm_classifications",
    "llm_failures",
    "llm_retries",
    "llm_paused",
    *(f"llm_errors_{kind}" for kind in ERROR_KINDS),
)


class LLMClassifier:
    """Classifies a text with one chat completion; see the module docstring."""

    def __init__(
        self,
        config: LLMConfig,
        limiter: RateLimiter,
        *,
        max_connections: int = 64,
    ):
        self._config = config
        self._limiter = limiter
        self.breaker: CircuitBreaker | None = None
        self._waiting_body: bytes | None = None  # the last text the open breaker refused
        self._labels = config.labels
        self._by_lower = {label.lower(): label for label in config.labels}
        self._url = config.base_url.rstrip("/") + "/chat/completions"
        self._where = redact_url(self._url)
        self._secrets = secrets_of(config)
        self._headers = request_headers(config)
        self._request = base_request(config)
        self._identity = f"{_NAME}:{_PROTOCOL_VERSION}:{config.model}:"
        self._identity += fingerprint(config, _PROTOCOL_VERSION)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(config.timeout_s),
            limits=httpx.Limits(
                max_connections=max_connections, max_keepalive_connections=max_connections
            ),
            trust_env=False,  # settings come from Settings only, proxies included
            follow_redirects=False,
        )
        self._window = CallWindow(max_connections)
        self.tallies: Counter[str] = Counter()
        self.latency = LatencyHistogram()
        self._latency_ms_sum = 0.0

    def use_breaker(self, breaker: CircuitBreaker) -> None:
        """Report to ``breaker`` (built for this ``identity``) and let it probe with our texts."""
        self.breaker = breaker
        breaker.probe_with(self.probe, lambda: self._waiting_body is not None)

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
        body = self._body(text)
        attempts = self._config.max_retries + 1
        attempt = 0
        while True:
            attempt += 1
            try:
                # A slot of the window first, then the rate limiter's: a call leaves as soon as
                # its slot comes, and waiting for the window never counts against the timeout.
                self._refuse_if_open(body)
                async with self._window.slot():
                    self._refuse_if_open(body)
                    await self._limiter.acquire()
                    result = await self._call(body)
            except AttemptFailed as exc:
                await self._heard(exc, body)
                delay_s = await self._after_failure(exc, attempt, attempts)
                if delay_s is None:
                    raise self._gave_up(exc, attempt) from None
                await asyncio.sleep(delay_s)
            else:
                await self._heard(None, body)
                self.tallies["llm_classifications"] += 1
                return result

    def _refuse_if_open(self, body: bytes) -> None:
        """No call while the breaker is open: the text waits (and is what a probe sends)."""
        if self.breaker is not None and self.breaker.is_open():
            self._waiting_body = body
            self.tallies["llm_paused"] += 1
            raise ClassifierPaused(self.breaker.problem() or "the LLM circuit breaker is open")

    async def _heard(self, failed: AttemptFailed | None, body: bytes) -> None:
        """Tell the window and the breaker how the server answered; ``ClassifierPaused`` when
        the failure leaves the breaker open (no retry then)."""
        failure = breaker_failure(failed, self._config.max_retry_after_s)
        if failure is None:
            self._window.succeeded()
            if self.breaker is not None:
                await self.breaker.succeeded()
            return
        self._window.failed()
        if self.breaker is not None and await self.breaker.failed(failure):
            self._refuse_if_open(body)

    async def probe(self) -> Failure | None:
        """One call with the last text the breaker refused: ``None`` when the server answered
        (whatever it said about the text), else the failure the breaker hears of."""
        body = self._waiting_body
        if body is None:
            return None
        failure = None
        try:
            await self._limiter.acquire()
            await self._call(body)
        except AttemptFailed as exc:
            self.tallies[f"llm_errors_{exc.kind}"] += 1
            failure = breaker_failure(exc, self._config.max_retry_after_s)
        if failure is None:
            self._waiting_body = None
            self._window.succeeded()
        return failure

    def _body(self, text: str) -> bytes:
        """The request for ``text``: the configured request plus ``text`` as the user message."""
        user = {"role": "user", "content": self._config.prompt.render_user(normalise(text))}
        return orjson.dumps({**self._request, "messages": [*self._request["messages"], user]})

    async def _after_failure(
        self, failure: AttemptFailed, attempt: int, attempts: int
    ) -> float | None:
        """Count a failed call and say how long to wait before the next, or ``None`` to stop."""
        self.tallies[f"llm_errors_{failure.kind}"] += 1
        delay_s = await self._delay_before_retry(failure, attempt, attempts)
        if delay_s is not None:
            self.tallies["llm_retries"] += 1
            log.warning(
                "llm_call_failed",
                kind=failure.kind,
                error=failure.detail,
                attempt=attempt,
                retry_in_s=round(delay_s, 3),
            )
        return delay_s

    def _gave_up(self, failure: AttemptFailed, calls: int) -> ClassifierUnavailable:
        """The error a classification ends with after its last failed call, secrets scrubbed."""
        self.tallies["llm_failures"] += 1
        message = f"LLM classification failed after {calls} call(s): {failure.detail}"
        log.warning("llm_classification_failed", kind=failure.kind, calls=calls, server=self._where)
        return ClassifierUnavailable(scrub(message, self._secrets))

    async def _delay_before_retry(
        self, failure: AttemptFailed, attempt: int, attempts: int
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
            raise AttemptFailed(
                "timeout", f"no answer from the LLM server within {self._config.timeout_s:g} s"
            ) from None
        except httpx.HTTPError as exc:
            raise AttemptFailed(
                "connection", f"cannot talk to the LLM server ({type(exc).__name__})"
            ) from None
        elapsed_s = time.perf_counter() - started
        self.latency.observe(elapsed_s)
        self._latency_ms_sum += elapsed_s * 1000
        check_status(response)
        return read_answer(response.content, self._by_lower, _NAME)

    def snapshot(self) -> dict[str, int]:
        """Calls, errors by kind, retries, total latency, and the rate limiter's waits."""
        found = {name: self.tallies[name] for name in _TALLY_NAMES}
        found["llm_latency_ms_sum"] = round(self._latency_ms_sum)
        found.update(self._limiter.snapshot())
        return found

    async def aclose(self) -> None:
        if self.breaker is not None:
            await self.breaker.aclose()
        await self._client.aclose()
