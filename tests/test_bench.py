"""The benchmark tooling works: every k6 script loads, and scripts/bench runs end to end.

The end-to-end runs are tiny (a few VUs for a few seconds on 200 products) and use a BENCH_DIR of
their own, so they neither measure anything nor disturb a benchmark someone runs at the same time;
they check that the table comes out and that everything scripts/bench started is gone afterwards.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from tests.servers import BIN, ROOT

BENCH = ROOT / "scripts" / "bench"
K6_SCRIPTS = sorted(p for p in (ROOT / "k6").glob("*.js") if p.name != "lib.js")  # lib: imported
COLUMNS = ["script", "VUs", "duration", "req/s", "avg ms", "p90 ms", "p95 ms", "p99 ms"]
COLUMNS += ["failed %", "cache hit %", "result"]


def k6(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "k6"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "K6_NO_USAGE_REPORT": "true"},
    )


def k6_inspect(script: Path, *args: str) -> dict:
    result = k6("inspect", *args, str(script))
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_k6_scripts_present():
    names = {p.stem for p in K6_SCRIPTS}
    assert names >= {"product", "stock", "products", "update-stock", "mixed"}
    assert names >= {"spike", "redis-outage"}
    assert (ROOT / "k6" / "lib.js").is_file()


@pytest.mark.parametrize("script", K6_SCRIPTS, ids=lambda p: p.name)
def test_k6_script_loads(script):
    options = k6_inspect(script)
    # At most 1% failed requests; none at all where failing is the thing measured.
    assert options["thresholds"]["http_req_failed"] in (["rate<0.01"], ["rate==0"])
    assert "p(99)" in options["summaryTrendStats"]
    assert "export function handleSummary" in script.read_text()


def test_update_stock_runs_its_scenarios_one_after_the_other():
    options = k6_inspect(ROOT / "k6" / "update-stock.js", "-e", "DURATION=10s", "-e", "VUS=7")
    random, hot = options["scenarios"]["random"], options["scenarios"]["hot"]
    assert random["duration"] == hot["duration"] == "10s"
    assert random["vus"] == hot["vus"] == 7
    assert hot["startTime"] == "15s"  # after random's 10 s and its 5 s graceful stop
    assert options["thresholds"]["http_reqs{scenario:hot}"] == ["count>0"]


def test_spike_ramps_up_holds_and_ramps_down():
    options = k6_inspect(ROOT / "k6" / "spike.js")
    stages = options["scenarios"]["spike"]["stages"]
    assert stages == [
        {"duration": "10s", "target": 2000},
        {"duration": "20s", "target": 2000},
        {"duration": "5s", "target": 0},
    ]
    thresholds = options["thresholds"]
    assert thresholds["status_other"] == ["count==0"]  # only 200 and 503 are acceptable
    assert "http_req_duration" not in thresholds  # no latency target unless P95_MS is given
    args = ["-e", "SPIKE_VUS=20", "-e", "SPIKE_RAMP_UP=2s", "-e", "SPIKE_HOLD=1m"]
    stages = k6_inspect(ROOT / "k6" / "spike.js", *args)["scenarios"]["spike"]["stages"]
    assert [(s["duration"], s["target"]) for s in stages] == [("2s", 20), ("1m0s", 20), ("5s", 0)]


@pytest.mark.parametrize(
    "setting", ["SPIKE_VUS=0", "SPIKE_VUS=20001", "SPIKE_HOLD=11m", "SPIKE_RAMP_UP=x"]
)
def test_spike_settings_are_bounded(setting):
    result = k6("inspect", "-e", setting, str(ROOT / "k6" / "spike.js"))
    assert result.returncode != 0
    assert setting.split("=")[0] in result.stderr


def test_redis_outage_reports_each_phase():
    options = k6_inspect(ROOT / "k6" / "redis-outage.js")
    assert options["vus"] == 200 and options["duration"] == "45s"
    thresholds = options["thresholds"]
    for phase in ("before", "outage", "after"):
        assert thresholds[f"http_req_duration{{phase:{phase}}}"] == ["p(95)<2000"]
        assert thresholds[f"http_req_failed{{phase:{phase}}}"] == ["rate==0"]


def run_bench(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """scripts/bench, stopped with SIGTERM (so it cleans up) if it overruns."""
    proc = subprocess.Popen(
        [str(BENCH), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=90)
        pytest.fail(f"scripts/bench took longer than {timeout}s:\n{out}\n{err}")
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def table_rows(stdout: str) -> dict[str, dict[str, str]]:
    lines = [line for line in stdout.splitlines() if line.strip()]
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["script", "VUs"])
    rows = {}
    for line in lines[header + 1 :]:
        cells = line.split()
        if len(cells) == len(COLUMNS) - 1:  # a scenario's or phase's row: no result of its own
            cells.append("")
        if len(cells) == len(COLUMNS):
            rows[cells[0]] = dict(zip(COLUMNS, cells, strict=True))
    return rows


def refused(port: int) -> bool:
    try:
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    except ConnectionRefusedError:
        return True
    return False


def running(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def bench_env(bench_dir: Path, **settings: str) -> dict[str, str]:
    """The environment of a tiny scripts/bench run in BENCH_DIR bench_dir, on its own servers."""
    env = {**os.environ, "BENCH_WARMUP": "0", "BENCH_PRODUCTS": "200", "BENCH_DIR": str(bench_dir)}
    for name in ("DATABASE_URL", "REDIS_URL", "PORT", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)  # the point is to check the servers it starts and stops itself
    return {**env, **settings}


def summary_of(bench_dir: Path, name: str) -> dict:
    return json.loads((bench_dir / f"{name}.json").read_text())["faststock"]


def assert_all_stopped(bench_dir: Path) -> None:
    """Everything scripts/bench started (as it recorded in BENCH_DIR/servers) is gone."""
    started = dict(
        line.split("=", 1) for line in (bench_dir / "servers").read_text().splitlines() if line
    )
    assert not running(int(started["gunicorn_pid"])), "gunicorn left running"
    for name in ("web_port", "pg_port", "redis_port"):
        assert started[name], f"{name} not recorded: {started}"
        assert refused(int(started[name])), f"{name} {started[name]} still accepts connections"
    assert not (bench_dir / "pg").exists(), "the throwaway PostgreSQL was not removed"
    assert started["pg_datadir"], started
    assert not Path(started["pg_datadir"]).exists(), "PostgreSQL's data directory was left behind"
    assert not (bench_dir / "redis" / "redis.pid").exists(), "Redis was not stopped"


def test_bench_product_end_to_end(tmp_path):
    bench_dir = tmp_path / "bench"
    env = bench_env(bench_dir, VUS="5", DURATION="2s")

    result = run_bench(["product"], env, timeout=240)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output

    row = table_rows(result.stdout).get("product")
    assert row is not None, output
    assert row["VUs"] == "5" and row["duration"] == "2s", output
    assert float(row["req/s"]) > 0, output
    assert float(row["failed %"]) == 0, output
    assert float(row["p99 ms"]) >= float(row["p90 ms"]) > 0, output
    assert row["result"] == "ok", output
    assert 0 <= float(row["cache hit %"]) <= 100, output

    summary = summary_of(bench_dir, "product")
    assert summary["requests"] > 0 and summary["thresholds_ok"] is True
    assert (bench_dir / "results.txt").read_text() == result.stdout
    assert_all_stopped(bench_dir)


def test_bench_redis_outage_end_to_end(tmp_path):
    """Redis stopped 3 s after k6 starts and started again at 6 s: no request fails, and the
    cache is back (a HIT) soon after."""
    bench_dir = tmp_path / "bench"
    settings = {"VUS": "10", "DURATION": "9s", "OUTAGE_START": "3", "OUTAGE_END": "6"}
    result = run_bench(["redis-outage"], bench_env(bench_dir, **settings), timeout=240)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output

    rows = table_rows(result.stdout)
    assert rows["redis-outage"]["result"] == "ok", output
    assert {"redis-outage:before", "redis-outage:outage", "redis-outage:after"} <= set(rows), output
    assert "first HIT after restore" in result.stdout, output

    summary = summary_of(bench_dir, "redis-outage")
    assert summary["requests"] > 0 and summary["failed_requests"] == 0, output
    assert summary["phases"]["outage"]["x_cache"]["BYPASS"] > 0, output  # Redis really was out
    assert summary["hit_resumed_after_s"] is not None, output
    assert 0 <= summary["hit_resumed_after_s"] <= 5, output
    events = (bench_dir / "redis-outage.events").read_text().split()
    assert [e.split("=")[0] for e in events] == ["stopped", "started"], events
    assert_all_stopped(bench_dir)


def test_bench_spike_end_to_end(tmp_path):
    """A spike of 20 VUs: only 200s and 503s, and the service healthy right after."""
    bench_dir = tmp_path / "bench"
    settings = {
        "SPIKE_VUS": "20",
        "SPIKE_RAMP_UP": "1s",
        "SPIKE_HOLD": "1s",
        "SPIKE_RAMP_DOWN": "1s",
    }
    result = run_bench(["spike"], bench_env(bench_dir, **settings), timeout=240)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output
    assert table_rows(result.stdout)["spike"]["result"] == "ok", output
    assert "spike: healthy after: yes" in result.stdout, output

    summary = summary_of(bench_dir, "spike")
    statuses = summary["statuses"]
    assert statuses["other"] == 0 and statuses["200"] > 0, output
    assert statuses["200"] + statuses["503"] == summary["requests"], output
    assert json.loads((bench_dir / "spike.health").read_text())["healthy"] is True
    assert_all_stopped(bench_dir)


def test_bench_redis_modes_need_its_own_redis(tmp_path):
    env = bench_env(tmp_path / "bench", REDIS_URL="redis://127.0.0.1:1/0")
    result = run_bench(["redis-outage"], env, timeout=60)
    assert result.returncode != 0
    assert "REDIS_URL" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bench").exists()  # refused before starting anything
