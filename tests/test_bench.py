"""The benchmark tooling works: every k6 script loads, and scripts/bench runs end to end.

The end-to-end runs are tiny (a few VUs for a few seconds on 200 products) and use a BENCH_DIR of
their own, so they neither measure anything nor disturb a benchmark someone runs at the same time;
they check that the runs happen in the planned order (rounds of raw reference and script, one
after the other), that the table (with its medians and per-round ratios to the raw reference, and
the targets), the Markdown and the charts come out, and that everything scripts/bench started is
gone afterwards.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
from itertools import pairwise
from pathlib import Path

import pytest

from tests.servers import BIN, ROOT

BENCH = ROOT / "scripts" / "bench"
K6_SCRIPTS = sorted(p for p in (ROOT / "k6").glob("*.js") if p.name != "lib.js")  # lib: imported
COLUMNS = ["script", "VUs", "duration", "runs", "req/s", "x raw", "avg ms", "p50 ms", "p90 ms"]
COLUMNS += ["p95 ms", "p99 ms", "failed %", "cache hit %", "result"]
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
    """The table's rows by script name: from its header to the first blank line (the notes).
    Columns are at least two spaces apart; a cell ("0.87x (0.85, 0.91)") has single ones."""
    lines = stdout.splitlines()
    header = next(i for i, line in enumerate(lines) if line.split()[:2] == ["script", "VUs"])
    end = next((i for i in range(header, len(lines)) if not lines[i].strip()), len(lines))
    rows = {}
    for line in lines[header + 1 : end]:
        cells = re.split(r"\s{2,}", line.strip())
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


def summary_of(bench_dir: Path, run_id: str) -> dict:
    return json.loads((bench_dir / f"{run_id}.json").read_text())["faststock"]


def ratios(cell: str) -> tuple[float, list[float]]:
    """An "x raw" cell, "0.87x (0.85, 0.91)": the median and each round's ratio."""
    match = re.fullmatch(r"([\d.]+)x(?: \(([\d., ]+)\))?", cell)
    assert match, cell
    rounds = [float(x) for x in match.group(2).split(", ")] if match.group(2) else []
    return float(match.group(1)), rounds


def runs_in_order(bench_dir: Path) -> list[tuple[str, int, int, str]]:
    """BENCH_DIR/runs.tsv: each measured run's id, start and end (ms) and exit status, in order."""
    lines = (bench_dir / "runs.tsv").read_text().splitlines()
    return [(i, int(start), int(end), rc) for i, start, end, rc in (x.split("\t") for x in lines)]


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
    if started["ab_pid"]:  # the A/B variant's gunicorn
        assert not running(int(started["ab_pid"])), "the A/B variant was left running"
        assert refused(int(started["ab_port"])), "the A/B variant still accepts connections"


def test_bench_product_end_to_end(tmp_path):
    bench_dir = tmp_path / "bench"
    env = bench_env(bench_dir, VUS="5", DURATION="2s", BENCH_ROUNDS="1")

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
    assert row["runs"] == rows["raw"]["runs"] == "1", output
    ratio = float(row["req/s"]) / float(rows["raw"]["req/s"])
    assert abs(float(row["x raw"].rstrip("x")) - ratio) <= 0.01, output
    assert float(row["failed %"]) == 0, output
    assert float(row["p99 ms"]) >= float(row["p90 ms"]) > 0, output
    assert row["result"] == "ok", output
    assert 0 <= float(row["cache hit %"]) <= 100, output

    summary = summary_of(bench_dir, "product.1")
    assert summary["requests"] > 0 and summary["thresholds_ok"] is True
    assert [r[0] for r in runs_in_order(bench_dir)] == ["raw.product.1", "product.1"]
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


def test_bench_pinned_rounds_end_to_end(tmp_path):
    """`BENCH_ROUNDS=2 scripts/bench --pin --save` on one script of each kind compare pairs
    (product with raw, deltas with raw and pgbench, the seed's pagination with its own reference),
    tiny: the runs alternate reference and script round by round, one after the other; the table
    shows medians and each round's ratio; the targets, the Markdown and the charts come out,
    copied where --save says, and the run is labelled. (The whole compare is checked by
    --dry-run below: run for real, its 26 runs would take the suite most of a minute.)"""
    bench_dir, docs = tmp_path / "bench", tmp_path / "docs" / "bench"
    readme = tmp_path / "README.md"
    readme.write_text("<!-- bench:latest -->\nnone yet\n<!-- /bench:latest -->\n")
    settings = {"VUS": "3", "SEED_PAGINATION_VUS": "3", "DURATION": "1s", "BENCH_ROUNDS": "2"}
    settings |= {"FAST_LANE": "0", "BENCH_LABEL": "e2e", "BENCH_SAVE_DIR": str(docs)}
    settings |= {"BENCH_README": str(readme)}
    args = ["--pin", "--save", "product", "deltas", "pgbench", "seed-pagination"]
    result = run_bench(args, bench_env(bench_dir, **settings), 240)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output

    runs = runs_in_order(bench_dir)
    assert [run[0] for run in runs] == [
        "raw.product.1",
        "product.1",
        "raw.product.2",
        "product.2",
        "raw.deltas.1",
        "deltas.1",
        "pgbench.deltas.1",
        "raw.deltas.2",
        "deltas.2",
        "pgbench.deltas.2",
        "raw-seed-pagination.seed-pagination.1",
        "seed-pagination.1",
        "raw-seed-pagination.seed-pagination.2",
        "seed-pagination.2",
    ], output
    assert all(rc == "0" for *_, rc in runs), runs
    for before, after in pairwise(runs):  # one after the other, never overlapping
        assert before[1] < before[2] <= after[1], (before, after)

    rows = table_rows(result.stdout)
    order = ["raw", "product", "deltas", "pgbench", "raw-seed-pagination", "seed-pagination"]
    assert list(rows) == order, output
    assert all(row["result"] == "ok" and row["VUs"] == "3" for row in rows.values()), output
    assert {n: rows[n]["runs"] for n in order} == {
        "raw": "4",  # product's and the deltas' rounds
        "product": "2",
        "deltas": "2",
        "pgbench": "2",
        "raw-seed-pagination": "2",
        "seed-pagination": "2",
    }, output
    assert rows["raw"]["x raw"] == rows["raw-seed-pagination"]["x raw"] == "ref", output
    for name in ("product", "deltas", "seed-pagination"):
        median, each = ratios(rows[name]["x raw"])
        assert len(each) == 2 and median == pytest.approx(sum(each) / 2, abs=0.01), output
        # Each round's ratio is to the reference run right before it.
        for r, x in enumerate(each, 1):
            ref = "raw" if name != "seed-pagination" else "raw-seed-pagination"
            rps = summary_of(bench_dir, f"{name}.{r}")["rps"]
            assert x == pytest.approx(
                rps / summary_of(bench_dir, f"{ref}.{name}.{r}")["rps"], abs=0.01
            )
        # req/s is the median of its two rounds'.
        both = [summary_of(bench_dir, f"{name}.{r}")["rps"] for r in (1, 2)]
        assert float(rows[name]["req/s"]) == pytest.approx(sum(both) / 2, abs=0.1), output
    assert float(rows["pgbench"]["req/s"]) > 0 and rows["pgbench"]["failed %"] == "0.00", output
    assert "composed limit 1 / (1/raw + 1/pgbench) of its round" in result.stdout, output
    assert "2 rounds: each compared script ran 2 times" in result.stdout, output

    targets = result.stdout.split("targets (issue 9", 1)[1].splitlines()[2:]
    verdicts = [line.split()[-1] for line in targets if line.split()[-1] in ("PASS", "FAIL")]
    assert len(verdicts) == 5, output
    assert "2 rounds, not 3; product, deltas, pgbench at 3 VUs, not 50" in targets[-1], output

    meta = json.loads((bench_dir / "meta.json").read_text())
    assert (meta["pinned"], meta["server_cpus"], meta["client_cpus"]) == ("1", "1", "0"), meta
    assert meta["workers"] == "1" and meta["label"] == "e2e", meta
    assert meta["settings"] == {"WEB_CONCURRENCY": "1", "FAST_LANE": "0"}, meta
    markdown = (bench_dir / "results.md").read_text()
    assert "settings: WEB_CONCURRENCY=1, FAST_LANE=0; 200 products; label: e2e" in markdown
    assert "| seed-pagination | 3 | 1s | 2 |" in markdown, markdown
    assert "![req/s per scenario](reqs.png)" in markdown
    for name in ("reqs.png", "latency.png"):
        assert (bench_dir / name).read_bytes()[:8] == PNG
        assert (docs / name).read_bytes() == (bench_dir / name).read_bytes()
    assert (docs / "results.md").read_text() == markdown
    block = readme.read_text()
    assert "none yet" not in block and "![req/s per scenario](docs/bench/reqs.png)" in block
    assert_all_stopped(bench_dir)


def test_bench_ab_end_to_end(tmp_path):
    """`BENCH_AB="METRICS=0" scripts/bench --pin product`, tiny: a third gunicorn, the app with
    METRICS=0, runs product in the same rounds, after the app in round 1 and before it in round 2,
    one run after the other; each has its row and x raw, the note gives each round's cost, and
    the variant's row reads no /metrics (it has none: scripts/bench checked it answered 404)."""
    bench_dir = tmp_path / "bench"
    settings = {"VUS": "3", "DURATION": "1s", "BENCH_ROUNDS": "2", "BENCH_AB": "METRICS=0"}
    result = run_bench(["--pin", "product"], bench_env(bench_dir, **settings), 240)
    output = f"stdout:\n{result.stdout}\nstderr:\n{result.stderr}"
    assert result.returncode == 0, output

    runs = runs_in_order(bench_dir)
    assert [run[0] for run in runs] == [
        "raw.product.1",
        "product.1",
        "product+ab.product.1",
        "raw.product.2",
        "product+ab.product.2",
        "product.2",
    ], output
    assert all(rc == "0" for *_, rc in runs), runs
    for before, after in pairwise(runs):
        assert before[1] < before[2] <= after[1], (before, after)

    rows = table_rows(result.stdout)
    assert list(rows) == ["raw", "product", "product [METRICS=0]"], output
    variant = rows["product [METRICS=0]"]
    assert variant["runs"] == "2" and variant["result"] == "ok", output
    assert variant["cache hit %"] == "-" and rows["product"]["cache hit %"] != "-", output
    assert not list(bench_dir.glob("product+ab.*.cache"))  # no snapshot of a /metrics it lacks
    assert list(bench_dir.glob("product.1.*.cache"))
    costs = []
    for r in (1, 2):
        app, ab = (
            summary_of(bench_dir, f"{n}.{r}")["rps"] for n in ("product", "product+ab.product")
        )
        raw = summary_of(bench_dir, f"raw.product.{r}")["rps"]
        assert ratios(variant["x raw"])[1][r - 1] == pytest.approx(ab / raw, abs=0.01)
        costs.append(100 * (ab / app - 1))
    x = r"(-?[\d.]+)"
    note = re.search(
        rf"^product against product \[METRICS=0\]: costs {x}% \({x}, {x}\) in req/s; "
        rf"{x}% \({x}, {x}\) in CPU per request \({x} ms, {x} ms\)$",
        result.stdout,
        re.M,
    )
    assert note, output
    figures = [float(x) for x in note.groups()]
    assert figures[1:3] == pytest.approx(costs, abs=0.06)
    assert figures[0] == pytest.approx(sum(costs) / 2, abs=0.06)

    # Each server's CPU time over each of its runs was recorded (the app's, the variant's, the
    # raw reference's); the CPU costs compare the app's per request with the variant's.
    def cpu_ms(stem):
        used = json.loads((bench_dir / f"{stem}.after.cpu").read_text()) - json.loads(
            (bench_dir / f"{stem}.before.cpu").read_text()
        )
        return 1000 * used / summary_of(bench_dir, stem)["requests"]

    assert cpu_ms("raw.product.1") > 0
    for r in (1, 2):
        app, ab = cpu_ms(f"product.{r}"), cpu_ms(f"product+ab.product.{r}")
        assert app > 0 and ab > 0
        assert figures[3 + r] == pytest.approx(100 * (app / ab - 1), abs=0.06)

    meta = json.loads((bench_dir / "meta.json").read_text())
    assert meta["ab"] == "METRICS=0" and meta["command"].startswith('BENCH_AB="METRICS=0" ')
    assert "A/B variant: METRICS=0" in (bench_dir / "results.md").read_text()
    assert_all_stopped(bench_dir)


def test_bench_dry_run_plans_the_ab_variant_next_to_the_app(tmp_path):
    env = bench_env(tmp_path / "bench", BENCH_ROUNDS="2", BENCH_WARMUP="3s", BENCH_AB="METRICS=0")
    result = run_bench(["--dry-run", "stock", "spike"], env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:5] == [
        "stock: warm-up, 3s of stock.js (discarded)",
        "stock [METRICS=0]: warm-up, 3s of stock.js (discarded)",
        "raw.stock.1: the raw reference for stock, round 1 of 2, 200 VUs for 30s of product.js "
        "(RAW=1)",
        "stock.1: stock, round 1 of 2, 200 VUs for 30s",
        "stock+ab.stock.1: stock [METRICS=0], round 1 of 2, 200 VUs for 30s",
    ]
    steps = [line.split(":", 1)[0] for line in result.stdout.splitlines()]
    assert steps[5:] == ["raw.stock.2", "stock+ab.stock.2", "stock.2", "spike", "spike"]
    assert not (tmp_path / "bench").exists()


def test_bench_dry_run_prints_compares_rounds_and_starts_nothing(tmp_path):
    """Issue 9's whole comparison, planned: each script in rounds with its reference, pgbench in
    the deltas' rounds, each warm-up before its script's first raw run."""
    env = bench_env(tmp_path / "bench", BENCH_ROUNDS="2", BENCH_WARMUP="3s")
    result = run_bench(["--dry-run", "--pin", "compare"], env, timeout=60)
    assert result.returncode == 0, result.stderr
    steps = [line.split(":", 1)[0] for line in result.stdout.splitlines()]
    expected = []
    for name, ref in [("product", "raw"), ("stock", "raw"), ("products", "raw")]:
        expected += [name, f"{ref}.{name}.1", f"{name}.1", f"{ref}.{name}.2", f"{name}.2"]
    expected += ["deltas", "raw.deltas.1", "deltas.1", "pgbench.deltas.1"]
    expected += ["raw.deltas.2", "deltas.2", "pgbench.deltas.2"]
    for name in ("seed-stock", "seed-pagination"):
        ref = f"raw-{name}.{name}"
        expected += [name, f"{ref}.1", f"{name}.1", f"{ref}.2", f"{name}.2"]
    assert steps == expected, result.stdout
    lines = result.stdout.splitlines()
    assert lines[0] == "product: warm-up, 3s of product.js (discarded)"
    assert lines[1] == (
        "raw.product.1: the raw reference for product, round 1 of 2, 50 VUs for 30s of product.js "
        "(RAW=1)"
    )
    assert (
        "raw-seed-stock.seed-stock.2: the raw reference for seed-stock, round 2 of 2, 300 VUs"
        in (result.stdout)
    )
    assert not (tmp_path / "bench").exists()  # no lock, no server


@pytest.mark.parametrize(
    ("args", "settings", "message"),
    [
        (["--bogus"], {}, "unknown option '--bogus'"),
        (["pgbench"], {"DATABASE_URL": "postgresql://x@127.0.0.1:1/x"}, "DATABASE_URL"),
        (["product"], {"BENCH_RAW": "yes"}, "BENCH_RAW must be 0 or 1"),
        (["product"], {"BENCH_ROUNDS": "0"}, "BENCH_ROUNDS must be a positive whole number"),
        (["--pin", "product"], {"PIN_SERVER_CPU": "4096"}, "cannot run on CPU 4096"),
        (["product"], {"BENCH_AB": "METRIC=0"}, "BENCH_AB: METRIC is not a setting"),
        (["product"], {"BENCH_AB": "METRICS=maybe"}, "BENCH_AB: METRICS must be 1 or 0"),
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
