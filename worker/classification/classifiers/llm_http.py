"""One exchange with the LLM server, read into a classification or an ``AttemptFailed``.

Answer: the message content must hold a JSON object ``{"label": ..., "confidence": ...}``
(surrounding prose or a code fence is tolerated), validated with pydantic. The label must be one of
the configured labels (case-insensitive); anything else is an error, never a result.
``confidence`` is optional (1.0 when missing) and clamped to [0, 1]. A 429's wait comes from
``retry-after-ms`` or ``Retry-After`` (seconds or an HTTP date).

Each failure says whose it is (``Blame``), which decides whether the circuit breaker hears of it:
the provider's (timeouts, connection errors, 5xx, 429), the configuration's (401/403: the key;
404: the model or URL; a 400 that names ``response_format``: the answer format), or the message's
(an answer that fails validation, any other 4xx), which never counts toward the breaker.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from enum import Enum
from typing import Final

import httpx
from pydantic import BaseModel, Field, ValidationError

from worker.classification.breaker import CONFIGURATION, PROVIDER, Failure
from worker.core.classification import Classification

__all__ = [
    "ERROR_KINDS",
    "AttemptFailed",
    "Blame",
    "breaker_failure",
    "check_status",
    "read_answer",
    "retry_after_s",
]

# What an operator must fix when the server refuses the configuration (one line each).
_CONFIG_HINTS: Final = {
    401: "the LLM server refused the key (HTTP 401): check LLM_API_KEY",
    403: "the LLM server refused the key (HTTP 403): check LLM_API_KEY",
    404: "the LLM server does not know the model or the path (HTTP 404): check LLM_MODEL and "
    "LLM_BASE_URL",
}
_FORMAT_HINT: Final = (
    "the LLM server rejects the answer format (HTTP 400 on response_format): check "
    "LLM_RESPONSE_FORMAT (json_object or none)"
)
# Every ``AttemptFailed.kind``: each has its tally, ``llm_errors_{kind}``.
ERROR_KINDS: Final = (
    "timeout",
    "connection",
    "rate_limited",
    "server_error",
    "http_error",
    "invalid_answer",
    "unknown_label",
)


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    message: _Message


class _Completion(BaseModel):
    choices: list[_Choice] = Field(min_length=1)


class _Answer(BaseModel):
    label: str
    confidence: float | None = Field(default=None, allow_inf_nan=False)


class Blame(Enum):
    """Whose failure an exchange is: only the provider's and the configuration's reach the
    circuit breaker."""

    PROVIDER = "provider"
    CONFIGURATION = "configuration"
    MESSAGE = "message"


class AttemptFailed(Exception):
    """One HTTP exchange that did not give a classification; ``kind`` names it in the tallies."""

    def __init__(
        self,
        kind: str,
        detail: str,
        *,
        retryable: bool = True,
        retry_after_s: float | None = None,
        blame: Blame = Blame.PROVIDER,
    ) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.retryable = retryable
        self.retry_after_s = retry_after_s
        self.blame = blame


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


def check_status(response: httpx.Response) -> None:
    """Raise ``AttemptFailed`` unless the server answered 2xx."""
    status = response.status_code
    if status == 429:
        raise AttemptFailed(
            "rate_limited", "HTTP 429", retry_after_s=retry_after_s(response.headers)
        )
    if status >= 500:
        raise AttemptFailed("server_error", f"the LLM server answered HTTP {status}")
    if 200 <= status < 300:
        return
    # A bad key or model will not fix itself in a second: the breaker pauses the cluster.
    hint = _CONFIG_HINTS.get(status)
    if hint is None and status == 400 and b"response_format" in response.content:
        hint = _FORMAT_HINT
    if hint is not None:
        raise AttemptFailed("http_error", hint, retryable=False, blame=Blame.CONFIGURATION)
    raise AttemptFailed("http_error", f"HTTP {status}", retryable=False, blame=Blame.MESSAGE)


def read_answer(content: bytes, by_lower: Mapping[str, str], name: str) -> Classification:
    """Read a chat completion into a classification; ``by_lower`` maps folded labels to labels."""
    try:
        completion = _Completion.model_validate_json(content)
    except ValidationError:
        raise AttemptFailed(
            "invalid_answer", "the LLM server's reply is not a chat completion", blame=Blame.MESSAGE
        ) from None
    answer_text = _json_object_in(completion.choices[0].message.content or "")
    try:
        answer = _Answer.model_validate_json(answer_text)
    except ValidationError:
        raise AttemptFailed(
            "invalid_answer",
            "the model's answer is not the JSON object asked for",
            blame=Blame.MESSAGE,
        ) from None
    # The label itself is never echoed: model output may quote the message text.
    label = by_lower.get(answer.label.strip().lower())
    if label is None:
        raise AttemptFailed(
            "unknown_label", "the model named a label outside LLM_LABELS", blame=Blame.MESSAGE
        )
    confidence = 1.0 if answer.confidence is None else min(1.0, max(0.0, answer.confidence))
    return Classification(label, round(confidence, 3), name)


def _json_object_in(content: str) -> str:
    """The JSON object of an answer, tolerating a code fence or words around it."""
    stripped = content.strip()
    if stripped.startswith("{"):
        return stripped
    start, end = stripped.find("{"), stripped.rfind("}")
    return stripped[start : end + 1] if 0 <= start < end else stripped


def breaker_failure(failed: AttemptFailed | None, max_retry_after_s: float) -> Failure | None:
    """What the breaker hears of an exchange: nothing when the server answered (a message's own
    failure included) or sent a 429 whose ``Retry-After`` the limiter can honour."""
    if failed is None or failed.blame is Blame.MESSAGE:
        return None
    after_s = failed.retry_after_s
    if failed.kind == "rate_limited" and after_s is not None and after_s <= max_retry_after_s:
        return None
    kind = CONFIGURATION if failed.blame is Blame.CONFIGURATION else PROVIDER
    return Failure(kind, failed.detail)
