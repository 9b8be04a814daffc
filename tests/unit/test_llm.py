"""The LLM classifier against a local chat-completions server: requests, answers, retries, secrets."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import SecretStr

from tests.integration.llm_server import DEFAULT_LABELS, FakeLLM, Reply
from worker.classification.classifiers.factory import build_classifier
from worker.classification.classifiers.llm import (
    LLMClassifier,
    LLMConfig,
    PromptTemplate,
    retry_after_s,
)
from worker.classification.ratelimit import RateLimiter
from worker.core.classification import Classification
from worker.core.errors import ClassifierUnavailable, ConfigError
from worker.core.settings import load_settings
from worker.redisio.keys import RedisKeys

API_KEY = "sk-unit-7f3a9c1e5b2d"


def make(llm: FakeLLM, **overrides: Any) -> LLMClassifier:
    config = LLMConfig(
        base_url=llm.base_url,
        model="test-model",
        labels=DEFAULT_LABELS,
        prompt=PromptTemplate.default(),
        api_key=SecretStr(API_KEY),
        timeout_s=2.0,
        max_retries=3,
        backoff_base_s=0.05,
    )
    return LLMClassifier(
        dataclasses.replace(config, **overrides), RateLimiter(0, RedisKeys("unit:"))
    )


@pytest.fixture
async def llm() -> AsyncIterator[FakeLLM]:
    async with FakeLLM() as server:
        yield server


async def test_a_valid_answer_is_a_classification(llm: FakeLLM) -> None:
    """One request carries the model, the labels, the JSON schema and the key; its answer is the result."""
    classifier = make(llm)
    try:
        text = "Когда   доставка?"
        result = await classifier.classify(text)
        assert result == Classification(llm.label_for(text), 0.9, "llm")
        (request,) = llm.requests
        assert request.model == "test-model"
        assert request.authorization == f"Bearer {API_KEY}"
        assert request.text == "Когда доставка?"  # normalised, as for the cache key
        system = request.body["messages"][0]["content"]
        assert all(f"- {label}" in system for label in DEFAULT_LABELS)
        schema = request.body["response_format"]["json_schema"]["schema"]
        assert schema["properties"]["label"]["enum"] == list(DEFAULT_LABELS)
        assert request.body["temperature"] == 0
    finally:
        await classifier.aclose()


async def test_invalid_answers_are_retried_until_a_valid_one(llm: FakeLLM) -> None:
    """Not-JSON and unknown-label answers are errors, retried; the valid third answer wins."""
    classifier = make(llm)
    try:
        llm.script("hello", Reply.not_json(), Reply.unknown_label(), Reply.ok("greeting", 0.7))
        assert await classifier.classify("hello") == Classification("greeting", 0.7, "llm")
        assert len(llm.requests) == 3
        tallies = classifier.snapshot()
        assert (tallies["llm_errors_invalid_answer"], tallies["llm_errors_unknown_label"]) == (1, 1)
        assert tallies["llm_retries"] == 2
    finally:
        await classifier.aclose()


async def test_answers_that_stay_invalid_make_the_classifier_unavailable(llm: FakeLLM) -> None:
    """After 1 + LLM_MAX_RETRIES bad answers the classification fails as a transient error."""
    classifier = make(llm, max_retries=2)
    try:
        llm.script("spam?", Reply.unknown_label(), Reply.unknown_label(), Reply.unknown_label())
        with pytest.raises(ClassifierUnavailable, match="outside LLM_LABELS"):
            await classifier.classify("spam?")
        assert len(llm.requests) == 3
        assert classifier.snapshot()["llm_failures"] == 1
    finally:
        await classifier.aclose()


async def test_server_errors_back_off_exponentially(llm: FakeLLM) -> None:
    """5xx answers are retried after growing, jittered delays (at least half of base * 2^n)."""
    classifier = make(llm, backoff_base_s=0.1)
    try:
        llm.script("x", Reply.server_error(500), Reply.server_error(503), Reply.ok("other"))
        assert (await classifier.classify("x")).label == "other"
        first, second, third = llm.requests
        assert second.received_at - first.answered_at >= 0.05
        assert third.received_at - second.answered_at >= 0.1
        assert classifier.snapshot()["llm_errors_server_error"] == 2
    finally:
        await classifier.aclose()


async def test_429_waits_for_retry_after(llm: FakeLLM) -> None:
    """A 429 with Retry-After delays the next call by at least that long."""
    classifier = make(llm)
    try:
        llm.script("x", Reply.rate_limited(0.4), Reply.ok("order"))
        assert (await classifier.classify("x")).label == "order"
        first, second = llm.requests
        assert second.received_at - first.answered_at >= 0.4
        assert classifier.snapshot()["rate_limit_cool_downs"] == 1
    finally:
        await classifier.aclose()


async def test_a_retry_after_too_long_ends_the_classification(llm: FakeLLM) -> None:
    """A Retry-After beyond what one classification may wait fails it at once (the worker retries)."""
    classifier = make(llm, max_retry_after_s=0.5)
    try:
        llm.script("x", Reply.rate_limited(5))
        with pytest.raises(ClassifierUnavailable, match="HTTP 429"):
            await classifier.classify("x")
        assert len(llm.requests) == 1
    finally:
        await classifier.aclose()


async def test_client_errors_are_not_retried_and_never_show_the_key(llm: FakeLLM) -> None:
    """A 401 (its body quoting the key) fails at once with a hint, and the key is nowhere in it."""
    classifier = make(llm)
    try:
        llm.script("x", Reply.http_error(401))
        with pytest.raises(ClassifierUnavailable) as raised:
            await classifier.classify("x")
        assert len(llm.requests) == 1
        assert "HTTP 401" in str(raised.value)
        assert "LLM_API_KEY" in str(raised.value)
        assert API_KEY not in str(raised.value)
        assert API_KEY not in repr(classifier.snapshot())
    finally:
        await classifier.aclose()


async def test_timeouts_are_retried() -> None:
    """A server slower than LLM_TIMEOUT_S counts as a timeout and the call is retried."""
    async with FakeLLM(latency_s=0.3) as slow:
        classifier = make(slow, timeout_s=0.1, max_retries=1)
        try:
            with pytest.raises(ClassifierUnavailable, match=r"within 0\.1 s"):
                await classifier.classify("x")
            assert classifier.snapshot()["llm_errors_timeout"] == 2
        finally:
            await classifier.aclose()


async def test_connection_errors_are_retried_then_reported_without_secrets() -> None:
    """An unreachable server gives connection errors, retried, then a clean transient failure."""
    url = "http://user:url-password-123@127.0.0.1:1/v1"
    classifier = LLMClassifier(
        LLMConfig(
            base_url=url,
            model="m",
            labels=DEFAULT_LABELS,
            prompt=PromptTemplate.default(),
            api_key=SecretStr(API_KEY),
            max_retries=1,
            backoff_base_s=0.01,
        ),
        RateLimiter(0, RedisKeys("unit:")),
    )
    try:
        with pytest.raises(ClassifierUnavailable) as raised:
            await classifier.classify("x")
        assert classifier.snapshot()["llm_errors_connection"] == 2
        assert API_KEY not in str(raised.value)
        assert "url-password-123" not in str(raised.value)
    finally:
        await classifier.aclose()


async def test_lenient_but_validated_answers(llm: FakeLLM) -> None:
    """A fenced answer, a label in other case, a missing or out-of-range confidence are read."""
    classifier = make(llm)
    try:
        llm.script("a", Reply(content='```json\n{"label": "Spam", "confidence": 1.7}\n```'))
        llm.script("b", Reply(content='{"label": "order"}'))
        assert await classifier.classify("a") == Classification("spam", 1.0, "llm")
        assert await classifier.classify("b") == Classification("order", 1.0, "llm")
    finally:
        await classifier.aclose()


async def test_identity_changes_with_everything_that_shapes_an_answer(llm: FakeLLM) -> None:
    """Model, prompt, labels and answer format each change the identity; nothing else does."""
    base = make(llm)
    variants = [
        make(llm, model="other-model"),
        make(llm, labels=("question", "other")),
        make(llm, response_format="json_object"),
        make(llm, prompt=PromptTemplate("Labels: {labels}. JSON please.")),
    ]
    same = make(llm, timeout_s=9, api_key=SecretStr("another-key"))
    try:
        identities = {base.identity, *(v.identity for v in variants)}
        assert len(identities) == 5
        assert same.identity == base.identity
        assert base.identity.startswith("llm:v1:test-model:")
    finally:
        for classifier in (base, *variants, same):
            await classifier.aclose()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Retry-After": "2"}, 2.0),
        ({"Retry-After": "0.5"}, 0.5),
        ({"retry-after-ms": "250", "Retry-After": "9"}, 0.25),
        ({"Retry-After": "Wed, 21 Oct 2015 07:28:10 GMT"}, 10.0),
        ({"Retry-After": "soon"}, None),
        ({}, None),
    ],
)
def test_retry_after_is_read_in_every_form(headers: dict[str, str], expected: float | None) -> None:
    """Retry-After in seconds or as an HTTP date, and retry-after-ms, are understood."""
    now = 1445412480.0  # 2015-10-21 07:28:00 GMT
    assert retry_after_s(httpx.Headers(headers), now=now) == expected


def test_prompt_file_is_validated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A prompt without {labels} stops start-up with a line naming LLM_PROMPT_FILE."""
    bad = tmp_path / "prompt.json"
    bad.write_text(json.dumps({"version": 1, "system": "Classify it."}), encoding="utf-8")
    monkeypatch.setenv("CLASSIFIER", "llm")
    monkeypatch.setenv("LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LLM_MODEL", "m")
    monkeypatch.setenv("LLM_PROMPT_FILE", str(bad))
    with pytest.raises(ConfigError, match=r"LLM_PROMPT_FILE: system: must contain \{labels\}"):
        build_classifier(load_settings())
    monkeypatch.setenv("LLM_PROMPT_FILE", str(tmp_path / "missing.json"))
    with pytest.raises(ConfigError, match="LLM_PROMPT_FILE: cannot read it"):
        build_classifier(load_settings())


async def test_factory_builds_the_llm_classifier(monkeypatch: pytest.MonkeyPatch) -> None:
    """CLASSIFIER=llm with a base URL and model gives an LLM classifier using LLM_LABELS."""
    monkeypatch.setenv("CLASSIFIER", "llm")
    monkeypatch.setenv("LLM_BASE_URL", "http://127.0.0.1:9/v1")
    monkeypatch.setenv("LLM_MODEL", "m")
    monkeypatch.setenv("LLM_LABELS", "Sales, support ,other")
    monkeypatch.delenv("LLM_PROMPT_FILE", raising=False)
    classifier = build_classifier(load_settings())
    try:
        assert isinstance(classifier, LLMClassifier)
        assert classifier.labels == ("sales", "support", "other")
    finally:
        await classifier.aclose()


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("LLM_LABELS", "question"),
        ("LLM_LABELS", "a,b,a"),
        ("LLM_LABELS", "good,bad.label"),
        ("LLM_MAX_RPS", "-1"),
        ("LLM_TIMEOUT_S", "0"),
        ("LLM_MAX_RETRIES", "-1"),
        ("LLM_RESPONSE_FORMAT", "xml"),
        ("SINGLE_FLIGHT_WAIT_S", "0"),
    ],
)
def test_bad_llm_settings_name_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    """Each bad LLM or single-flight value raises a ConfigError naming its variable."""
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError, match=f"invalid setting {variable}"):
        load_settings()


def test_llm_settings_defaults() -> None:
    """The defaults: unlimited rate, 30 s timeout, 3 retries, the six labels, JSON schema answers."""
    s = load_settings()
    assert (s.llm_max_rps, s.llm_timeout_s, s.llm_max_retries) == (0, 30, 3)
    assert s.llm_label_set == DEFAULT_LABELS
    assert (s.llm_response_format, s.single_flight_wait_s) == ("json_schema", 30)


async def test_concurrent_calls_share_the_connection_pool(llm: FakeLLM) -> None:
    """Many concurrent classifications all complete, one request each."""
    classifier = make(llm)
    try:
        texts = [f"text {i}" for i in range(50)]
        results = await asyncio.gather(*(classifier.classify(t) for t in texts))
        assert [r.label for r in results] == [llm.label_for(t) for t in texts]
        assert len(llm.requests) == 50
    finally:
        await classifier.aclose()


async def test_waiting_for_a_connection_does_not_count_against_the_timeout() -> None:
    """More concurrent classifications than connections queue for one, and none of them times
    out although the queue is longer than LLM_TIMEOUT_S."""
    async with FakeLLM(latency_s=0.2) as slow:
        config = LLMConfig(
            base_url=slow.base_url,
            model="m",
            labels=DEFAULT_LABELS,
            prompt=PromptTemplate.default(),
            timeout_s=0.3,
            max_retries=0,
        )
        classifier = LLMClassifier(config, RateLimiter(0, RedisKeys("unit:")), max_connections=2)
        try:
            results = await asyncio.gather(*(classifier.classify(f"t{i}") for i in range(6)))
            assert len(results) == 6
            assert classifier.snapshot()["llm_errors_timeout"] == 0
        finally:
            await classifier.aclose()
