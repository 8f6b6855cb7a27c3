"""The benchmark tooling works: every k6 script loads, and scripts/bench runs end to end.

The end-to-end runs are tiny (a few VUs for a few seconds on 200 products) and use a BENCH_DIR of
their own, so they neither measure anything nor disturb a benchmark someone runs at the same time;
they check that the table (with its ratios to the raw reference, and the targets), the Markdown
and the charts come out, and that everything scripts/bench started is gone afterwards.
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
COLUMNS = ["script", "VUs", "duration", "req/s", "x raw", "avg ms", "p50 ms", "p90 ms", "p95 ms"]
COLUMNS += ["p99 ms", "failed %", "cache hit %", "result"]
PNG = b"\x89PNG\r\n\x1a\n"


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
    assert names >= {"spike", "redis-outage", "deltas", "seed-stock", "seed-pagination"}
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


@pytest.mark.parametrize(("script", "vus"), [("seed-stock", 300), ("seed-pagination", 200)])
def test_the_seed_scenarios_have_the_seeds_shape(script, vus):
    """As the seed's README gives them: 300 and 200 VUs for 30 s (scripts/bench passes VUS)."""
    options = k6_inspect(ROOT / "k6" / f"{script}.js")
    assert (options["vus"], options["duration"]) == (vus, "30s")
    assert k6_inspect(ROOT / "k6" / f"{script}.js", "-e", "VUS=7")["vus"] == 7


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
    """The table's rows by script name: from its header to the first blank line (the notes)."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["script", "VUs"])
    end = next((i for i in range(header, len(lines)) if not lines[i].strip()), len(lines))
    rows = {}
    for line in lines[header + 1 : end]:
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
    if started["raw_pid"]:  # the raw reference's gunicorn
        assert not running(int(started["raw_pid"])), "the raw reference was left running"
        assert refused(int(started["raw_port"])), "the raw reference still accepts connections"


def test_bench_product_end_to_end(tmp_path):
    bench_dir = tmp_path / "bench"
    env = bench_env(bench_dir, VUS="5", DURATION="2s")

    result = run_bench(["product"], env, timeout=240)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output

    rows = table_rows(result.stdout)
    row = rows.get("product")
    assert row is not None, output
    assert row["VUs"] == "5" and row["duration"] == "2s", output
    assert float(row["req/s"]) > 0, output
    # Its raw reference ran first, in the same shape, and the row is a ratio to it.
    assert list(rows) == ["raw", "product"], output
    assert rows["raw"]["x raw"] == "ref" and rows["raw"]["VUs"] == "5", output
    ratio = float(row["req/s"]) / float(rows["raw"]["req/s"])
    assert abs(float(row["x raw"].rstrip("x")) - ratio) <= 0.01, output
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


def test_bench_pinned_compare_end_to_end(tmp_path):
    """`scripts/bench --pin --save compare`, tiny: every scenario after its raw reference, pgbench,
    the targets, the Markdown and the charts, copied where --save says, and the run labelled."""
    bench_dir, docs = tmp_path / "bench", tmp_path / "docs" / "bench"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:latest -->\nnone yet\n<!-- /bench:latest -->\n")
    settings = {"VUS": "3", "SEED_STOCK_VUS": "3", "SEED_PAGINATION_VUS": "3", "DURATION": "1s"}
    settings |= {"FAST_LANE": "0", "BENCH_LABEL": "e2e", "BENCH_SAVE_DIR": str(docs)}
    settings |= {"BENCH_README": str(readme)}
    result = run_bench(["--pin", "--save", "compare"], bench_env(bench_dir, **settings), 240)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output

    rows = table_rows(result.stdout)
    order = ["raw", "product", "stock", "products", "deltas", "pgbench", "raw-seed-stock"]
    order += ["seed-stock", "raw-seed-pagination", "seed-pagination"]
    assert list(rows) == order, output
    assert all(row["result"] == "ok" and row["VUs"] == "3" for row in rows.values()), output
    assert [rows[n]["x raw"] for n in order if n.startswith("raw")] == ["ref"] * 3, output
    for name in ("product", "stock", "products", "deltas", "seed-stock", "seed-pagination"):
        assert float(rows[name]["x raw"].rstrip("x")) > 0, output
    assert float(rows["pgbench"]["req/s"]) > 0 and rows["pgbench"]["failed %"] == "0.00", output
    assert "the composed limit" in result.stdout, output

    targets = result.stdout.split("targets (issue 9", 1)[1].splitlines()[2:]
    verdicts = [line.split()[-1] for line in targets if line.split()[-1] in ("PASS", "FAIL")]
    assert len(verdicts) == 7, output
    assert "product, stock, products, deltas, pgbench at 3 VUs, not 50" in targets[-1], output

    meta = json.loads((bench_dir / "meta.json").read_text())
    assert (meta["pinned"], meta["server_cpus"], meta["client_cpus"]) == ("1", "1", "0"), meta
    assert meta["workers"] == "1" and meta["label"] == "e2e", meta
    assert meta["settings"] == {"WEB_CONCURRENCY": "1", "FAST_LANE": "0"}, meta
    markdown = (bench_dir / "results.md").read_text()
    assert "settings: WEB_CONCURRENCY=1, FAST_LANE=0; 200 products; label: e2e" in markdown
    assert (
        "| seed-pagination | 3 | 1s |" in markdown and "![req/s per scenario](reqs.png)" in markdown
    )
    for name in ("reqs.png", "latency.png"):
        assert (bench_dir / name).read_bytes()[:8] == PNG
        assert (docs / name).read_bytes() == (bench_dir / name).read_bytes()
    assert (docs / "results.md").read_text() == markdown
    block = readme.read_text()
    assert "none yet" not in block and "![req/s per scenario](docs/bench/reqs.png)" in block
    assert_all_stopped(bench_dir)


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        (["--bogus"], {}, "unknown option '--bogus'"),
        (["pgbench"], {"DATABASE_URL": "postgresql://x@127.0.0.1:1/x"}, "DATABASE_URL"),
        (["product"], {"BENCH_RAW": "yes"}, "BENCH_RAW must be 0 or 1"),
        (["--pin", "product"], {"PIN_SERVER_CPU": "4096"}, "cannot run on CPU 4096"),
    ],
)
def test_bench_refuses_what_it_cannot_do_before_starting_anything(
    tmp_path, args, settings, message
):
    result = run_bench(args, bench_env(tmp_path / "bench", **settings), timeout=60)
    assert result.returncode != 0
    assert message in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bench").exists()


def test_bench_redis_modes_need_its_own_redis(tmp_path):
    env = bench_env(tmp_path / "bench", REDIS_URL="redis://127.0.0.1:1/0")
    result = run_bench(["redis-outage"], env, timeout=60)
    assert result.returncode != 0
    assert "REDIS_URL" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "bench").exists()  # refused before starting anything


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("DB_POOL_SIZE=abc", "DB_POOL_SIZE must be a whole number, got 'abc'"),
        ("LOG_LEVEL=chatty", "LOG_LEVEL must be one of DEBUG, INFO, WARNING, ERROR, CRITICAL"),
    ],
)
def test_bench_refuses_a_bad_setting_in_one_line_before_starting_anything(
    tmp_path, setting, message
):
    name, value = setting.split("=")
    result = run_bench(["product"], bench_env(tmp_path / "bench", **{name: value}), timeout=60)
    assert result.returncode != 0
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr  # no traceback, nothing started to log about
    assert lines[0].startswith(f"faststock: configuration error: {message}"), result.stderr
    assert result.stdout == ""
    assert not (tmp_path / "bench").exists()  # no lock, no PostgreSQL, no Redis, no gunicorn
