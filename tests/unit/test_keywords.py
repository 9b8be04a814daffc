"""Unit tests for the embedded keyword classifier."""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import pytest

from worker.classification.classifiers.base import Classifier
from worker.classification.classifiers.keywords import (
    KeywordClassifier,
    KeywordRules,
    LabelRule,
    SignalRule,
)
from worker.cli.samples import labelled_sample_texts

LABELLED_EXAMPLES = [
    ("question", "Подскажите, сколько идёт посылка в Казань?"),
    ("question", "Какими способами можно оплатить"),
    ("question", "Работаете ли вы в выходные"),
    ("question", "How do I change my delivery address?"),
    ("question", "Where's my parcel"),
    ("complaint", "Товар бракованный, верните деньги"),
    ("complaint", "Посылка пришла повреждённой, требую возврат"),
    ("complaint", "Курьер опоздал на два часа и нахамил"),
    ("complaint", "The parcel was damaged and the charger doesn’t work"),
    ("complaint", "Still haven't got my money back, this is ridiculous"),
    ("order", "Хочу заказать две пиццы и оплатить картой"),
    ("order", "Закажу ещё три штуки"),
    ("order", "Оформляю заказ на 5 штук"),
    ("order", "I would like to purchase two tickets"),
    ("order", "Please add two more to my order"),
    ("greeting", "Здравствуйте!"),
    ("greeting", "Благодарю, всего доброго"),
    ("greeting", "Good morning, thank you!"),
    ("greeting", "hey there"),
    ("spam", "Заработок в интернете без вложений, пиши в лс"),
    ("spam", "Вы выиграли миллион! Забирайте приз на prize-win.xyz"),
    ("spam", "Earn crypto fast, click here: bit.ly/xyz"),
    ("spam", "Make money from home, guaranteed income"),
    ("other", "Я буду дома после пяти"),
    ("other", "I am at the office until 5"),
    ("other", "His history homework"),
]


def make_rules(
    labels: dict[str, list[str]],
    *,
    fallback: str = "other",
    signals: tuple[SignalRule, ...] = (),
) -> KeywordRules:
    """Build small rules: every label weighs 1.0 and the fallback label is appended last."""
    rules = [LabelRule(name, 1.0, tuple(keywords)) for name, keywords in labels.items()]
    if fallback not in labels:
        rules.append(LabelRule(fallback, 1.0, ()))
    return KeywordRules(labels=tuple(rules), fallback=fallback, signals=signals)


def write_json(tmp_path: Path, document: object) -> Path:
    """Write ``document`` as a JSON data file and return its path."""
    path = tmp_path / "rules.json"
    path.write_text(json.dumps(document, ensure_ascii=False), encoding="utf-8")
    return path


def valid_document() -> dict[str, object]:
    """Return a small valid data file document."""
    return {
        "version": 1,
        "fallback": "other",
        "labels": {"order": {"weight": 1.0, "keywords": ["заказ*"]}, "other": {}},
    }


@pytest.fixture(scope="module")
def classifier() -> KeywordClassifier:
    """The classifier with the shipped default rules."""
    return KeywordClassifier.default()


@pytest.mark.parametrize(("label", "text"), LABELLED_EXAMPLES)
async def test_default_rules_recognise_each_label(
    classifier: KeywordClassifier, label: str, text: str
) -> None:
    """Typical Russian and English messages get their label from the default rules."""
    result = await classifier.classify(text)
    assert result.label == label


def test_default_rules_agree_with_the_labelled_sample_pool(classifier: KeywordClassifier) -> None:
    """The default rules give at least 95% of the labelled sample texts their expected label."""
    samples = labelled_sample_texts()
    agreed = sum(classifier.classify_sync(s.text).label == s.label for s in samples)
    assert agreed / len(samples) >= 0.95


@pytest.mark.parametrize("word", ["заказ", "заказа", "заказать", "заказы", "заказала", "Заказов"])
def test_stem_matches_inflected_russian_forms(word: str) -> None:
    """A stem keyword such as ``заказ*`` matches every inflected form that starts with it."""
    classifier = KeywordClassifier(make_rules({"order": ["заказ*"]}))
    assert classifier.classify_sync(f"Мой {word} где-то потерялся").label == "order"


def test_word_without_star_matches_only_the_whole_word() -> None:
    """A keyword without ``*`` matches the whole word only, so ``hi`` does not match ``his``."""
    classifier = KeywordClassifier(make_rules({"greeting": ["hi"]}))
    assert classifier.classify_sync("hi there").label == "greeting"
    assert classifier.classify_sync("his history").label == "other"


def test_phrase_matches_consecutive_words_only() -> None:
    """A phrase keyword matches only when its words follow each other, each by its own rule."""
    classifier = KeywordClassifier(make_rules({"complaint": ["не работ*"]}))
    assert classifier.classify_sync("Кнопка не работает").label == "complaint"
    assert classifier.classify_sync("Не знаю, работает ли").label == "other"


def test_yo_and_typographic_apostrophes_are_folded() -> None:
    """``ё`` matches keywords written with ``е`` and a typographic apostrophe matches ``'``."""
    classifier = KeywordClassifier(make_rules({"complaint": ["пришел", "doesn't"]}))
    assert classifier.classify_sync("Не пришёл").label == "complaint"
    assert classifier.classify_sync("It doesn’t").label == "complaint"


async def test_unmatched_text_falls_back_to_other(classifier: KeywordClassifier) -> None:
    """Text matching no keyword, including empty text, gets the fallback label at 0.3."""
    for text in ["", "   ", "Я буду дома после пяти", "12345"]:
        result = await classifier.classify(text)
        assert (result.label, result.confidence) == ("other", 0.3)


def test_confidence_is_in_range_and_rounded(classifier: KeywordClassifier) -> None:
    """Every confidence is in (0, 1] and rounded to 3 decimals."""
    texts = [text for _, text in LABELLED_EXAMPLES] + [s.text for s in labelled_sample_texts()]
    for text in texts:
        confidence = classifier.classify_sync(text).confidence
        assert 0 < confidence <= 1
        assert confidence == round(confidence, 3)


def test_confidence_grows_with_agreeing_keywords() -> None:
    """More keywords of the winning label give a higher confidence; one lone keyword gives 0.5."""
    classifier = KeywordClassifier(make_rules({"complaint": ["ужас*", "кошмар*"]}))
    one = classifier.classify_sync("ужасно").confidence
    two = classifier.classify_sync("ужасно, кошмар").confidence
    assert one == 0.5
    assert two > one


def test_ties_go_to_the_label_listed_first() -> None:
    """When two labels score the same, the one listed first in the rules wins."""
    first = KeywordClassifier(make_rules({"question": ["when"], "complaint": ["late"]}))
    second = KeywordClassifier(make_rules({"complaint": ["late"], "question": ["when"]}))
    assert first.classify_sync("when late").label == "question"
    assert second.classify_sync("when late").label == "complaint"
    assert first.identity != second.identity


def test_question_mark_and_url_signals_add_weight() -> None:
    """A ``?`` counts toward its label and a link (but not an e-mail address) toward its own."""
    signals = (SignalRule("question_mark", "question", 1.0), SignalRule("url", "spam", 1.0))
    classifier = KeywordClassifier(make_rules({"question": [], "spam": []}, signals=signals))
    assert classifier.classify_sync("Ну и?").label == "question"
    for link in ["https://x.example/win", "www.win.example", "заходи на win-bet.xyz", "t.me/chan"]:
        assert classifier.classify_sync(link).label == "spam"
    assert classifier.classify_sync("пишите на ivan.petrov@mail.ru").label == "other"


def test_name_identity_and_classifier_field(classifier: KeywordClassifier) -> None:
    """The classifier is named ``keywords`` and says so in its identity and every answer."""
    assert classifier.name == "keywords"
    assert re.fullmatch(r"keywords:v1:[0-9a-f]{12}", classifier.identity)
    assert classifier.classify_sync("привет").classifier == "keywords"


def test_identity_changes_when_rules_change() -> None:
    """Adding a keyword or changing a weight changes the identity; reordering keywords does not."""
    base = KeywordClassifier(make_rules({"order": ["заказ*", "buy"]})).identity
    reordered = KeywordClassifier(make_rules({"order": ["BUY", "заказ*"]})).identity
    extended = KeywordClassifier(make_rules({"order": ["заказ*", "buy", "куп*"]})).identity
    heavier = KeywordClassifier(
        KeywordRules(
            labels=(LabelRule("order", 2.0, ("заказ*", "buy")), LabelRule("other", 1.0, ())),
            fallback="other",
        )
    ).identity
    assert base == reordered
    assert len({base, extended, heavier}) == 3


def test_from_file_loads_a_valid_file(tmp_path: Path) -> None:
    """A valid data file loads and its keywords classify."""
    classifier = KeywordClassifier.from_file(write_json(tmp_path, valid_document()))
    assert classifier.labels == ("order", "other")
    assert classifier.classify_sync("Где заказы?").label == "order"


@pytest.mark.parametrize(
    ("document", "problem"),
    [
        ([1, 2], "top level must be a JSON object"),
        ({**valid_document(), "version": 2}, "unsupported version"),
        ({**valid_document(), "labels": {}}, "label set is empty"),
        ({**valid_document(), "labels": []}, "'labels' must be an object"),
        ({**valid_document(), "fallback": "unknown"}, "fallback label 'unknown'"),
        ({**valid_document(), "fallback": None}, "'fallback' must be a string"),
        ({**valid_document(), "lables": {}}, "unknown keys \\['lables'\\]"),
        ({**valid_document(), "labels": {"other": {"keyword": []}}}, "unknown keys"),
        ({**valid_document(), "labels": {"other": {"weight": 0}}}, "weight must be"),
        ({**valid_document(), "labels": {"other": {"keywords": "как"}}}, "list of strings"),
        ({**valid_document(), "labels": {"other": {"keywords": ["e-mail"]}}}, "could never match"),
        ({**valid_document(), "labels": {"other": {"keywords": ["к*"]}}}, "shorter than"),
        ({**valid_document(), "fallback_confidence": 1.5}, "fallback_confidence"),
        ({**valid_document(), "signals": {"caps": {"label": "other"}}}, "unknown signal 'caps'"),
        ({**valid_document(), "signals": {"url": {"label": "spam"}}}, "unknown label 'spam'"),
    ],
)
def test_invalid_data_file_raises_value_error_naming_file_and_problem(
    tmp_path: Path, document: object, problem: str
) -> None:
    """An invalid data file raises ValueError naming the file and what is wrong with it."""
    path = write_json(tmp_path, document)
    with pytest.raises(ValueError, match=problem) as caught:
        KeywordClassifier.from_file(path)
    assert str(caught.value).startswith(f"{path}: ")


def test_file_that_is_not_json_raises_value_error(tmp_path: Path) -> None:
    """A data file that is not JSON raises ValueError naming the file."""
    path = tmp_path / "broken.json"
    path.write_text('{"version": 1,', encoding="utf-8")
    with pytest.raises(ValueError, match="not valid UTF-8 JSON") as caught:
        KeywordClassifier.from_file(path)
    assert str(path) in str(caught.value)


async def test_delay_s_delays_each_classification() -> None:
    """With ``delay_s`` set, classify takes at least that long and still answers."""
    classifier = KeywordClassifier.default(delay_s=0.05)
    started = time.perf_counter()
    result = await classifier.classify("Где мой заказ?")
    assert time.perf_counter() - started >= 0.05
    assert result.label == "question"


def test_negative_delay_is_rejected() -> None:
    """A negative simulated latency raises ValueError."""
    with pytest.raises(ValueError, match="delay_s"):
        KeywordClassifier.default(delay_s=-1.0)


async def test_fits_the_classifier_protocol_and_aclose_is_harmless() -> None:
    """The classifier satisfies the Classifier protocol and keeps working after ``aclose``."""
    classifier: Classifier = KeywordClassifier.default()
    await classifier.aclose()
    await classifier.aclose()
    assert (await classifier.classify("привет")).label == "greeting"
