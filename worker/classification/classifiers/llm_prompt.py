"""What the ``llm`` classifier asks: its configuration, the prompt file and the request it sends.

Prompt file format (``LLM_PROMPT_FILE``; the default is ``data/llm_prompt.json``)::

    {"version": 1,
     "system": "... {labels} ...",          # required, must contain {labels}
     "user": "{text}",                       # optional, must contain {text}
     "label_descriptions": {"spam": "..."}}  # optional; shown next to a label in {labels}

The request carries the rendered system prompt, ``temperature`` 0 and the answer format
``LLM_RESPONSE_FORMAT`` asks for: ``json_schema`` (a schema whose ``label`` is an enum of the
labels), ``json_object`` (JSON mode) or ``none`` (the prompt alone). Its fingerprint hashes
everything that shapes an answer, so the classifier's identity changes whenever an answer could.
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

__all__ = [
    "BACKOFF_BASE_S",
    "MAX_RETRY_AFTER_S",
    "TEMPERATURE",
    "LLMConfig",
    "PromptTemplate",
    "ResponseFormat",
    "base_request",
    "fingerprint",
]

TEMPERATURE: Final = 0
BACKOFF_BASE_S: Final = 0.5
# A longer Retry-After ends the classification (the cool-down still holds the cluster).
MAX_RETRY_AFTER_S: Final = 30.0

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
        """Parse a prompt file's JSON; ValueError names the first field that is wrong."""
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
        """Load a prompt file (format in the module docstring)."""
        return cls.from_json(Path(path).read_bytes())

    @classmethod
    def default(cls) -> PromptTemplate:
        """The prompt shipped with the package."""
        data = resources.files("worker.classification.classifiers").joinpath("data/llm_prompt.json")
        return cls.from_json(data.read_bytes())

    def render_system(self, labels: tuple[str, ...]) -> str:
        """The system prompt with ``{labels}`` replaced by one line per label."""
        lines = []
        for label in labels:
            description = self.label_descriptions.get(label)
            lines.append(f"- {label}: {description}" if description else f"- {label}")
        return self.system.replace("{labels}", "\n".join(lines))

    def render_user(self, text: str) -> str:
        """The user message for ``text``."""
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


def base_request(config: LLMConfig) -> dict[str, Any]:
    """The chat-completion request without its user message: model, temperature, system, format."""
    request: dict[str, Any] = {
        "model": config.model,
        "temperature": TEMPERATURE,
        "messages": [{"role": "system", "content": config.prompt.render_system(config.labels)}],
    }
    response_format = _response_format(config.response_format, config.labels)
    if response_format is not None:
        request["response_format"] = response_format
    return request


def fingerprint(config: LLMConfig, protocol_version: str) -> str:
    """A short hash of everything in a request that can change an answer."""
    shaping = {
        "protocol": protocol_version,
        "system": config.prompt.render_system(config.labels),
        "user": config.prompt.user,
        "labels": config.labels,
        "response_format": config.response_format,
        "temperature": TEMPERATURE,
    }
    return hashlib.sha256(orjson.dumps(shaping, option=orjson.OPT_SORT_KEYS)).hexdigest()[:12]


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


def request_headers(config: LLMConfig) -> dict[str, str]:
    """The request headers: JSON, and the API key as a bearer token when there is one."""
    headers = {"Content-Type": "application/json"}
    key = config.api_key.get_secret_value()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return headers


def secrets_of(config: LLMConfig) -> tuple[str, ...]:
    found = [config.api_key.get_secret_value()]
    with contextlib.suppress(ValueError):
        found.append(urlsplit(config.base_url).password or "")
    return tuple(secret for secret in found if secret)
