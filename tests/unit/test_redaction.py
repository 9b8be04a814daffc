"""URLs are shown without their passwords."""

from __future__ import annotations

from worker.core.redaction import redact_url, scrub


def test_password_is_replaced() -> None:
    """The password of a Redis or AMQP URL never survives redaction; the rest stays readable."""
    assert redact_url("redis://:hunter2@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact_url("amqps://user:pw@mq.example:5671/vh") == "amqps://user:***@mq.example:5671/vh"
    assert redact_url("redis://cache:6379/0") == "redis://cache:6379/0"


def test_scrub_removes_secrets_from_free_text() -> None:
    """Error messages that echo a secret are cleaned before they are logged."""
    assert scrub("auth failed for hunter2", ("hunter2", "")) == "auth failed for ***"
