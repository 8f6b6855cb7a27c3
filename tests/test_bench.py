"""The benchmark tooling works: every k6 script loads, and scripts/bench runs end to end.

The end-to-end run is tiny (5 VUs for 2 s on 200 products) and uses a BENCH_DIR of its own, so
it neither measures anything nor disturbs a benchmark someone runs at the same time; it checks
that the table comes out and that everything scripts/bench started is gone afterwards.
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
K6_SCRIPTS = sorted((ROOT / "k6").glob("*.js"))
COLUMNS = ["script", "VUs", "duration", "req/s", "avg ms", "p90 ms", "p95 ms", "p99 ms"]
COLUMNS += ["failed %", "cache hit %", "result"]


def k6_inspect(script: Path, *args: str) -> dict:
    result = subprocess.run(
        [str(BIN / "k6"), "inspect", *args, str(script)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "K6_NO_USAGE_REPORT": "true"},
    )
    assert result.returncode == 0, result.stdout + result.stderr
    return json.loads(result.stdout)


def test_k6_scripts_present():
    names = {p.stem for p in K6_SCRIPTS}
    assert names >= {"product", "stock", "products", "update-stock", "mixed"}


@pytest.mark.parametrize("script", K6_SCRIPTS, ids=lambda p: p.name)
def test_k6_script_loads(script):
    options = k6_inspect(script)
    assert options["thresholds"]["http_req_failed"] == ["rate<0.01"]
    assert "p(99)" in options["summaryTrendStats"]
    assert "export function handleSummary" in script.read_text()


def test_update_stock_runs_its_scenarios_one_after_the_other():
    options = k6_inspect(ROOT / "k6" / "update-stock.js", "-e", "DURATION=10s", "-e", "VUS=7")
    random, hot = options["scenarios"]["random"], options["scenarios"]["hot"]
    assert random["duration"] == hot["duration"] == "10s"
    assert random["vus"] == hot["vus"] == 7
    assert hot["startTime"] == "15s"  # after random's 10 s and its 5 s graceful stop
    assert options["thresholds"]["http_reqs{scenario:hot}"] == ["count>0"]


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


def test_bench_product_end_to_end(tmp_path):
    bench_dir = tmp_path / "bench"
    env = {
        **os.environ,
        "VUS": "5",
        "DURATION": "2s",
        "BENCH_WARMUP": "0",
        "BENCH_PRODUCTS": "200",
        "BENCH_DIR": str(bench_dir),
    }
    for name in ("DATABASE_URL", "REDIS_URL", "PORT", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(name, None)  # the point is to check the servers it starts and stops itself

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

    summary = json.loads((bench_dir / "product.json").read_text())["faststock"]
    assert summary["requests"] > 0 and summary["thresholds_ok"] is True
    assert (bench_dir / "results.txt").read_text() == result.stdout

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
