"""Dashboards and alerts checked against a real Prometheus.

promtool checks deploy/prometheus (config, rules) and runs the alerts' unit tests; the dashboard
JSON must be what deploy/grafana/dashboard.py generates; and a private Prometheus scraping a live
gunicorn (two gevent workers) under a short k6 load answers every panel query of that dashboard
with at least one series, so a panel naming a metric the service does not expose fails here.
scripts/test installs prometheus and promtool (scripts/lib.sh, fs_ensure_prometheus).
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import requests
import yaml

from tests.servers import BIN, MACHINE_POLICY, LiveServer, free_port, install_with_fake_apt, poll

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
PROMETHEUS_CONFIG = PROMETHEUS_DIR / "prometheus.yml"
ALERTS = PROMETHEUS_DIR / "alerts.yml"
ALERT_TESTS = PROMETHEUS_DIR / "alerts.test.yml"
GENERATOR = ROOT / "deploy" / "grafana" / "dashboard.py"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "faststock.json"
LOAD = Path(__file__).with_name("observability_load.js")
README = ROOT / "README.md"

ALERT_NAMES = {
    "FastStockHigh5xxRatio",
    "FastStockSlowP95",
    "FastStockRedisBreakerOpen",
    "FastStockDbPoolWaiters",
    "FastStockOutboxBacklogGrowing",
    "FastStockTargetDown",
}
# What the panels of issue 10 watch: every one of these must be queried by some panel.
WATCHED_METRICS = {
    "flask_http_request_duration_seconds_count",
    "flask_http_request_duration_seconds_bucket",
    "flask_http_request_total",
    "faststock_cache_requests_total",
    "faststock_redis_breaker_open",
    "faststock_db_pool_in_use",
    "faststock_db_pool_waiters",
    "faststock_db_pool_wait_seconds_bucket",
    "faststock_db_statement_duration_seconds_bucket",
    "faststock_stock_changes_total",
    "faststock_outbox_backlog",
    "faststock_worker_cpu_seconds",
    "faststock_worker_resident_memory_bytes",
}
# What the live test puts in place of Grafana's interval variable before asking Prometheus.
RATE_INTERVAL = "1m"


def _binary(name: str) -> str:
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not on PATH: scripts/test installs it (Debian package prometheus)")
    return found


def _promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [_binary("promtool"), *map(str, args)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def _alert_rules() -> list[dict[str, Any]]:
    groups = yaml.safe_load(ALERTS.read_text())["groups"]
    return [rule for group in groups for rule in group["rules"] if "alert" in rule]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("faststock_dashboard", GENERATOR)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
    finally:
        del sys.modules[spec.name]
    return module


def _panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel that queries, rows' nested panels included."""
    for panel in dashboard.get("panels", []):
        if panel.get("type") == "row":
            yield from _panels(panel)
        else:
            yield panel


def _queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) of every target of the committed dashboard."""
    dashboard = json.loads(DASHBOARD.read_text())
    return [(p["title"], t["expr"]) for p in _panels(dashboard) for t in p.get("targets", [])]


PROMQL_WORDS = {"and", "or", "unless", "bool", "offset", "by", "without", "inf", "nan"}


def _metric_names(expr: str) -> set[str]:
    """The metric names an expression selects: what is left once strings, label matchers, ranges,
    grouping clauses and function calls are taken out."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    words = re.findall(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\b(?!\s*\()", text)
    return {word for word in words if word.lower() not in PROMQL_WORDS}


# --- promtool ------------------------------------------------------------------------------------


def test_promtool_checks_the_config_and_the_rules_it_loads():
    result = _promtool("check", "config", PROMETHEUS_CONFIG)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "alerts.yml" in result.stdout + result.stderr, "the config loads no rule file"


def test_promtool_checks_the_rules():
    result = _promtool("check", "rules", ALERTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(ALERT_NAMES)} rules found" in result.stdout, result.stdout


def test_alert_unit_tests_pass():
    result = _promtool("test", "rules", ALERT_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


def test_every_alert_has_a_firing_and_a_quiet_unit_test():
    """A rule's tests must show it firing (with its labels and annotations) and staying quiet."""
    cases = [
        case
        for test in yaml.safe_load(ALERT_TESTS.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
    ]
    for name in ALERT_NAMES:
        mine = [case for case in cases if case["alertname"] == name]
        assert any(case.get("exp_alerts") for case in mine), f"no test shows {name} firing"
        assert any(not case.get("exp_alerts") for case in mine), f"no test shows {name} quiet"


def test_every_alert_explains_itself_and_links_its_runbook_line():
    rules = _alert_rules()
    assert {rule["alert"] for rule in rules} == ALERT_NAMES
    readme = README.read_text()
    for rule in rules:
        annotations = rule.get("annotations", {})
        assert annotations.get("summary") and annotations.get("description"), rule["alert"]
        page, _, anchor = annotations.get("runbook", "").partition("#")
        assert page == "README.md" and anchor, f"{rule['alert']}: runbook must be README.md#..."
        assert f'id="{anchor}"' in readme, f"README has no runbook line with id {anchor!r}"
        assert rule["labels"]["severity"] in ("page", "warn"), rule["alert"]


def test_compose_runs_the_prometheus_major_version_promtool_checked():
    """The config format changed between major versions (2.x -> 3.x): the image compose runs must
    be of the line whose promtool validated deploy/prometheus here."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    tag = compose["services"]["prometheus"]["image"].rsplit(":", 1)[1]
    result = _promtool("--version")
    found = re.search(r"version (\d+)\.", result.stdout + result.stderr)
    assert found, result.stdout + result.stderr
    assert tag.removeprefix("v").split(".")[0] == found.group(1), (tag, found.group(0))


# --- installing prometheus -----------------------------------------------------------------------


@pytest.mark.parametrize("existing", [None, "ours", "the machine's"])
def test_installing_prometheus_refuses_service_starts(tmp_path, existing):
    """fs_ensure_prometheus, as scripts/test runs it on a machine without prometheus: apt-get runs
    without recommends while a policy-rc.d refuses service starts (Debian's package would start
    a Prometheus otherwise), and that policy is gone afterwards, unless it was the machine's.
    A leftover of an interrupted install of ours is marked; the machine's is not."""
    done = install_with_fake_apt(
        tmp_path,
        'fs_ensure_prometheus && echo "$FS_PROMTOOL"',
        "prometheus",
        ("prometheus", "promtool"),
        existing,
    )
    result, lines, policy = done.result, done.lines, done.policy
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.strip() == str(done.fake_bin / "promtool")
    install = done.install
    assert "--no-install-recommends" in install and install.endswith(" prometheus"), install
    if existing == "the machine's":
        assert "policy-rc.d: 0" in lines, lines  # theirs decides, and stays as it was
        assert policy.read_text() == MACHINE_POLICY
    else:
        assert "policy-rc.d: 101" in lines, lines
        assert not policy.exists(), "the policy-rc.d of the install was left behind"


# --- the dashboard -------------------------------------------------------------------------------


def test_committed_dashboard_is_the_generators_output():
    """deploy/grafana/dashboards/faststock.json is generated: regenerate it, never edit it."""
    hint = f"regenerate it: .venv/bin/python {GENERATOR.relative_to(ROOT)}"
    assert _generator().render() == DASHBOARD.read_text(), hint


def test_every_panel_is_titled_and_queries_prometheus():
    dashboard = json.loads(DASHBOARD.read_text())
    panels = list(_panels(dashboard))
    titles = [p.get("title", "") for p in panels]
    assert all(titles) and len(set(titles)) == len(titles), titles
    for panel in panels:
        assert panel.get("description"), f"{panel['title']}: say what the panel shows"
        assert panel["datasource"] == {"type": "prometheus", "uid": "prometheus"}, panel["title"]
        targets = panel.get("targets", [])
        assert targets and all(t.get("expr") for t in targets), panel["title"]
        refs = [t["refId"] for t in targets]
        assert len(set(refs)) == len(refs), panel["title"]


def test_the_readme_lists_every_panel():
    readme = README.read_text()
    for panel in _panels(json.loads(DASHBOARD.read_text())):
        assert f"| {panel['title']} |" in readme, f"README's panel table lacks {panel['title']!r}"


def test_the_panels_watch_every_metric_the_issue_names():
    named = set().union(*(_metric_names(expr) for _, expr in _queries()))
    assert not WATCHED_METRICS - named, f"no panel queries {sorted(WATCHED_METRICS - named)}"


def test_no_query_hides_a_missing_metric():
    """`or vector(0)` would draw a flat zero for a metric that is not there at all."""
    for title, expr in _queries():
        assert "vector(" not in expr, f"{title}: {expr}"
        unknown = set(re.findall(r"\$\w+", expr)) - {"$__rate_interval"}
        assert not unknown, f"{title}: Prometheus would not know {unknown}"


# --- against a live Prometheus -------------------------------------------------------------------


class PrometheusServer:
    """A private Prometheus on a free loopback port, scraping one target every second with the
    job and rule files of deploy/prometheus/prometheus.yml."""

    def __init__(self, directory: Path, target: str) -> None:
        self.port = free_port()
        self.dir = directory
        self.dir.mkdir(parents=True, exist_ok=True)
        config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
        config["global"].update(scrape_interval="1s", evaluation_interval="1s")
        config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
        (job,) = config["scrape_configs"]
        job["scrape_interval"] = "1s"
        job.pop("dns_sd_configs", None)  # the compose service's replicas, by Docker's DNS
        job["static_configs"] = [{"targets": [target]}]
        self.job = job["job_name"]
        self.config = self.dir / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.log_path = self.dir / "prometheus.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 20) -> PrometheusServer:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [
                    _binary("prometheus"),
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.dir / 'data'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                raise RuntimeError(f"prometheus exited early:\n{self.log()}")
            try:
                return requests.get(f"{self.base}/-/ready", timeout=1).status_code == 200
            except requests.RequestException:
                return False

        if not poll(ready, within=timeout, every=0.05):
            self.stop()
            raise RuntimeError(f"prometheus did not become ready:\n{self.log()}")
        return self

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def api(self, path: str, **params: str) -> dict[str, Any]:
        response = requests.get(f"{self.base}/api/v1/{path}", params=params, timeout=10)
        body = response.json()
        assert body.get("status") == "success", (path, params, body)
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector `expr` evaluates to now; fails if Prometheus cannot parse it."""
        return self.api("query", query=expr)["result"]

    def stop(self, timeout: float = 20) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def prometheus(tmp_path: Path) -> Iterator[Any]:
    """Start a private Prometheus scraping a given host:port; stopped when the test ends."""
    started: list[PrometheusServer] = []

    def start(target: str) -> PrometheusServer:
        server = PrometheusServer(tmp_path / f"prometheus-{len(started)}", target)
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.stop()


def _run_load(server: LiveServer, summary: Path) -> dict[str, Any]:
    result = subprocess.run(
        [str(BIN / "k6"), "run", "--quiet", "--no-color", str(LOAD)],
        cwd=ROOT,
        env={
            **os.environ,
            "K6_NO_USAGE_REPORT": "true",
            "BASE_URL": server.base,
            "PRODUCTS": "100",
            "SUMMARY": str(summary),
        },
        capture_output=True,
        text=True,
        timeout=40,
    )
    found = summary.read_text() if summary.exists() else "no summary"
    # A hung worker shows as k6 timeouts here and as WORKER TIMEOUT in gunicorn's log.
    why = f"{found}\n{result.stderr[-1500:]}\ngunicorn's log:\n{server.log()[-1500:]}"
    assert result.returncode == 0, why
    return json.loads(found)


def test_every_panel_query_returns_data_from_a_live_prometheus(live_server, prometheus, tmp_path):
    server = live_server()
    prom = prometheus(f"127.0.0.1:{server.port}")
    up = f'up{{job="{prom.job}"}} == 1'
    assert poll(lambda: prom.query(up), within=15, every=0.1), "the target never came up"

    load = _run_load(server, tmp_path / "k6-summary.json")
    assert load["requests"] > 0 and load["checks"]["fails"] == 0, load

    # Every request the load made has been scraped: the counters include the last of them.
    total = f'sum(flask_http_request_total{{job="{prom.job}"}}) >= {load["requests"]}'
    assert poll(lambda: prom.query(total), within=15, every=0.1), "the load was never scraped"

    queries = [
        (title, expr.replace("$__rate_interval", RATE_INTERVAL)) for title, expr in _queries()
    ]

    def empty() -> list[tuple[str, str]]:
        return [(title, expr) for title, expr in queries if not prom.query(expr)]

    # Gauges a worker refreshes about every second may need one more scrape to appear.
    if not poll(lambda: not empty(), within=10, every=0.2):
        lines = [f"  {title}: {expr}" for title, expr in empty()]
        pytest.fail("panels without data:\n" + "\n".join(lines))

    # The alert rules loaded and evaluate against the live data without an error.
    def rules_healthy() -> list[dict[str, Any]]:
        groups = prom.api("rules", type="alert")["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        return rules if all(rule["health"] == "ok" for rule in rules) else []

    rules = poll(rules_healthy, within=10, every=0.2)
    assert {rule["name"] for rule in rules} == ALERT_NAMES, prom.api("rules", type="alert")
