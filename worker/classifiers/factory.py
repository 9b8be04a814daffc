"""Builds the classifier the settings ask for."""

from __future__ import annotations

from worker.classifiers.base import Classifier
from worker.classifiers.keywords import KeywordClassifier
from worker.errors import ConfigError
from worker.settings import Settings


def build_classifier(settings: Settings) -> Classifier:
    delay_s = settings.classifier_delay_ms / 1000
    if settings.classifier == "keywords":
        if settings.keywords_file:
            try:
                return KeywordClassifier.from_file(settings.keywords_file, delay_s=delay_s)
            except (OSError, ValueError) as exc:
                raise ConfigError(f"invalid setting KEYWORDS_FILE: {exc}") from None
        return KeywordClassifier.default(delay_s=delay_s)
    raise ConfigError(
        "invalid setting CLASSIFIER: 'llm' is not available in this version yet; use 'keywords'"
    )
