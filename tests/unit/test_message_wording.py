"""Words a newcomer reads: the reasons given for a rejected message, the stats table's counts."""

from __future__ import annotations

import pytest

from worker.core.errors import InvalidMessage
from worker.core.models import parse_message
from worker.observability.stats import all_counters, rates
from worker.observability.table import render_table


@pytest.mark.parametrize(
    ("raw", "detail"),
    [
        (b'{"message_id": 17, "text": "x"}', "message_id must be a string, got int"),
        (b'{"message_id": ["a"], "text": "x"}', "message_id must be a string, got list"),
        (b'{"message_id": "1", "text": 12}', "text must be a string, got int"),
    ],
)
def test_a_field_of_the_wrong_type_is_named_with_the_type_expected_and_the_type_got(
    raw: bytes, detail: str
) -> None:
    """A non-string ``message_id`` or ``text`` is rejected with "must be a string, got <type>"."""
    with pytest.raises(InvalidMessage) as caught:
        parse_message(raw, None, 1000)
    assert caught.value.detail == detail


def test_the_stats_table_says_one_consumer_in_the_singular() -> None:
    """A queue with one consumer reads "1 consumer", with two "2 consumers"."""
    table = render_table(
        {
            "counters": all_counters({}),
            "rates": rates(all_counters({})),
            "throughput": {},
            "queues": {
                "input": {"name": "in", "messages": 5, "consumers": 1},
                "dead_letter": {"name": "dead", "messages": 0, "consumers": 2},
            },
        }
    )
    assert "in: 5 waiting, 1 consumer\n" in table + "\n"
    assert "dead: 0 waiting, 2 consumers" in table
