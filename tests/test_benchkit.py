"""scripts/benchkit.py's plan, report and parsers on small hand-made k6 summaries: no server, no k6.

The summaries have the shape k6/lib.js writes under "faststock" (with the extra fields of
k6/spike.js, k6/redis-outage.js and the seed scenarios where a test needs them); runs in rounds
are built as the plan orders them (`interleaved`). scripts/bench's own end-to-end runs are in
test_bench.py.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import replace

import pytest

import benchkit
import rawref
from benchkit import Run, Step, measure, render, report, series_report, targets
from faststock.config import Config


def figures(**extra):
    """One script's (or scenario's, endpoint's, phase's) figures as k6/lib.js reports them."""
    return {
        "requests": 300,
        "rps": 100.04,
        "avg_ms": 1.234,
        "p50_ms": 1.5,
        "p90_ms": 2.0,
        "p95_ms": 3.456,
        "p99_ms": 9.0,
        "failed_rate": 0.005,
        **extra,
    }


def summary(**extra):
    return {"script": "product", "vus": 5, "duration": "3s", **figures(), **extra}


def outage_summary(down=False, hit_resumed=0.25, outage_p95=6.0):
    def phase(requests, p95, x_cache):
        return figures(requests=requests, p95_ms=p95, seconds=1.0, x_cache=x_cache)

    quiet = 0 if down else 100
    return summary(
        outage={"start_s": 1, "end_s": 2, "load_started_s": 0.05, "down": down},
        phases={
            "before": phase(quiet, 2.0, {"HIT": 90, "MISS": 10, "BYPASS": 0, "none": 0}),
            "outage": phase(100, outage_p95, {"HIT": 0, "MISS": 0, "BYPASS": 100, "none": 0}),
            "after": phase(quiet, 3.0, {"HIT": 3, "MISS": 0, "BYPASS": 1, "none": 0}),
        },
        failed_requests=0,
        hit_resumed_after_s=None if down else hit_resumed,
    )


def rows_by_label(rows):
    return {row[0]: dict(zip(benchkit.HEAD, row, strict=True)) for row in rows}


def run_report(run):
    """The rows, notes and outage p95 of a script run once."""
    return series_report(measure([run])[run.name])


def interleaved(group, *scripts):
    """The runs of `group`'s rounds in the order the plan runs them: scripts are (NAME, FIGURES),
    FIGURES one per round, each a summary or a req/s (at() of it); round i runs the i-th of each
    script, in the order given (the reference first)."""
    rounds = len(scripts[0][1])
    return [
        Run(name, "0", f if isinstance(f, dict) else at(f), group=group, round=r + 1)
        for r in range(rounds)
        for name, figures_ in scripts
        for f in [figures_[r]]
    ]


def test_cache_counts_sums_outcomes_over_routes_and_ignores_other_series():
    metrics = "\n".join(
        [
            "# TYPE faststock_cache_requests_total counter",
            'faststock_cache_requests_total{endpoint="product",result="HIT"} 120.0',
            'faststock_cache_requests_total{endpoint="stock",result="HIT"} 30.0',
            'faststock_cache_requests_total{endpoint="list",result="MISS"} 7.0',
            'faststock_cache_requests_total{endpoint="list"} 2.0',
            'faststock_cache_requests_created{endpoint="product",result="HIT"} 1.7e9',
            'flask_http_request_total{method="GET",status="200"} 5.0',
        ]
    )
    assert benchkit.cache_counts(metrics) == {"HIT": 150.0, "MISS": 7.0, "?": 2.0}
    assert benchkit.cache_counts("") == {}


def test_hit_rate():
    assert benchkit.hit_rate({"HIT": 3, "MISS": 1, "BYPASS": 0}) == "75.0"
    assert benchkit.hit_rate({"HIT": 0, "MISS": 0}) == "-"  # nothing read: no rate at all
    assert benchkit.hit_rate({}) == "-"


@pytest.mark.parametrize(
    ("rc", "result"), [("0", "ok"), ("99", "THRESHOLDS"), ("124", "TIMEOUT"), ("1", "ERROR(1)")]
)
def test_result_names_k6_exit_statuses(rc, result):
    assert run_report(Run("product", rc, summary()))[0][0][-1] == result


def test_row_of_a_script():
    rows, notes, p95 = run_report(Run("product", "0", summary(), before={}, after={"HIT": 4.0}))
    assert len(rows) == 1 and len(rows[0]) == len(benchkit.HEAD)
    assert rows[0][:8] == ["product", "5", "3s", "1", "100.0", "-", "1.23", "1.50"]
    assert rows[0][8:] == ["2.00", "3.46", "9.00", "0.50", "100.0", "ok"]
    assert notes == [] and p95 == {}


def test_missing_figures_are_dashes():
    s = summary(avg_ms=None, p50_ms=None, p90_ms=None, p95_ms=None, p99_ms=None, failed_rate=None)
    row = rows_by_label(run_report(Run("product", "0", s))[0])["product"]
    columns = ("avg ms", "p50 ms", "p90 ms", "p95 ms", "p99 ms", "failed %")
    assert [row[c] for c in columns] == ["-"] * 6
    assert row["cache hit %"] == "-"  # no counters recorded


def test_hit_rate_is_of_the_run_alone():
    """The counters are cumulative since gunicorn started: only the run's difference counts."""
    run = Run(
        "product",
        "0",
        summary(),
        before={"HIT": 100.0, "MISS": 50.0},
        after={"HIT": 190.0, "MISS": 60.0},
    )
    assert rows_by_label(run_report(run)[0])["product"]["cache hit %"] == "90.0"


def test_a_run_without_a_summary_still_has_its_row():
    rows, notes, _ = run_report(Run("stock", "124"))
    assert rows == [["stock", "-", "-", "1", *["-"] * 9, "TIMEOUT"]] and notes == []


def test_scenarios_and_endpoints_get_rows_of_their_own():
    s = summary(
        scenarios={"random": figures(rps=50.0), "hot": figures(rps=60.0, failed_rate=None)},
        endpoints={"POST /api/products/:id/update-stock": figures()},
    )
    rows = rows_by_label(run_report(Run("update-stock", "0", s))[0])
    assert list(rows) == [
        "update-stock",
        "  update-stock:random",
        "  update-stock:hot",
        "  POST /api/products/:id/update-stock",
    ]
    hot = rows["  update-stock:hot"]
    assert (hot["VUs"], hot["duration"], hot["req/s"], hot["failed %"]) == ("5", "3s", "60.0", "-")
    assert hot["result"] == "" and hot["cache hit %"] == "-" and hot["runs"] == "1"
    endpoint = rows["  POST /api/products/:id/update-stock"]
    assert (endpoint["VUs"], endpoint["duration"], endpoint["runs"]) == ("", "", "")


def test_spike_notes_its_answers_and_health():
    s = summary(statuses={"200": 90, "503": 10, "other": 0}, p95_200_ms=12.5)
    health = {"healthy": True, "detail": "/healthz 200 in 3 ms, /api/products/7 200 in 2 ms"}
    rows, notes, _ = run_report(Run("spike", "0", s, health=health))
    assert rows[0][-1] == "ok"
    assert notes == [
        "spike: healthy after: yes (/healthz 200 in 3 ms, /api/products/7 200 in 2 ms)",
        "spike: answers 200 90, 503 10, other 0; p95 of the 200s 12.50 ms",
    ]


def test_an_unhealthy_spike_fails_its_row_unless_k6_failed_already():
    health = {"healthy": False, "detail": "/healthz ConnectionRefusedError in 0 ms"}
    rows, notes, _ = run_report(Run("spike", "0", None, health=health))
    assert rows[0][-1] == "UNHEALTHY"
    assert notes == ["spike: healthy after: NO (/healthz ConnectionRefusedError in 0 ms)"]
    assert run_report(Run("spike", "99", None, health=health))[0][0][-1] == "THRESHOLDS"


def test_redis_outage_rows_per_phase_and_note():
    events = [["stopped", "1030"], ["started", "2015"]]
    rows, notes, p95 = run_report(Run("redis-outage", "0", outage_summary(), events=events))
    by_label = rows_by_label(rows)
    assert list(by_label) == [
        "redis-outage",
        "  redis-outage:before",
        "  redis-outage:outage",
        "  redis-outage:after",
    ]
    assert by_label["  redis-outage:before"]["cache hit %"] == "90.0"
    assert by_label["  redis-outage:outage"]["cache hit %"] == "0.0"
    assert by_label["  redis-outage:after"]["duration"] == "1.0s"
    assert notes == [
        "redis-outage: p95 before 2.00 ms / outage 6.00 ms / after 3.00 ms; failed requests 0 of "
        "300; first HIT after restore: 0.25 s (outage 1-2 s; Redis stopped at +1.03 s, started "
        "at +2.02 s)"
    ]
    assert p95 == {"redis-outage": 6.0}


def test_redis_outage_without_a_hit_or_events_says_so():
    run = Run("redis-outage", "99", outage_summary(hit_resumed=None))
    note = run_report(run)[1][0]
    assert "first HIT after restore: none" in note and "Redis never stopped" in note


def test_redis_down_hides_its_empty_phases():
    rows, notes, p95 = run_report(Run("redis-down", "0", outage_summary(down=True, outage_p95=4.0)))
    assert [row[0] for row in rows] == ["redis-down", "  redis-down:outage"]
    assert notes == ["redis-down: p95 4.00 ms with Redis down throughout; failed requests 0 of 300"]
    assert p95 == {"redis-down": 4.0}


def test_the_outage_ratio_needs_both_runs():
    down = Run("redis-down", "0", outage_summary(down=True, outage_p95=4.0))
    outage = Run("redis-outage", "0", outage_summary(outage_p95=6.0))
    notes = report(measure([down, outage]))[1]
    assert notes[-1] == "outage p95 / redis-down p95 = 1.50 (the criterion: at most 2)"
    assert not any("criterion" in note for note in report(measure([outage]))[1])


def test_render_aligns_names_left_and_figures_right():
    rows = [
        ["product", "5", "3s", "2", "100.0", "0.50x (0.40, 0.60)", "1.23", "1.50", "2.00", "3.46"],
        ["  GET /x", "", "", "", "1.0", "-", "1.00", "1.00", "1.00", "1.00"],
    ]
    rows[0] += ["9.00", "0.50", "90.0", "ok"]
    rows[1] += ["1.00", "0.00", "-", ""]
    assert render(rows, []).splitlines() == [
        "script    VUs  duration  runs  req/s               x raw  avg ms  p50 ms  p90 ms  "
        "p95 ms  p99 ms  failed %  cache hit %  result",
        "product     5        3s     2  100.0  0.50x (0.40, 0.60)    1.23    1.50    2.00  "
        "  3.46    9.00      0.50         90.0      ok",
        "  GET /x                         1.0                   -    1.00    1.00    1.00  "
        "  1.00    1.00      0.00            -",  # the empty result cell's blanks are stripped
    ]
    assert render(rows, ["a note"]).endswith("            -\n\na note\n")


def test_table_reads_what_a_run_left_in_bench_dir(tmp_path, capsys):
    (tmp_path / "product.json").write_text(json.dumps({"faststock": summary(), "k6": {}}))
    (tmp_path / "product.before.cache").write_text(json.dumps({"HIT": 1.0}))
    (tmp_path / "product.after.cache").write_text(json.dumps({"HIT": 2.0, "MISS": 1.0}))
    (tmp_path / "stock.json").write_text("{truncated")  # k6 killed mid-write
    (tmp_path / "redis-outage.json").write_text(json.dumps({"faststock": outage_summary()}))
    (tmp_path / "redis-outage.events").write_text("stopped=1030\nstarted=2015\n")

    assert benchkit.main(["table", str(tmp_path), "product:0", "stock:1", "redis-outage:0"]) == 0
    out = capsys.readouterr().out
    rows = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    assert rows["product"][-2:] == ["50.0", "ok"]
    assert rows["stock"] == ["stock", "-", "-", "1", *["-"] * 9, "ERROR(1)"]
    assert "Redis stopped at +1.03 s, started at +2.02 s" in out
    assert (tmp_path / "results.md").read_text().count("| product | 5 | 3s |") == 1


@pytest.mark.parametrize(
    ("setting", "line"),
    [
        ("DB_POOL_SIZE=abc", "DB_POOL_SIZE must be a whole number, got 'abc'"),
        ("LOG_LEVEL=chatty", "LOG_LEVEL must be one of"),
    ],
)
def test_check_config_exits_with_the_apps_one_line(monkeypatch, setting, line):
    name, value = setting.split("=")
    monkeypatch.setenv(name, value)
    with pytest.raises(SystemExit) as exit_info:
        benchkit.main(["check-config"])
    message = str(exit_info.value.code)
    assert message.startswith(f"faststock: configuration error: {line}")
    assert "\n" not in message


def test_check_config_accepts_the_defaults(monkeypatch):
    for name in Config().env_names:
        monkeypatch.delenv(name, raising=False)
    assert benchkit.main(["check-config"]) == 0


# ---- the plan: rounds of each script next to its raw reference ----


def test_rawref_answers_a_constant_62_byte_json_body():
    seen = []
    body = b"".join(rawref.app({"PATH_INFO": "/anything"}, lambda *a: seen.append(a)))
    assert body == rawref.BODY and len(body) == 62
    assert json.loads(body) == {"id": 42, "name": "Product 000042", "price": "327.98", "stock": 224}
    status, headers = seen[0]
    assert status == "200 OK"
    assert dict(headers) == {"Content-Type": "application/json", "Content-Length": "62"}


def ids(steps):
    return [s.id for s in steps if s.kind != "warmup"]


def test_plan_alternates_each_script_with_its_raw_reference_round_by_round():
    steps = benchkit.plan(["product", "seed-stock"], 3, with_raw=True)
    assert steps[:3] == [
        Step("warmup", "-", "product", "product", 0, "product"),
        Step("raw", "raw.product.1", "raw", "product", 1, "product"),
        Step("run", "product.1", "product", "product", 1, "product"),
    ]
    assert ids(steps) == [
        "raw.product.1",
        "product.1",
        "raw.product.2",
        "product.2",
        "raw.product.3",
        "product.3",
        "raw-seed-stock.seed-stock.1",
        "seed-stock.1",
        "raw-seed-stock.seed-stock.2",
        "seed-stock.2",
        "raw-seed-stock.seed-stock.3",
        "seed-stock.3",
    ]
    # Each script's warm-up comes once, before its first raw run: that run stays next to round 1.
    warmups = [i for i, s in enumerate(steps) if s.kind == "warmup"]
    assert warmups == [0, 7] and steps[8].id == "raw-seed-stock.seed-stock.1"
    assert {s.script for s in steps if s.name == "raw-seed-stock"} == {"seed-stock"}


def test_plan_runs_pgbench_in_the_deltas_rounds_for_their_composed_limit():
    steps = benchkit.plan(["pgbench", "deltas"], 2, with_raw=True)
    assert ids(steps) == [
        "raw.deltas.1",
        "deltas.1",
        "pgbench.deltas.1",
        "raw.deltas.2",
        "deltas.2",
        "pgbench.deltas.2",
    ]
    assert [s.script for s in steps if s.name == "pgbench"] == ["-", "-"]
    assert [s.name for s in steps if s.kind == "warmup"] == ["deltas"]
    alone = benchkit.plan(["pgbench"], 2, with_raw=True)  # no deltas: no limit, no reference
    assert [(s.kind, s.id) for s in alone] == [("run", "pgbench.1"), ("run", "pgbench.2")]


def test_plan_runs_resilience_scripts_once_and_each_name_once():
    steps = benchkit.plan(["spike", "product", "redis-outage", "product"], 2, with_raw=True)
    assert ids(steps) == [
        "spike",
        "raw.product.1",
        "product.1",
        "raw.product.2",
        "product.2",
        "redis-outage",
    ]
    assert steps[1] == Step("run", "spike", "spike", "spike", 0, "spike")


def test_plan_without_raw_or_warmup():
    steps = benchkit.plan(["seed-pagination"], 2, with_raw=False, warmup=False)
    assert [(s.kind, s.id) for s in steps] == [
        ("run", "seed-pagination.1"),
        ("run", "seed-pagination.2"),
    ]


def test_plan_command_prints_one_step_a_line(capsys):
    assert benchkit.main(["plan", "2", "1", "0", "deltas", "pgbench"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "raw raw.deltas.1 raw deltas 1 product",
        "run deltas.1 deltas deltas 1 deltas",
        "run pgbench.deltas.1 pgbench deltas 1 -",
        "raw raw.deltas.2 raw deltas 2 product",
        "run deltas.2 deltas deltas 2 deltas",
        "run pgbench.deltas.2 pgbench deltas 2 -",
    ]


@pytest.mark.parametrize(
    ("key", "run_id"),
    [
        (("spike", "spike", 0), "spike"),
        (("product", "product", 2), "product.2"),
        (("raw", "product", 3), "raw.product.3"),
        (("raw-seed-stock", "seed-stock", 1), "raw-seed-stock.seed-stock.1"),
        (("product+ab", "product", 2), "product+ab.product.2"),
    ],
)
def test_run_ids_name_the_script_its_group_and_round(key, run_id):
    assert benchkit.run_id(*key) == run_id
    assert benchkit.parse_id(run_id) == key


# ---- medians and ratios over rounds, and targets ----


def at(rps, **extra):
    """A run's summary at `rps` req/s (50 VUs, as the targets are stated; no failed request)."""
    return summary(**{"rps": rps, "vus": 50, "failed_rate": 0.0, **extra})


def test_each_round_is_compared_with_the_raw_run_next_to_it_and_the_median_taken():
    """The reference drifts from round to round (1000, 4000, 2000 req/s): round i's ratio is
    to round i's reference, not to a median (or first) reference."""
    runs = interleaved("product", ("raw", [1000.0, 4000.0, 2000.0]), ("product", [900, 3000, 1000]))
    measured = measure(runs)
    assert measured["product"].ratios == (0.9, 0.75, 0.5)
    rows = rows_by_label(report(measured)[0])
    assert rows["product"]["x raw"] == "0.75x (0.90, 0.75, 0.50)"
    assert (rows["product"]["req/s"], rows["product"]["runs"]) == ("1000.0", "3")
    # Not the ratio of the medians: 1000 / 2000.
    assert (rows["raw"]["req/s"], rows["raw"]["x raw"], rows["raw"]["runs"]) == (
        "2000.0",
        "ref",
        "3",
    )


def test_a_round_without_its_reference_has_no_ratio_and_the_median_is_of_the_others():
    runs = interleaved("product", ("raw", [1000.0, 1000.0, 1000.0]), ("product", [800, 900, 700]))
    del runs[2]  # round 2's raw run left nothing
    assert measure(runs)["product"].ratios == (0.8, None, 0.7)
    assert rows_by_label(report(measure(runs))[0])["product"]["x raw"] == "0.75x (0.80, -, 0.70)"


def test_rows_show_medians_of_the_rounds_latencies_and_failures_over_all():
    fast = figures(rps=900.0, p50_ms=1.0, p95_ms=2.0, p99_ms=30.0, requests=100, failed_rate=0.0)
    slow = figures(rps=500.0, p50_ms=9.0, p95_ms=90.0, p99_ms=99.0, requests=300, failed_rate=0.01)
    mid = figures(rps=700.0, p50_ms=5.0, p95_ms=50.0, p99_ms=3.0, requests=100, failed_rate=0.0)
    runs = [
        Run("product", "0", {**summary(), **s}, group="product", round=r)
        for r, s in enumerate([fast, slow, mid], 1)
    ]
    row = rows_by_label(report(measure(runs))[0])["product"]
    assert (row["req/s"], row["p50 ms"], row["p95 ms"], row["p99 ms"]) == (
        "700.0",
        "5.00",
        "50.00",
        "30.00",  # each figure's own median, not the median run's
    )
    assert row["failed %"] == "0.60"  # 3 of 500 requests
    assert row["x raw"] == "-"  # no reference ran


def test_hit_rate_and_result_are_over_every_round():
    runs = [
        Run("stock", "0", summary(), before={"HIT": 0.0}, after={"HIT": 9.0, "MISS": 1.0}),
        Run("stock", "99", summary(), before={"HIT": 9.0, "MISS": 1.0}, after={"HIT": 19.0}),
    ]
    runs = [replace(r, group="stock", round=i) for i, r in enumerate(runs, 1)]
    row = rows_by_label(report(measure(runs))[0])["stock"]
    assert (row["cache hit %"], row["result"]) == ("95.0", "THRESHOLDS")  # 19 of 20; round 2


def test_scenario_rows_have_their_own_ratios_per_round():
    def stock(random_rps):
        return at(300.0, scenarios={"random": figures(rps=random_rps)})

    runs = interleaved(
        "update-stock", ("raw", [1000.0, 500.0]), ("update-stock", [stock(100.0), stock(100.0)])
    )
    rows = rows_by_label(report(measure(runs))[0])
    assert rows["  update-stock:random"]["x raw"] == "0.15x (0.10, 0.20)"
    assert rows["update-stock"]["x raw"] == "0.45x (0.30, 0.60)"


def test_every_row_shows_its_ratio_to_the_reference_of_its_shape():
    runs = [
        *interleaved("product", ("raw", [1000.0]), ("product", [500.0])),
        *interleaved(
            "update-stock",
            ("raw", [1000.0]),
            ("update-stock", [at(300.0, scenarios={"random": figures(rps=250.0)})]),
        ),
        *interleaved("seed-stock", ("raw-seed-stock", [100.0]), ("seed-stock", [90.0])),
        Run("pgbench", "0", at(4000.0), round=1),
        Run("spike", "0", at(2000.0)),
    ]
    x = {label.strip(): r["x raw"] for label, r in rows_by_label(report(measure(runs))[0]).items()}
    assert x == {
        "raw": "ref",
        "product": "0.50x",  # one round: no brackets
        "update-stock": "0.30x",
        "update-stock:random": "0.25x",
        "raw-seed-stock": "ref",
        "seed-stock": "0.90x",  # its own reference, not raw
        "pgbench": "-",  # transactions, not HTTP answers: the composed limit's note says more
        "spike": "-",
    }


def test_without_its_reference_a_row_has_no_ratio():
    runs = [Run("product", "0", at(500.0), round=1), Run("seed-stock", "0", at(90.0), round=1)]
    rows, _ = report(measure(runs))
    assert [row[benchkit.HEAD.index("x raw")] for row in rows] == ["-", "-"]


def test_a_reference_of_another_round_or_script_is_not_used():
    runs = [
        Run("raw", "0", at(1000.0), group="stock", round=1),
        Run("product", "0", at(500.0), group="product", round=1),
        Run("raw", "0", at(1000.0), group="product", round=2),
    ]
    assert measure(runs)["product"].ratios == ()


def test_composed_limit():
    assert benchkit.composed_limit(1000.0, 1000.0) == 500.0
    assert benchkit.composed_limit(3000.0, 6000.0) == pytest.approx(2000.0)
    assert benchkit.composed_limit(None, 1000.0) is None
    assert benchkit.composed_limit(1000.0, 0.0) is None


def test_deltas_note_shows_the_composed_limit():
    runs = interleaved("deltas", ("raw", [3000.0]), ("deltas", [500.0]), ("pgbench", [6000.0]))
    assert report(measure(runs))[1] == [
        "deltas: 500.0 req/s = 0.25x the composed limit 2000.0/s = 1 / (1/raw 3000.0 + 1/pgbench "
        "6000.0)"
    ]
    assert report(measure(runs[:2]))[1] == []  # no pgbench, no limit


def test_deltas_are_measured_against_each_rounds_own_limit():
    runs = interleaved(
        "deltas",
        ("raw", [3000.0, 1000.0, 2000.0]),
        ("deltas", [500.0, 300.0, 500.0]),
        ("pgbench", [6000.0, 1000.0, 2000.0]),
    )
    deltas = measure(runs)["deltas"]
    assert [limit.value for limit in deltas.limits] == pytest.approx([2000.0, 500.0, 1000.0])
    assert deltas.of_limits == pytest.approx((0.25, 0.6, 0.5))
    notes = report(measure(runs))[1]
    assert notes[0].startswith("3 rounds: each compared script ran 3 times, each right after")
    assert notes[-1] == (
        "deltas: 0.50x (0.25, 0.60, 0.50) the composed limit 1 / (1/raw + 1/pgbench) of its "
        "round: 2000.0, 500.0, 1000.0/s, from raw 3000.0, 1000.0, 2000.0 and pgbench 6000.0, "
        "1000.0, 2000.0"
    )
    last = targets(measure(runs))[-2]
    assert last.row() == [
        "deltas req/s / 1/(1/raw + 1/pgbench)",
        "0.50x (0.25, 0.60, 0.50)",
        ">= 0.50x",
        "PASS",
    ]


def test_seed_runs_note_their_think_time():
    runs = [
        Run("seed-pagination", "0", at(90.0, think_ms=50, pages=10)),
        Run("seed-stock", "0", at(9.0, think_ms=50)),
    ]
    assert report(measure(runs))[1] == [
        "seed-pagination: 50 ms think time after each answer, pages 1..10",
        "seed-stock: 50 ms think time after each answer",
    ]


def all_targets(product=900.0, stock=899.0, seed=950.0, seed_p95=12.0, deltas=250.0, rounds=1):
    """The runs of a whole compare, `rounds` alike: raw 1000 req/s, pgbench 1000 tps (a limit of
    500/s), the seed pagination reference at 1000 req/s with a p95 of 5 ms (a bound of 12 ms)."""

    def alike(*scripts):
        return [(name, [f] * rounds) for name, f in scripts]

    seed_pagination = at(seed, p95_ms=seed_p95, vus=200, think_ms=50, pages=10)
    return [
        *interleaved("product", *alike(("raw", 1000.0), ("product", product))),
        *interleaved("stock", *alike(("raw", 1000.0), ("stock", stock))),
        *interleaved("products", *alike(("raw", 1000.0), ("products", 800.0))),
        *interleaved("deltas", *alike(("raw", 1000.0), ("deltas", deltas), ("pgbench", 1000.0))),
        *interleaved(
            "seed-pagination",
            *alike(
                ("raw-seed-pagination", at(1000.0, p95_ms=5.0, vus=200)),
                ("seed-pagination", seed_pagination),
            ),
        ),
    ]


def test_targets_pass_at_their_bounds_and_fail_past_them():
    assert [t.row() for t in targets(measure(all_targets()))] == [
        ["product req/s / raw", "0.90x", ">= 0.90x", "PASS"],
        ["stock req/s / raw", "0.899x", ">= 0.90x", "FAIL"],  # not rounded up to the target
        ["products req/s / raw", "0.80x", ">= 0.80x", "PASS"],
        ["seed-pagination req/s / raw-seed-pagination", "0.95x", ">= 0.95x", "PASS"],
        ["seed-pagination p95 (medians; 2x raw's + 2 ms)", "12.00 ms", "<= 12.00 ms", "PASS"],
        ["deltas req/s / 1/(1/raw + 1/pgbench)", "0.50x", ">= 0.50x", "PASS"],
        ["failed requests, every run", "none", "none", "PASS"],
    ]
    runs = all_targets(product=899.0, seed=949.0, seed_p95=12.01, deltas=249.0)
    assert [t.ok for t in targets(measure(runs))] == [False, False, True, False, False, False, True]
    runs = all_targets(product=899.96, stock=900.0)
    shown = [t.row()[1:] for t in targets(measure(runs))][:2]
    assert shown == [["0.89996x", ">= 0.90x", "FAIL"], ["0.90x", ">= 0.90x", "PASS"]]


def edited(runs, which, **figures_):
    """`runs` with the summary of those `which` names (a script, or a (name, group, round) key)
    changed by figures_."""
    return [
        replace(r, summary={**r.summary, **figures_}) if which in (r.name, r.key) else r
        for r in runs
    ]


def test_targets_are_judged_on_the_median_of_the_rounds():
    """One bad round of three does not fail a target, two do; the pagination p95 compares the
    median of its p95s with the reference's."""
    runs = edited(all_targets(rounds=3), ("product", "product", 2), rps=500.0)
    found = {t.what: t for t in targets(measure(runs))}
    assert found["product req/s / raw"].row()[1:] == [
        "0.90x (0.90, 0.50, 0.90)",
        ">= 0.90x",
        "PASS",
    ]
    runs = edited(runs, ("product", "product", 3), rps=899.0)
    found = {t.what: t for t in targets(measure(runs))}
    assert found["product req/s / raw"].row()[1:] == [
        "0.899x (0.90, 0.50, 0.90)",
        ">= 0.90x",
        "FAIL",
    ]

    p95_target = "seed-pagination p95 (medians; 2x raw's + 2 ms)"  # the reference's: 5 ms
    runs = edited(runs, ("seed-pagination", "seed-pagination", 1), p95_ms=30.0)
    runs = edited(runs, ("seed-pagination", "seed-pagination", 2), p95_ms=11.0)
    p95 = {t.what: t for t in targets(measure(runs))}[p95_target]
    assert (p95.measured, p95.needed, p95.ok) == ("12.00 ms", "<= 12.00 ms", True)
    runs = edited(runs, ("seed-pagination", "seed-pagination", 2), p95_ms=13.0)
    p95 = {t.what: t for t in targets(measure(runs))}[p95_target]
    assert (p95.measured, p95.ok) == ("13.00 ms", False)
    runs = edited(runs, ("raw-seed-pagination", "seed-pagination", 3), p95_ms=7.0)
    runs = edited(runs, ("raw-seed-pagination", "seed-pagination", 2), p95_ms=6.0)
    p95 = {t.what: t for t in targets(measure(runs))}[p95_target]
    assert (p95.needed, p95.ok) == ("<= 14.00 ms", True)  # 2 x the median 6 ms + 2


def test_a_target_needs_its_reference():
    runs = all_targets()
    no_raw = [r for r in runs if r.name != "raw"]
    assert targets(measure(no_raw))[0].what.startswith("seed-pagination")
    just = [r for r in no_raw if r.name in ("product", "deltas")]
    assert targets(measure(just)) == []  # no ratio: no targets
    only_product = [r for r in runs if r.group == "product"]
    assert [t.what for t in targets(measure(only_product))] == [
        "product req/s / raw",
        "failed requests, every run",
    ]


def test_the_failed_requests_target_names_every_run_that_failed_one():
    runs = edited(all_targets(), ("raw", "product", 1), failed_rate=0.001)
    runs = edited(runs, "deltas", failed_rate=0.02)
    last = targets(measure(runs))[-1]
    # raw: 1 of its 4 runs (300 requests each) failed 0.1%, so 0.025% of all its requests.
    assert (last.measured, last.ok) == ("raw 0.03%, deltas 2.00%", False)


def test_target_caveats_say_how_a_run_differs_from_the_targets_one():
    measured = measure(all_targets(rounds=3))
    assert benchkit.target_caveats({"pinned": "1", "workers": "1"}, measured) == []
    runs = edited(edited(all_targets(rounds=2), "product", vus=5), "stock", vus=5)
    runs = edited(runs, "seed-pagination", think_ms=0)
    assert benchkit.target_caveats({"pinned": "0", "workers": "2"}, measure(runs)) == [
        "not pinned (--pin)",
        "2 workers, not 1",
        "2 rounds, not 3",
        "product, stock at 5 VUs, not 50",
        "seed-pagination with 0 ms think time and pages 1..10, not 50 ms and 1..10",
    ]


def test_render_prints_the_targets_and_their_caveats():
    found = targets(measure(all_targets()))
    text = render([], [], found, ["not pinned (--pin)"], ["what ran where"])
    lines = text.splitlines()
    assert lines[0] == "what ran where"
    assert lines[lines.index(f"{benchkit.TARGETS_TITLE}:") + 1].split() == benchkit.TARGET_HEAD
    assert "  product req/s / raw" in text and text.count("PASS") == 6
    assert lines[-1] == "  not the targets' conditions (not pinned (--pin)): indicative only"
    assert benchkit.TARGETS_TITLE not in render([], [])  # nothing to tell, no section


def test_text_table_shows_medians_and_each_rounds_ratio():
    runs = interleaved("product", ("raw", [1000.0, 4000.0, 2000.0]), ("product", [900, 3000, 1000]))
    rows, notes = report(measure(runs))
    lines = render(rows, notes, targets(measure(runs))).splitlines()

    def cells(start):  # columns are two spaces apart at least; a ratio cell has single spaces
        return re.split(r"\s{2,}", next(x for x in lines if x.startswith(start)).strip())

    assert cells("product ")[:6] == [
        "product",
        "50",
        "3s",
        "3",
        "1000.0",
        "0.75x (0.90, 0.75, 0.50)",
    ]
    assert cells("raw ")[:6] == ["raw", "50", "3s", "3", "2000.0", "ref"]
    assert cells("  product req/s") == [
        "product req/s / raw",
        "0.75x (0.90, 0.75, 0.50)",
        ">= 0.90x",
        "FAIL",
    ]


def test_markdown_has_the_header_table_targets_and_images():
    meta = {"command": "scripts/bench --pin compare", "date": "2026-11-25 20:00 UTC"}
    meta |= {"pinned": "1", "workers": "1", "server_cpus": "1", "client_cpus": "0"}
    meta |= {"settings": {"FAST_LANE": "0"}, "machine": {"cpu": "Some CPU", "cores": "2"}}
    runs = interleaved("product", ("raw", [1000.0, 1000.0]), ("product", [500.0, 600.0]))
    rows, notes = report(measure(runs))
    found = targets(measure(all_targets()))
    text = benchkit.markdown(rows, notes, found, [], meta, {"req/s": "docs/bench/reqs.png"})
    lines = text.splitlines()
    assert lines[0] == (
        "`scripts/bench --pin compare` on 2026-11-25 20:00 UTC: pinned: gunicorn with 1 worker "
        "on CPU 1, k6 and pgbench on CPU 0; settings: FAST_LANE=0"
    )
    assert lines[2].startswith("Machine: Some CPU, 2 cores")
    assert "| product | 50 | 3s | 2 | 550.0 | 0.55x (0.50, 0.60) | 1.23 | 1.50 |" in text
    assert "- 2 rounds: each compared script ran 2 times" in text
    assert "| stock req/s / raw | 0.899x | >= 0.90x | FAIL |" in text
    assert lines[-1] == "![req/s](docs/bench/reqs.png)"


def test_describe_says_what_ran_where():
    base = {"command": "scripts/bench compare", "date": "D", "workers": "2", "k6": "1.1.0"}
    assert benchkit.describe(base)[0] == (
        "scripts/bench compare on D: not pinned: gunicorn with 2 workers, k6 on the same cores; "
        "settings: defaults"
    )
    labelled = {**base, "label": "B", "products": "1000"}
    assert benchkit.describe(labelled)[0].endswith("settings: defaults; 1000 products; label: B")
    assert benchkit.describe(base)[1].endswith("; k6 1.1.0")
    assert benchkit.describe({}) == []


def test_charts_are_pngs_of_what_was_measured(tmp_path):
    runs = [("raw", at(1000.0)), ("product", at(500.0)), ("pgbench", at(800.0, p50_ms=None))]
    written = benchkit.write_charts(runs, "title", tmp_path)
    assert written == [tmp_path / "reqs.png", tmp_path / "latency.png"]
    for path in written:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    from PIL import Image  # matplotlib's own dependency

    with Image.open(tmp_path / "latency.png") as latency, Image.open(tmp_path / "reqs.png") as reqs:
        assert latency.size[0] > 400 and reqs.size[1] > 150


def test_a_chart_with_nothing_to_show_is_not_drawn(tmp_path):
    no_latency = at(800.0, p50_ms=None, p95_ms=None, p99_ms=None)
    assert benchkit.write_charts([("pgbench", no_latency)], "t", tmp_path) == [
        tmp_path / "reqs.png"
    ]
    assert benchkit.write_charts([("k6 died", {"rps": 0})], "t", tmp_path / "none") == []


def write_run(bench_dir, name, s):
    (bench_dir / f"{name}.json").write_text(json.dumps({"faststock": s}))


def test_save_copies_the_results_and_rewrites_the_readme_block(tmp_path):
    bench_dir, dest = tmp_path / "bench", tmp_path / "docs" / "bench"
    bench_dir.mkdir()
    write_run(bench_dir, "raw.product.1", at(1000.0))
    write_run(bench_dir, "product.1", at(450.0))
    write_run(bench_dir, "raw.product.2", at(800.0))
    write_run(bench_dir, "product.2", at(400.0))
    (bench_dir / "meta.json").write_text(json.dumps({"command": "scripts/bench --pin product"}))
    readme = tmp_path / "README.md"
    readme.write_text("# x\n\nbefore\n<!-- bench:latest -->\nold\n<!-- /bench:latest -->\nafter\n")

    items = ["raw.product.1:0", "product.1:0", "raw.product.2:0", "product.2:0"]
    runs = [benchkit.load_run(bench_dir, item) for item in items]
    assert [r.key for r in runs[:2]] == [("raw", "product", 1), ("product", "product", 1)]
    text = benchkit.write_results(bench_dir, runs, (dest, readme))

    assert re.search(r"product req/s / raw +0\.47x \(0\.45, 0\.50\) ", text), text
    for name in ("results.md", "reqs.png", "latency.png"):
        assert (dest / name).read_bytes() == (bench_dir / name).read_bytes()
    assert "![req/s per scenario](reqs.png)" in (dest / "results.md").read_text()
    new = readme.read_text()
    assert new.startswith("# x\n\nbefore\n<!-- bench:latest -->\n`scripts/bench --pin product`")
    assert new.endswith(
        "![p50, p95 and p99 per scenario](docs/bench/latency.png)\n<!-- /bench:latest -->\nafter\n"
    )
    assert "old" not in new and "| product | 50 | 3s | 2 | 425.0 | 0.47x (0.45, 0.50) |" in new


def test_save_leaves_a_readme_without_the_block_alone_and_drops_stale_charts(tmp_path, capsys):
    bench_dir, dest = tmp_path / "bench", tmp_path / "dest"
    bench_dir.mkdir()
    dest.mkdir()
    (dest / "latency.png").write_bytes(b"an older run's")
    write_run(bench_dir, "pgbench", at(800.0, p50_ms=None, p95_ms=None, p99_ms=None))
    readme = tmp_path / "README.md"
    readme.write_text("no block here\n")

    benchkit.write_results(bench_dir, [benchkit.load_run(bench_dir, "pgbench:0")], (dest, readme))

    assert readme.read_text() == "no block here\n"
    assert "no <!-- bench:latest --> ... <!-- /bench:latest --> block" in capsys.readouterr().err
    assert (dest / "reqs.png").exists() and not (dest / "latency.png").exists()


# ---- A/B: the app and a variant of it in the same rounds ----


def test_plan_ab_runs_the_variant_next_to_the_app_first_and_second_by_turns():
    steps = benchkit.plan(["product", "deltas", "pgbench", "spike"], 3, with_raw=True, ab=True)
    assert [(s.kind, s.name) for s in steps[:2]] == [
        ("warmup", "product"),
        ("warmup", "product+ab"),  # each gunicorn fills its own near caches
    ]
    assert ids(steps) == [
        "raw.product.1",
        "product.1",
        "product+ab.product.1",
        "raw.product.2",
        "product+ab.product.2",
        "product.2",
        "raw.product.3",
        "product.3",
        "product+ab.product.3",
        "raw.deltas.1",
        "deltas.1",
        "deltas+ab.deltas.1",
        "pgbench.deltas.1",
        "raw.deltas.2",
        "deltas+ab.deltas.2",
        "deltas.2",
        "pgbench.deltas.2",
        "raw.deltas.3",
        "deltas.3",
        "deltas+ab.deltas.3",
        "pgbench.deltas.3",
        "spike",  # resilience scripts stop the Redis both share: the app's alone
    ]
    variant = next(s for s in steps if s.id == "product+ab.product.2")
    assert variant == Step("run", "product+ab.product.2", "product+ab", "product", 2, "product")
    warmups = [(s.name, s.script) for s in steps if s.kind == "warmup"]
    assert warmups == [
        ("product", "product"),
        ("product+ab", "product"),
        ("deltas", "deltas"),
        ("deltas+ab", "deltas"),
        ("spike", "spike"),
    ]


def test_plan_ab_needs_no_raw_reference():
    steps = benchkit.plan(["stock"], 2, with_raw=False, warmup=False, ab=True)
    assert ids(steps) == ["stock.1", "stock+ab.stock.1", "stock+ab.stock.2", "stock.2"]


def test_plan_command_takes_ab(capsys):
    assert benchkit.main(["plan", "--ab", "2", "1", "0", "stock"]) == 0
    assert capsys.readouterr().out.splitlines() == [
        "raw raw.stock.1 raw stock 1 product",
        "run stock.1 stock stock 1 stock",
        "run stock+ab.stock.1 stock+ab stock 1 stock",
        "raw raw.stock.2 raw stock 2 product",
        "run stock+ab.stock.2 stock+ab stock 2 stock",
        "run stock.2 stock stock 2 stock",
    ]


def ab_rounds(group, raw, app, variant, cpu=None):
    """The runs of `group`'s rounds against the raw reference, the app and the variant (req/s of
    each, a round apiece), in the plan's order (the variant first in even rounds); `cpu`, the
    server's CPU ms per request in each round's (app, variant) runs (300 requests each), counted
    from a server that had used 7 s before."""
    runs = []
    cpu = cpu or [(None, None)] * len(raw)
    for r, (x, a, v, ms) in enumerate(zip(raw, app, variant, cpu, strict=True), 1):
        pair = [(group, a, ms[0]), (group + "+ab", v, ms[1])]
        for name, rps, used in [("raw", x, None), *(pair if r % 2 else pair[::-1])]:
            spent = {} if used is None else {"cpu_before": 7.0, "cpu_after": 7.0 + used * 0.3}
            runs.append(Run(name, "0", at(rps), group=group, round=r, **spent))
    return runs


def test_ab_cost_is_the_variants_req_s_over_the_apps_minus_one_round_by_round():
    """Each round's cost takes the variant's run of that round, never a median: the machine
    drifts (1000, 2000, 1500 req/s) and the pairs follow it."""
    runs = ab_rounds("product", [2000, 4000, 3000], [1000, 2000, 1500], [1050, 2060, 1500])
    measured = measure(runs, "METRICS=0")
    assert measured["product"].costs == pytest.approx((0.05, 0.03, 0.0))
    assert measured["product+ab"].costs == ()
    assert measured["product+ab"].ratios == pytest.approx((0.525, 0.515, 0.5))
    rows, notes = report(measured)
    by_label = rows_by_label(rows)
    assert list(by_label) == ["raw", "product", "product [METRICS=0]"]
    assert by_label["product"]["x raw"] == "0.50x (0.50, 0.50, 0.50)"
    assert by_label["product [METRICS=0]"]["x raw"] == "0.52x (0.53, 0.52, 0.50)"
    assert by_label["product [METRICS=0]"]["req/s"] == "1500.0"
    assert notes[1].startswith("A/B: each script also ran against a second gunicorn of the app")
    assert "(rows [METRICS=0])" in notes[1]
    assert notes[2:] == ["product against product [METRICS=0]: costs 3.0% (5.0, 3.0, 0.0) in req/s"]


def test_ab_costs_over_several_scripts_and_a_round_without_its_pair():
    runs = [
        *ab_rounds("product", [2000, 2000], [1000, 1000], [1020, 1040]),
        *ab_rounds("stock", [2000, 2000], [1000, 1000], [990, 1100]),
    ]
    del runs[2]  # product's variant left nothing in round 1 (k6 died)
    rows, notes = report(measure(runs, "METRICS=0 FAST_LANE=0"))
    assert [row[0] for row in rows] == [
        "raw",
        "product",
        "product [METRICS=0 FAST_LANE=0]",
        "stock",
        "stock [METRICS=0 FAST_LANE=0]",
    ]
    assert notes[-3:] == [
        "product against product [METRICS=0 FAST_LANE=0]: costs 4.0% (-, 4.0) in req/s",
        "stock against stock [METRICS=0 FAST_LANE=0]: costs 4.5% (-1.0, 10.0) in req/s",
        # 4.0, -1.0, 10.0: the median of every round that has both runs
        "A/B over every round of product, stock: costs 4.0% in req/s (medians of 3 rounds' costs)",
    ]


def test_ab_cpu_cost_is_the_apps_cpu_per_request_over_the_variants_minus_one():
    """CPU time per request in each run (the server's CPU seconds over the run / its requests),
    compared round by round: the req/s of the same rounds swing with the machine, this less."""
    runs = ab_rounds(
        "product",
        [2000, 2000, 2000],
        [1000, 500, 1000],  # round 2: the host was busy while the app ran
        [1000, 1000, 1000],
        cpu=[(0.42, 0.40), (0.41, 0.40), (0.40, 0.40)],
    )
    measured = measure(runs, "METRICS=0")
    assert [r.cpu_ms for r in measured["product"].runs] == pytest.approx([0.42, 0.41, 0.40])
    assert measured["product"].cpu_costs == pytest.approx((0.05, 0.025, 0.0))
    assert report(measured)[1][2] == (
        "product against product [METRICS=0]: costs 0.0% (0.0, 100.0, 0.0) in req/s; 2.5% "
        "(5.0, 2.5, 0.0) in CPU per request (0.410 ms, 0.400 ms)"
    )
    stock = ab_rounds("stock", [2000], [1000], [1100], cpu=[(0.5, 0.4)])
    notes = report(measure(runs + stock, "METRICS=0"))[1]
    assert notes[-1] == (
        "A/B over every round of product, stock: costs 5.0% in req/s; 3.8% in CPU per request "
        "(medians of 4 rounds' costs)"  # req/s: 0, 100, 0 and 10; CPU: 5.0, 2.5, 0.0 and 25.0
    )


def test_cpu_per_request_needs_both_snapshots_and_requests():
    run = Run("product", "0", at(1000.0), cpu_before=1.0, cpu_after=1.6)
    assert run.cpu_ms == pytest.approx(2.0)  # 0.6 s over 300 requests
    assert replace(run, cpu_before=None).cpu_ms is None
    assert replace(run, summary=None).cpu_ms is None
    assert replace(run, summary=at(1000.0, requests=0)).cpu_ms is None
    assert measure(ab_rounds("product", [1], [1], [1]))["product"].cpu_costs == ()


def test_cpu_seconds_counts_a_process_and_its_children():
    """A gunicorn master uses little; its workers (children) do the work."""
    import os
    import subprocess
    import sys

    burn = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    before = benchkit.cpu_seconds(os.getpid())
    child = subprocess.Popen([sys.executable, "-c", burn + "input()"], stdin=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while benchkit.cpu_seconds(os.getpid()) - before < 0.3:
            assert time.monotonic() < deadline, "the child's CPU time was never counted"
            time.sleep(0.05)
    finally:
        child.communicate(b"\n", timeout=30)
    assert benchkit.cpu_seconds(child.pid) == 0  # gone: nothing of it left to count


def test_without_a_variant_there_is_no_ab_note():
    runs = interleaved("product", ("raw", [1000.0, 1000.0]), ("product", [500.0, 600.0]))
    assert not any(note.startswith("A/B") for note in report(measure(runs))[1])
    assert measure(runs)["product"].costs == ()


def test_the_variants_row_reads_no_cache_counters_it_has_not_got():
    """With METRICS=0 scripts/bench takes no snapshot: the row says "-", not 0% hits."""
    runs = [
        Run("product", "0", at(1000.0), before={}, after={"HIT": 9.0}, group="product", round=1),
        Run("product+ab", "0", at(1000.0), group="product", round=1),
    ]
    rows = rows_by_label(report(measure(runs, "METRICS=0"))[0])
    assert rows["product"]["cache hit %"] == "100.0"
    assert rows["product [METRICS=0]"]["cache hit %"] == "-"


def test_percent_spread():
    assert benchkit.percent_spread([0.021]) == "2.1%"
    assert benchkit.percent_spread([0.015, 0.021, 0.03]) == "2.1% (1.5, 2.1, 3.0)"
    assert benchkit.percent_spread([None, -0.02]) == "-2.0% (-, -2.0)"
    assert benchkit.percent_spread([None]) == "-"
    assert benchkit.cost(1000.0, 1050.0) == pytest.approx(0.05)
    assert benchkit.cost(None, 1050.0) is None and benchkit.cost(0.0, 1.0) is None


def test_the_failed_requests_target_names_the_variant_by_its_label():
    runs = ab_rounds("product", [2000], [1000], [1000])
    runs = edited(runs, "product+ab", failed_rate=0.01)
    last = targets(measure(runs, "METRICS=0"))[-1]
    assert (last.measured, last.ok) == ("product [METRICS=0] 1.00%", False)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("METRIC=0", "BENCH_AB: METRIC is not a setting of the app (README: Settings;"),
        ("METRICS", "BENCH_AB: 'METRICS' is not NAME=VALUE"),
        ("METRICS=", "BENCH_AB: 'METRICS=' is not NAME=VALUE"),
        ("PORT=9000", "BENCH_AB: PORT is the bench's own"),
        ("REDIS_URL=redis://elsewhere:6379/0", "BENCH_AB: REDIS_URL is the bench's own"),
        ("METRICS=0 METRICS=1", "BENCH_AB: METRICS is given twice"),
        ("   ", "BENCH_AB has no setting"),
        ("METRICS=maybe", "faststock: configuration error: BENCH_AB: METRICS must be 1 or 0"),
        ("DB_POOL_SIZE=0", "configuration error: BENCH_AB: DB_POOL_SIZE must be between 1 and"),
    ],
)
def test_ab_settings_refuses_what_would_not_make_a_variant(text, message):
    with pytest.raises(benchkit.BenchError) as error:
        benchkit.ab_settings(text, {})
    assert message in str(error.value)
    assert "\n" not in str(error.value)


def test_ab_settings_are_checked_on_top_of_the_apps(monkeypatch, capsys):
    assert benchkit.ab_settings(" METRICS=0  FAST_LANE=off ", {}) == {
        "METRICS": "0",
        "FAST_LANE": "off",
    }
    # The variant's value wins over the app's; the app's others stay, and are checked with it.
    assert benchkit.ab_settings("METRICS=0", {"METRICS": "1", "LOG_LEVEL": "info"}) == {
        "METRICS": "0"
    }
    with pytest.raises(benchkit.BenchError, match="LOG_LEVEL"):
        benchkit.ab_settings("METRICS=0", {"LOG_LEVEL": "chatty"})
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    assert benchkit.main(["ab-settings", "METRICS=0 ACCESS_LOG=1"]) == 0
    assert capsys.readouterr().out == "METRICS=0\nACCESS_LOG=1\n"
    assert benchkit.main(["ab-settings", "METRIC=0"]) == 1
    assert "METRIC is not a setting" in capsys.readouterr().err


def test_describe_and_the_report_name_the_variant(tmp_path):
    meta = {"command": 'BENCH_AB="METRICS=0" scripts/bench --pin product', "date": "D"}
    meta |= {"pinned": "1", "workers": "1", "ab": "METRICS=0", "settings": {"FAST_LANE": "1"}}
    assert benchkit.describe(meta)[0].endswith("settings: FAST_LANE=1; A/B variant: METRICS=0")
    assert "A/B against METRICS=0" in benchkit.chart_title(meta)
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    items = []
    cpu = [(0.44, 0.40), (0.41, 0.41)]
    for run in ab_rounds("product", [2000, 2000], [1000, 1000], [1030, 1010], cpu):
        stem = benchkit.run_id(run.name, run.group, run.round)
        write_run(tmp_path, stem, run.summary)
        if run.name != "raw":
            (tmp_path / f"{stem}.before.cpu").write_text(json.dumps(run.cpu_before))
            (tmp_path / f"{stem}.after.cpu").write_text(json.dumps(run.cpu_after))
        items.append(f"{stem}:0")
    runs = [benchkit.load_run(tmp_path, item) for item in items]
    assert runs[2].key == ("product+ab", "product", 1)
    assert runs[2].cpu_ms == pytest.approx(0.40) and runs[0].cpu_ms is None
    text = benchkit.write_results(tmp_path, runs, None)
    note = (
        "product against product [METRICS=0]: costs 2.0% (3.0, 1.0) in req/s; 5.0% (10.0, 0.0) "
        "in CPU per request (0.425 ms, 0.405 ms)"
    )
    assert note in text
    assert re.search(
        r"^product \[METRICS=0\] +50 +3s +2 +1020\.0 +0\.51x \(0\.52, 0\.51\)", text, re.M
    )
    markdown = (tmp_path / "results.md").read_text()
    assert "| product [METRICS=0] | 50 | 3s | 2 | 1020.0 | 0.51x (0.52, 0.51) |" in markdown
    assert f"- {note}" in markdown
    assert (tmp_path / "reqs.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ---- pgbench and the run's description ----


def test_pgbench_sql_turns_placeholders_into_variables():
    product_id, delta = benchkit.PGBENCH_PARAMS
    named = "UPDATE t SET s = s + %(d)s WHERE id = %(i)s AND note LIKE 'a%%'"
    assert benchkit.pgbench_sql(named, {"i": product_id, "d": delta}) == (
        "UPDATE t SET s = s + :delta WHERE id = :id AND note LIKE 'a%'"
    )
    positional = "SELECT %s, %s, %s"
    assert benchkit.pgbench_sql(positional, (delta, product_id, delta)) == (
        "SELECT :delta, :id, :delta"
    )
    with pytest.raises(benchkit.BenchError, match="no variable"):
        benchkit.pgbench_sql("SELECT %s", (5,))


def test_pgbench_script_runs_the_services_own_delta_statement():
    script = benchkit.pgbench_script(200)
    draws, sql = script.split("\n", 2)[:2], script.split("\n", 2)[2]
    assert draws == ["\\set id random(1, 200)", "\\set delta random(0, 1) * 2 - 1"]
    assert "UPDATE products" in sql and ":id" in sql and ":delta" in sql
    assert "%(" not in sql and "%s" not in sql
    assert sql.endswith(";\n") and sql.count(";") == 1


PGBENCH_OUTPUT = """pgbench (15.18 (Debian 15.18-0+deb12u1))
transaction type: /tmp/bench/pgbench.sql
scaling factor: 1
query mode: simple
number of clients: 50
number of threads: 1
maximum number of tries: 1
duration: 30 s
number of transactions actually processed: 382914
number of failed transactions: 6 (0.002%)
latency average = 3.917 ms
initial connection time = 41.234 ms
tps = 12764.123456 (without initial connection time)
"""


def test_pgbench_summary_reads_its_closing_report():
    s = benchkit.pgbench_summary(PGBENCH_OUTPUT)
    assert s["script"] == "pgbench" and (s["vus"], s["duration"]) == (50, "30s")
    assert (s["requests"], s["rps"], s["avg_ms"]) == (382914, 12764.123456, 3.917)
    assert s["failed_rate"] == pytest.approx(6 / 382920)
    assert s["p50_ms"] is None and s["p99_ms"] is None  # pgbench prints no percentiles
    assert benchkit.pgbench_summary("pgbench: error: connection refused\n") is None


def test_pgbench_summary_command_writes_a_k6_shaped_file(tmp_path):
    (tmp_path / "pgbench.log").write_text(PGBENCH_OUTPUT)
    args = [str(tmp_path / "pgbench.log"), str(tmp_path / "pgbench.json")]
    assert benchkit.main(["pgbench-summary", *args]) == 0
    run = benchkit.load_run(tmp_path, "pgbench:0")
    assert run.summary["rps"] == 12764.123456


@pytest.mark.parametrize(
    ("text", "version"),
    [
        ("Redis server v=7.0.15 sha=00000000:0 malloc=jemalloc-5.3.0", "7.0.15"),
        ("k6 v1.1.0 (go1.24.4, linux/amd64)", "1.1.0"),
        ("15.18 (Debian 15.18-0+deb12u1)", "15.18"),
        ("unknown", "unknown"),
    ],
)
def test_version_of(text, version):
    assert benchkit.version_of(text) == version


def test_labelled_settings_are_those_set_that_decide_something():
    environ = {"FAST_LANE": "0", "METRICS": " 0 ", "DB_POOL_SIZE": "5", "CACHE_TTL_SECONDS": ""}
    environ |= {"DATABASE_URL": "postgresql://x", "PORT": "8123", "LOG_LEVEL": "WARNING"}
    assert benchkit.labelled_settings(environ) == {
        "DB_POOL_SIZE": "5",
        "FAST_LANE": "0",
        "METRICS": "0",
    }


def test_meta_records_the_run_the_settings_and_the_machine(tmp_path, monkeypatch):
    monkeypatch.setenv("WEB_CONCURRENCY", "1")
    monkeypatch.setenv("FAST_LANE", "0")
    monkeypatch.setenv("DATABASE_URL", "postgresql://nobody@127.0.0.1:1/none")  # refused at once
    monkeypatch.setenv("REDIS_URL", "redis://127.0.0.1:1/0")
    pairs = ["command=scripts/bench --pin", "pinned=1", "k6=k6 v1.1.0 (go1.24.4)"]
    assert benchkit.main(["meta", str(tmp_path / "meta.json"), *pairs]) == 0
    meta = json.loads((tmp_path / "meta.json").read_text())
    assert (meta["command"], meta["pinned"], meta["k6"]) == ("scripts/bench --pin", "1", "1.1.0")
    assert meta["workers"] == "1" and meta["settings"] == {"WEB_CONCURRENCY": "1", "FAST_LANE": "0"}
    assert "postgres" not in meta and "redis" not in meta  # nobody answered: no guess
    assert int(meta["machine"]["cores"]) >= 1 and meta["gunicorn"]
