"""The monitoring kit in deploy/: alert rules and their promtool tests, the Grafana dashboard.

What is checked: the rules pass ``promtool check rules`` and their unit tests
(deploy/prometheus/alerts.test.yml, every alert both firing and quiet); every metric and label
the rules and the dashboard name exists in a running gateway's /metrics; every dashboard
expression is valid PromQL (checked by promtool as a recording rule); every LogQL query reads
access-log fields that exist; and a real Prometheus, scraping a test gateway with the admin
bearer token, takes a team past 80 % of its budget to a firing alert.

promtool and prometheus come from Debian's ``prometheus`` package
(``apt-get install prometheus``; .ci/run installs it). Without them these tests skip, saying
so; when ``CI`` is set in the environment they fail instead, so that CI cannot pass by skipping.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from gateway.ops.accesslog import FIELDS
from gateway.ops.metrics import Metrics
from tests.conftest import ADMIN_KEY, Gateway, Upstream
from tests.fakes import hang

ROOT = Path(__file__).resolve().parent.parent
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "image-gateway.json"

PROMTOOL_TIMEOUT_S = 60
PROMETHEUS_DEADLINE_S = 30
# Labels Prometheus adds to every scraped series, and the histogram bucket label.
SCRAPE_LABELS = {"job", "instance"}
# What Grafana puts in place of its variables, to make plain PromQL out of a panel's query.
GRAFANA_VARIABLES = {
    "$__rate_interval": "5m",
    "$__interval": "1m",
    "$__range": "1h",
    "$team": ".*",
}
LOKI_STREAM = '{job="image-gateway"}'


def binary(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = (
        f"{name} is not installed: these tests need Debian's prometheus package "
        "(apt-get install prometheus)"
    )
    if os.environ.get("CI"):
        pytest.fail(message + "; under CI they must run, not skip")
    pytest.skip(message)


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [binary("promtool"), *map(str, args)],
        capture_output=True,
        text=True,
        timeout=PROMTOOL_TIMEOUT_S,
        check=False,
    )


# ------------------------------------------------------------------ what the kit contains


def alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def all_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    """Every panel, including those inside a collapsed row."""
    for panel in panels:
        yield panel
        yield from all_panels(panel.get("panels", []))


def targets(kind: str) -> list[tuple[str, str]]:
    """(panel title, expression) of every query of the given data source type."""
    found = []
    for panel in all_panels(dashboard()["panels"]):
        for target in panel.get("targets", []):
            if (target.get("datasource") or panel["datasource"])["type"] == kind:
                found.append((panel["title"], target["expr"]))
    return found


def substitute(expr: str) -> str:
    for variable, value in GRAFANA_VARIABLES.items():
        expr = expr.replace(variable, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return expr


def promql_expressions() -> list[tuple[str, str]]:
    """(where, PromQL) of every rule and dashboard query, Grafana variables substituted."""
    rules = [(rule["alert"], rule["expr"]) for rule in alert_rules()]
    panels = [(title, substitute(expr)) for title, expr in targets("prometheus")]
    return rules + panels


# ------------------------------------------------------------------ what the gateway exposes


def declared_metrics() -> dict[str, tuple[str, ...]]:
    """Every series name the gateway can expose, with the labels it carries."""
    names: dict[str, tuple[str, ...]] = {}
    for collector in vars(Metrics()).values():
        if not isinstance(collector, MetricWrapperBase):
            continue
        labels = tuple(collector._labelnames)
        kind, base = collector._type, collector._name
        if kind == "counter":
            names[base + "_total"] = labels
        elif kind == "histogram":
            for suffix in ("_bucket", "_count", "_sum"):
                names[base + suffix] = (*labels, "le") if suffix == "_bucket" else labels
        else:
            names[base] = labels
    return names


def exposed_names(text: str) -> set[str]:
    """Series names a /metrics page declares (``# TYPE`` lines), with their sample suffixes."""
    names = set()
    for line in text.splitlines():
        if not line.startswith("# TYPE "):
            continue
        _, _, name, kind = line.split(" ", 3)
        if kind == "histogram":
            names.update(name + suffix for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(name)
    return names


async def scrape(gateway: Gateway) -> str:
    async with aiohttp.ClientSession() as http:
        async with http.get(
            gateway.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}
        ) as resp:
            assert resp.status == 200
            return await resp.text()


GATEWAY_NAME = re.compile(r"\bgateway_[a-z0-9_]+\b")
SELECTOR = re.compile(r"\b(gateway_[a-z0-9_]+)\{([^}]*)\}")
MATCHER = re.compile(r"([a-zA-Z_][a-zA-Z0-9_]*)\s*(?:=~|!~|!=|=)")


def names_used() -> dict[str, set[str]]:
    """Each gateway series name the kit reads, with the places that read it."""
    texts = [*promql_expressions()]
    texts.append(("team variable", dashboard_team_variable()["definition"]))
    for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        texts += [(group["name"], series["series"]) for series in group["input_series"]]
    used: dict[str, set[str]] = {}
    for where, text in texts:
        for name in GATEWAY_NAME.findall(text):
            used.setdefault(name, set()).add(where)
    return used


def dashboard_team_variable() -> dict[str, Any]:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    return variables["team"]


# ------------------------------------------------------------------ the tests


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_every_alert_is_unit_tested_firing_and_quiet_and_has_a_runbook() -> None:
    firing: set[str] = set()
    quiet: set[str] = set()
    for group in yaml.safe_load(ALERT_TESTS.read_text())["tests"]:
        for case in group["alert_rule_test"]:
            (firing if case.get("exp_alerts") else quiet).add(case["alertname"])
    names = [rule["alert"] for rule in alert_rules()]
    assert len(names) == len(set(names))
    assert set(names) - firing == set(), "alerts never tested firing"
    assert set(names) - quiet == set(), "alerts never tested quiet"
    assert (firing | quiet) - set(names) == set(), "tests of alerts that do not exist"
    for rule in alert_rules():
        annotations = rule["annotations"]
        assert {"summary", "description", "runbook"} <= set(annotations), rule["alert"]
        assert "image-gateway" in annotations["runbook"], rule["alert"]
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]


def test_budget_alerts_fire_at_once_and_the_others_wait() -> None:
    rules = {rule["alert"]: rule for rule in alert_rules()}
    assert "for" not in rules["GatewayTeamBudget80Percent"]
    assert "for" not in rules["GatewayTeamBudgetExhausted"]
    assert rules["GatewayUncertainMoney"]["for"] == "10m"
    assert rules["GatewayPendingTasksGrowing"]["for"] == "30m"


async def test_every_metric_the_kit_reads_is_exposed(start_gateway) -> None:
    gateway = await start_gateway(metrics={"require_admin": True})
    exposed = exposed_names(await scrape(gateway))
    used = names_used()
    assert len(used) >= 15, sorted(used)  # the extraction itself works
    missing = {name: sorted(where) for name, where in used.items() if name not in exposed}
    assert missing == {}, f"not in /metrics: {missing}"


def test_every_label_the_kit_selects_on_exists() -> None:
    declared = declared_metrics()
    wrong = []
    for where, expr in promql_expressions():
        for name, matchers in SELECTOR.findall(expr):
            for label in MATCHER.findall(matchers):
                if label not in (*declared.get(name, ()), *SCRAPE_LABELS):
                    wrong.append((where, name, label))
    assert wrong == []


def test_every_dashboard_query_is_valid_promql(tmp_path: Path) -> None:
    queries = targets("prometheus")
    assert len(queries) >= 30
    rules = [
        {"record": f"dashboard:query_{index}", "expr": substitute(expr)}
        for index, (_, expr) in enumerate(queries)
    ]
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(rules)} rules found" in result.stdout


def test_the_check_above_would_catch_invalid_promql(tmp_path: Path) -> None:
    """The trick of the previous test checks types, not only syntax."""
    path = tmp_path / "bad.yml"
    rule = {"record": "bad", "expr": "rate(gateway_spent_cny_total)"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "bad", "rules": [rule]}]}))
    result = promtool("check", "rules", path)
    assert result.returncode != 0
    assert "range vector" in result.stdout + result.stderr


def test_dashboard_structure() -> None:
    board = dashboard()
    assert board["uid"] == "image-gateway" and board["schemaVersion"] >= 39
    variables = {v["name"]: v for v in board["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert variables["loki"]["type"] == "datasource" and variables["loki"]["query"] == "loki"
    team = variables["team"]
    assert team["type"] == "query" and team["datasource"]["uid"] == "${datasource}"
    assert team["definition"] == team["query"]["query"] == "label_values(gateway_budget_cny, team)"
    assert team["includeAll"] and team["multi"] and team["allValue"] == ".*"

    panels = list(all_panels(board["panels"]))
    ids = [panel["id"] for panel in panels]
    assert len(ids) == len(set(ids))
    rows = [panel["title"] for panel in panels if panel["type"] == "row"]
    assert rows == ["Money", "Traffic", "Upstream health", "Ledger and keys", "Access log (Loki)"]
    expected_uid = {"prometheus": "${datasource}", "loki": "${loki}"}
    for panel in panels:
        if panel["type"] == "row":
            continue
        assert panel["description"], panel["title"]
        grid = panel["gridPos"]
        assert grid["x"] + grid["w"] <= 24 and grid["h"] > 0, panel["title"]
        for target in [panel, *panel["targets"]]:
            source = target["datasource"]
            assert source["uid"] == expected_uid[source["type"]], panel["title"]
        ref_ids = [target["refId"] for target in panel["targets"]]
        assert len(ref_ids) == len(set(ref_ids)), panel["title"]
    assert_no_overlap([p for p in panels if p["type"] != "row"])


def assert_no_overlap(panels: list[dict[str, Any]]) -> None:
    cells: dict[tuple[int, int], str] = {}
    for panel in panels:
        grid = panel["gridPos"]
        for x in range(grid["x"], grid["x"] + grid["w"]):
            for y in range(grid["y"], grid["y"] + grid["h"]):
                assert (x, y) not in cells, (panel["title"], cells.get((x, y)))
                cells[(x, y)] = panel["title"]


def test_the_dashboard_shows_what_the_issue_asks_for() -> None:
    exprs = " ".join(expr for _, expr in targets("prometheus"))
    for needle in (
        "rate(gateway_spent_cny_total",
        "gateway_budget_remaining_cny",
        "gateway_reserved_cny",
        "gateway_uncertain_cny",
        "gateway_budget_cny",
        "sum by (endpoint, status) (rate(gateway_requests_total",
        "histogram_quantile(0.5, sum by (le, mode) (rate(gateway_request_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, mode) (rate(gateway_request_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, mode) (rate(gateway_upstream_seconds_bucket",
        "gateway_requests_in_flight",
        "gateway_pending_tasks",
        "gateway_deduplicated_requests_total",
        "sum by (status) (rate(gateway_upstream_errors_total",
        'gateway_upstream_errors_total{status="timeout"}',
    ):
        assert needle in exprs, needle
    logql = " ".join(expr for _, expr in targets("loki"))
    for needle in ("unwrap cost_cny", "sum by (key)", "by (error_type", "unwrap latency_ms"):
        assert needle in logql, needle


JSON_STAGE = re.compile(r"\| json ([a-z_]+(?:, [a-z_]+)*)(?= \||\s*\[|\s*$)")
LABEL_FILTER = re.compile(r"\| ([a-z_]+) *(?:=~|!~|!=|>=|<=|==|=|>|<)")
UNWRAP = re.compile(r"\| unwrap ([a-z_]+)")
GROUPING = re.compile(r"\b(?:by|without) \(([a-z_, ]+)\)")
NUMBER = (int, float)


async def test_every_logql_query_reads_access_log_fields_that_exist(gateway: Gateway) -> None:
    await gateway.async_openai().images.generate(prompt="x")
    line = (await gateway.log_lines())[-1]
    queries = targets("loki")
    assert len(queries) >= 5
    for title, expr in queries:
        assert expr.startswith(LOKI_STREAM) or f"({LOKI_STREAM} " in expr, title
        assert expr.count("(") == expr.count(")") and expr.count("[") == expr.count("]"), title
        stages = JSON_STAGE.findall(expr)
        assert len(stages) == 1, f"{title}: one `| json field, ...` stage"
        extracted = set(stages[0].split(", "))
        assert extracted <= set(FIELDS), (title, extracted - set(FIELDS))
        read = set(LABEL_FILTER.findall(expr)) - {"json", "unwrap", "__error__"}
        read |= set(UNWRAP.findall(expr))
        for group in GROUPING.findall(expr):
            read |= {label.strip() for label in group.split(",")}
        assert read <= extracted, (title, read - extracted)
        for field in UNWRAP.findall(expr):
            assert isinstance(line[field], NUMBER), (title, field, line[field])
        if "_over_time(" in expr:
            assert re.search(r"\[\$__(range|interval)\]\)", expr), title
        substitute(expr)  # only variables this test knows


async def test_money_gauges_are_set_when_scraped(start_gateway, upstream: Upstream) -> None:
    gateway = await start_gateway(upstream={"timeout_s": 0.5}, metrics={"require_admin": True})
    await gateway.async_openai().images.generate(prompt="x", quality="high")
    upstream.faults.add(hang())
    async with aiohttp.ClientSession() as http:
        async with http.post(
            gateway.url + "/v1/images/generations", headers=gateway.headers(), json={"prompt": "x"}
        ) as resp:
            assert resp.status == 504
    await gateway.settled()
    text = await scrape(gateway)
    values = {
        (family, labels): value
        for family, labels, value in re.findall(
            r'^(gateway_\w+)\{team="(\w+)"\} (\S+)$', text, re.M
        )
    }
    assert float(values[("gateway_budget_cny", "design")]) == 100.0
    assert float(values[("gateway_budget_remaining_cny", "design")]) == pytest.approx(99.4)
    assert float(values[("gateway_reserved_cny", "design")]) == 0.0
    assert float(values[("gateway_uncertain_cny", "design")]) == pytest.approx(0.2)
    assert float(values[("gateway_budget_cny", "ops")]) == 100.0


# ------------------------------------------------------------------ a real Prometheus


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class Prometheus:
    """A Prometheus server on 127.0.0.1 with a temporary data directory, stopped by ``stop``."""

    def __init__(self, workdir: Path, config: dict[str, Any]) -> None:
        self.workdir = workdir
        self.config = workdir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log = workdir / "prometheus.log"
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self, http: aiohttp.ClientSession) -> None:
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                binary("prometheus"),
                f"--config.file={self.config}",
                f"--storage.tsdb.path={self.workdir / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=log,
            )
        await self.until("Prometheus is ready", lambda: self._ready(http))

    async def _ready(self, http: aiohttp.ClientSession) -> bool:
        try:
            async with http.get(self.url + "/-/ready") as resp:
                return resp.status == 200
        except aiohttp.ClientConnectionError:
            return False

    async def api(self, http: aiohttp.ClientSession, path: str, **params: str) -> Any:
        async with http.get(self.url + "/api/v1/" + path, params=params) as resp:
            body = await resp.json()
            assert body["status"] == "success", body
            return body["data"]

    async def until(self, what: str, check: Callable[[], Awaitable[Any]]) -> Any:
        """Poll ``check`` (an async callable) until it returns something truthy, or fail."""
        deadline = time.monotonic() + PROMETHEUS_DEADLINE_S
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.returncode is not None:
                pytest.fail(f"Prometheus exited ({self.proc.returncode}):\n{self.tail()}")
            result = await check()
            if result:
                return result
            await asyncio.sleep(0.2)
        pytest.fail(f"{what}: not within {PROMETHEUS_DEADLINE_S} s\n{self.tail()}")

    def tail(self) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-20:])

    async def stop(self) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.terminate()
        try:
            await asyncio.wait_for(self.proc.wait(), 10)
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()


def alerts_named(data: dict[str, Any], name: str, team: str) -> list[dict[str, Any]]:
    return [
        alert
        for alert in data["alerts"]
        if alert["labels"]["alertname"] == name and alert["labels"].get("team") == team
    ]


async def test_prometheus_scrapes_with_the_admin_token_and_fires_the_budget_alert(
    start_gateway, tmp_path: Path
) -> None:
    """End to end: the shipped alerts.yml in a real Prometheus, scraping a real test gateway."""
    binary("prometheus")
    gateway = await start_gateway(
        teams={"design": {"budget_cny": 1.0}}, metrics={"require_admin": True}
    )
    token = tmp_path / "gateway-admin-token"
    token.write_text(ADMIN_KEY + "\n")
    token.chmod(0o600)
    target = gateway.url.removeprefix("http://")
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s", "scrape_timeout": "1s"},
        "rule_files": [str(ALERTS)],
        "scrape_configs": [
            {
                "job_name": "image-gateway",
                "authorization": {"type": "Bearer", "credentials_file": str(token)},
                "static_configs": [{"targets": [target]}],
            }
        ],
    }
    prometheus = Prometheus(tmp_path, config)
    async with aiohttp.ClientSession() as http:
        try:
            await prometheus.start(http)

            async def budget_scraped() -> float | None:
                data = await prometheus.api(
                    http, "query", query='gateway_budget_cny{team="design"}'
                )
                return time.time() if data["result"] else None

            scraped_at = await prometheus.until("the budget gauge scraped", budget_scraped)
            scraped = await prometheus.api(http, "targets")
            assert [t["health"] for t in scraped["activeTargets"]] == ["up"]

            async def evaluated_after_scrape() -> dict[str, Any] | None:
                groups = (await prometheus.api(http, "rules", type="alert"))["groups"]
                money = next(g for g in groups if g["name"] == "image-gateway-money")
                rule = next(r for r in money["rules"] if r["name"] == "GatewayTeamBudget80Percent")
                evaluated = money["lastEvaluation"]
                if rule["health"] == "ok" and evaluated and _epoch(evaluated) > scraped_at + 1:
                    return rule
                return None

            rule = await prometheus.until("the rules evaluated", evaluated_after_scrape)
            assert rule["state"] == "inactive" and rule["alerts"] == []

            # 2 high (0.40 each) + 1 low (0.10) = 0.90 CNY of a 1.00 CNY budget: 90 %.
            client = gateway.async_openai()
            await client.images.generate(prompt="a lighthouse", n=2, quality="high")
            await client.images.generate(prompt="a harbour", quality="low")
            await gateway.settled()

            async def firing() -> list[dict[str, Any]]:
                # A scrape between the two requests fires it at 0.80 already; each evaluation
                # updates an active alert's value, so it reaches 0.90 once the last spend is seen.
                data = await prometheus.api(http, "alerts")
                alerts = alerts_named(data, "GatewayTeamBudget80Percent", "design")
                return [
                    a for a in alerts
                    if a["state"] == "firing" and float(a["value"]) == pytest.approx(0.9)
                ]  # fmt: skip

            (alert,) = await prometheus.until("GatewayTeamBudget80Percent firing at 90 %", firing)
            assert alert["labels"]["severity"] == "warning"
            assert alert["annotations"]["summary"] == "Team design has used 90% of its budget"
            assert "image-gateway usage --config" in alert["annotations"]["runbook"]
            data = await prometheus.api(http, "alerts")  # evaluated in the same group pass
            assert alerts_named(data, "GatewayTeamBudgetExhausted", "design") == []
            assert alerts_named(data, "GatewayTeamBudget80Percent", "ops") == []
        finally:
            await prometheus.stop()
    assert prometheus.proc is not None and prometheus.proc.returncode is not None


def _epoch(rfc3339: str) -> float:
    """Prometheus's RFC 3339 times carry nanoseconds; fromisoformat takes microseconds."""
    return datetime.fromisoformat(re.sub(r"(\.\d{6})\d+", r"\1", rfc3339)).timestamp()
