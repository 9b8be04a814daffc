"""The Grafana dashboard and the Prometheus alerts: valid, tested by promtool, and built only on
metric names a real replica serves at /metrics."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from deploy_support import REPO

from tests.conftest import Names
from tests.integration.llm_server import FakeLLM, replica_env
from tests.integration.support import Replicas

DASHBOARD = REPO / "deploy" / "grafana" / "neiromatrius.json"
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
ALERTS_TEST = REPO / "deploy" / "prometheus" / "alerts_test.yml"

# Labels Prometheus adds to every scraped sample (not in the exposition itself).
TARGET_LABELS = frozenset({"job", "instance"})
# PromQL words that look like metric names: aggregations, their modifiers, set operators.
PROMQL_WORDS = frozenset(
    {
        "sum", "min", "max", "avg", "count", "group", "stddev", "stdvar", "topk", "bottomk",
        "quantile", "count_values", "by", "without", "on", "ignoring", "group_left",
        "group_right", "and", "or", "unless", "bool", "offset", "atan2", "inf", "nan",
    }
)  # fmt: skip
LABEL_LISTS = re.compile(r"\b(by|without|on|ignoring|group_left|group_right)\s*\(([^)]*)\)")
SELECTOR = re.compile(r"([a-zA-Z_:][\w:]*)\s*\{([^}]*)\}")
MATCHER = re.compile(r'(\w+)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


@dataclass(slots=True)
class Usage:
    """What a set of PromQL expressions relies on: metric names, ``name{label="value"}``
    equality matchers, and the labels they group or match on."""

    names: set[str] = field(default_factory=set)
    matchers: set[tuple[str, str, str]] = field(default_factory=set)
    labels: set[str] = field(default_factory=set)

    def add(self, expr: str) -> None:
        for name, inside in SELECTOR.findall(expr):
            for label, op, value in MATCHER.findall(inside):
                self.labels.add(label)
                if op == "=" and label not in TARGET_LABELS:
                    self.matchers.add((name, label, value))
        for _, listed in LABEL_LISTS.findall(expr):
            self.labels.update(word.strip() for word in listed.split(",") if word.strip())
        self.names.update(metric_names(expr))


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads (functions, keywords, labels left out)."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)  # label matchers
    text = re.sub(r"\[[^\]]*\]", " ", text)  # ranges and subqueries
    text = LABEL_LISTS.sub(r" \1 ", text)
    found = set()
    for word, call in re.findall(r"(?<![\w:.$])([a-zA-Z_:][\w:]*)(\s*\()?", text):
        if not call and word.lower() not in PROMQL_WORDS:
            found.add(word)
    return found


@dataclass(frozen=True, slots=True)
class Exposition:
    """The samples of a /metrics page: names, and the label pairs each name carries."""

    labels_by_name: dict[str, set[tuple[str, str]]]

    @classmethod
    def parse(cls, text: str) -> Exposition:
        found: dict[str, set[tuple[str, str]]] = {}
        for line in text.splitlines():
            if not line or line.startswith("#"):
                continue
            match = re.match(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s", line)
            assert match, f"not a sample line: {line!r}"
            pairs = set(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            found.setdefault(match.group(1), set()).update(pairs)
        return cls(found)

    @property
    def label_names(self) -> set[str]:
        return {label for pairs in self.labels_by_name.values() for label, _ in pairs}


def panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that shows data (rows left out, panels inside collapsed rows included)."""
    for panel in dashboard["panels"]:
        if panel.get("type") == "row":
            yield from panel.get("panels", [])
        else:
            yield panel


def load_dashboard() -> dict[str, Any]:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def load_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def used_by_dashboard_and_alerts() -> Usage:
    """Everything the dashboard's queries and variables and the alert expressions rely on."""
    usage = Usage()
    dashboard = load_dashboard()
    for panel in panels(dashboard):
        for target in panel["targets"]:
            usage.add(target["expr"])
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]["query"]
            values = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", query)
            assert values, f"unexpected variable query {query!r}"
            usage.names.add(values.group(1))
            usage.labels.add(values.group(2))
    for rule in load_rules():
        usage.add(rule["expr"])
    return usage


def promtool() -> str:
    found = shutil.which("promtool")
    assert found, "promtool is not installed (Debian: apt-get install prometheus; scripts/test.sh)"
    return found


def run_promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [promtool(), *args], cwd=REPO, capture_output=True, text=True, timeout=60, check=False
    )


def test_promtool_checks_the_rules() -> None:
    """``promtool check rules`` accepts alerts.yml."""
    done = run_promtool("check", "rules", str(ALERTS.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_promtool_unit_tests_of_the_alerts_pass() -> None:
    """``promtool test rules`` passes alerts_test.yml."""
    done = run_promtool("test", "rules", str(ALERTS_TEST.relative_to(REPO)))
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS" in done.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    """Each alert of alerts.yml has a unit test where it fires and one where it stays silent."""
    tests = yaml.safe_load(ALERTS_TEST.read_text(encoding="utf-8"))
    assert tests["rule_files"] == [ALERTS.name]
    firing: set[str] = set()
    silent: set[str] = set()
    for case in tests["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else silent).add(check["alertname"])
    alerts = {rule["alert"] for rule in load_rules()}
    assert alerts - firing == set(), "alerts never tested firing"
    assert alerts - silent == set(), "alerts never tested silent"
    assert (firing | silent) - alerts == set(), "tests of alerts that do not exist"


def test_every_alert_has_a_duration_labels_and_a_runbook() -> None:
    """Each rule is an alert with ``for:``, a severity and service label, and a summary,
    description and runbook annotation; the alerts the issue names are all there."""
    rules = load_rules()
    for rule in rules:
        name = rule.get("alert")
        assert name, f"a recording rule or a rule without a name: {rule}"
        assert re.fullmatch(r"\d+[smh]", str(rule.get("for", ""))), name
        assert rule["labels"]["severity"] in {"critical", "warning", "info"}, name
        assert rule["labels"]["service"] == "neiromatrius-worker", name
        annotations = rule["annotations"]
        for key in ("summary", "description", "runbook"):
            assert str(annotations.get(key, "")).strip(), f"{name} has no {key}"
        assert "deploy/README.md" in annotations["runbook"], name
    alerts = {rule["alert"] for rule in rules}
    assert {
        "NeiromatriusRedisDown",
        "NeiromatriusRedisMemoryFull",
        "NeiromatriusDeadLettersRising",
        "NeiromatriusStalled",
        "NeiromatriusClaimLeasesLost",
    } <= alerts


def test_every_dashboard_panel_has_a_datasource_and_a_query() -> None:
    """The dashboard parses; its data source is a Prometheus variable; every panel and target
    uses it and has a query; panel ids are unique."""
    dashboard = load_dashboard()
    assert 36 <= dashboard["schemaVersion"] <= 41
    assert dashboard["uid"]
    assert dashboard["title"]
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    source = {"type": "prometheus", "uid": "${datasource}"}
    shown = list(panels(dashboard))
    assert len(shown) >= 20
    for panel in shown:
        title = panel["title"]
        assert panel["datasource"] == source, title
        assert panel["targets"], f"{title} has no query"
        for target in panel["targets"]:
            assert target["datasource"] == source, title
            assert target["expr"].strip(), title
        assert {"h", "w", "x", "y"} <= panel["gridPos"].keys(), title
    for variable in variables.values():
        if variable["type"] == "query":
            assert variable["datasource"] == source
    nested = [p for row in dashboard["panels"] for p in row.get("panels", [])]
    ids = [p["id"] for p in [*dashboard["panels"], *nested]]
    assert len(ids) == len(set(ids))


def test_the_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """Every dashboard query, its Grafana variables filled in, parses as PromQL: promtool checks
    them as recording rules."""
    exprs = [t["expr"] for p in panels(load_dashboard()) for t in p["targets"]]
    filled = [e.replace("$__rate_interval", "2m").replace("$job", ".+") for e in exprs]
    assert all("$" not in e for e in filled), "a Grafana variable promtool cannot read"
    rules = [{"record": f"dashboard:query{i}", "expr": e} for i, e in enumerate(filled)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    done = run_promtool("check", "rules", str(path))
    assert done.returncode == 0, done.stdout + done.stderr
    assert f"SUCCESS: {len(rules)} rules found" in done.stdout


def test_the_dashboard_covers_what_an_operator_watches() -> None:
    """The dashboard shows throughput, duplicates, the cache tiers, the classifier, rate-limit
    waits, leases, retries, dead letters, Redis and the queues."""
    names = used_by_dashboard_and_alerts().names
    for needed in (
        "neiromatrius_processed_total",
        "neiromatrius_duplicates_total",
        "neiromatrius_cache_local_hits_total",
        "neiromatrius_cache_redis_hits_total",
        "neiromatrius_classifier_calls_total",
        "neiromatrius_llm_latency_ms_sum_total",
        "neiromatrius_rate_limit_waits_total",
        "neiromatrius_claims_lost_total",
        "neiromatrius_retried_total",
        "neiromatrius_dead_lettered_total",
        "neiromatrius_redis_connected",
        "neiromatrius_redis_used_memory_bytes",
        "neiromatrius_redis_connected_clients",
        "neiromatrius_redis_ops_per_second",
        "neiromatrius_queue_messages",
        "neiromatrius_in_flight",
    ):
        assert needed in names, needed


def test_metric_names_are_read_from_promql() -> None:
    """The name extraction finds the metrics of an expression and nothing else (functions,
    labels, grouping, ranges, Grafana variables), so the check below cannot pass vacuously."""
    expr = (
        'histogram_quantile(0.99, sum by (le) (rate(a_seconds_bucket{job=~"$job"}[$__rate_interval])))'
        ' / on (job, instance) group_left (replica) b_info{queue="input"} > bool 1e3'
        " or absent(c_total offset 5m) unless max without (x) (d[10m:1m])"
    )
    assert metric_names(expr) == {"a_seconds_bucket", "b_info", "c_total", "d"}
    usage = Usage()
    usage.add(expr)
    assert usage.matchers == {("b_info", "queue", "input")}
    assert usage.labels == {"job", "queue", "le", "instance", "replica", "x"}


@pytest.mark.integration
async def test_every_metric_used_is_one_a_replica_exports(
    names: Names, redis_client: object, amqp: object, tmp_path: Path
) -> None:
    """Every metric name, label value and grouping label the dashboard and the alerts use is in
    the /metrics of a real replica (LLM classifier, Redis and RabbitMQ reachable)."""
    replicas = Replicas(tmp_path)
    try:
        async with FakeLLM() as llm:
            replica = replicas.start(replica_env(llm, names.env()))
            await replica.started()
            exposition = Exposition.parse(await scrape_when_complete(replica.stats_port))
    finally:
        replicas.close()
    usage = used_by_dashboard_and_alerts()
    exported = exposition.labels_by_name
    assert sorted(usage.names - exported.keys()) == []
    missing = [m for m in usage.matchers if (m[1], m[2]) not in exported.get(m[0], set())]
    assert sorted(missing) == []
    assert sorted(usage.labels - exposition.label_names - TARGET_LABELS - {"le"}) == []


async def scrape_when_complete(port: int, timeout_s: float = 15.0) -> str:
    """/metrics once Redis is connected and the queue depths are known (both may lag the start)."""
    deadline = time.monotonic() + timeout_s
    text = ""
    async with httpx.AsyncClient(timeout=10) as client:
        while time.monotonic() < deadline:
            response = await client.get(f"http://127.0.0.1:{port}/metrics")
            assert response.status_code == 200
            text = response.text
            if "neiromatrius_redis_connected 1.0" in text and 'queue="dead_letter"' in text:
                return text
            await asyncio.sleep(0.1)
    raise AssertionError(f"/metrics incomplete after {timeout_s}s:\n{text}")
