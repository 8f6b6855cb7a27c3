"""The Python half of scripts/bench: the plan of its runs, probes of the server under test, and the
results report.

It lives in a module rather than in the shell script so that ruff checks it and the tests import
it. The order of the runs (`plan`: rounds of a raw reference run and the script it paces, one
after the other) and the report are pure functions: the report of data already loaded from
BENCH_DIR (a `Run` per k6 or pgbench run, gathered into a `Series` per script), so the table, its
medians and per-round ratios, the targets and the charts are tested on small hand-made k6
summaries, without a server or k6. scripts/bench runs it from the project root as
`python -m benchkit COMMAND ARG ...`:

    check-config                    the app's settings, refused in one line before anything starts
    wait BASE_URL SECONDS PID       /healthz, then /readyz, answer 200 while gunicorn PID lives
    cache BASE_URL FILE             the read endpoints' cache outcome counters, from /metrics
    cpu PID FILE                    the CPU seconds gunicorn PID and its workers have used
    healthy BASE_URL PRODUCTS FILE  /healthz and one product read each answer 200 within 2 s
    cache-back BASE_URL SECONDS     20 reads in a row answer without X-Cache: BYPASS
    plan [--ab] ROUNDS RAW WARMUP NAME ...
                                    the runs in order, one a line: KIND ID NAME GROUP ROUND SCRIPT
                                    (KIND warmup, raw or run; RAW and WARMUP 0 or 1; --ab adds the
                                    A/B variant's runs, named NAME+ab)
    ab-settings TEXT                BENCH_AB's NAME=VALUE words, checked, one a line
    metrics BASE_URL                1 if the app's settings serve /metrics, else 0; exits 1 if
                                    the server at BASE_URL says otherwise (404 or 200)
    pgbench-script FILE PRODUCTS    pgbench's script: the service's own delta UPDATE (add_stock)
    pgbench-summary LOG FILE        pgbench's output as a summary in k6/lib.js's shape
    meta FILE KEY=VALUE ...         what the run was (mode, settings) and the machine it ran on
    table DIR [--save DEST README] ID:RC ...
                                    one row per script (and scenario, endpoint, phase), medians of
                                    its rounds, notes and targets on stdout; results.md, reqs.png
                                    and latency.png in DIR (and, with --save, copied to DEST and
                                    shown in README)
"""

from __future__ import annotations

import json
import os
import platform
import random
import re
import shutil
import statistics
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Mapping, Sequence
from contextlib import closing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NamedTuple

# A k6 summary as k6/lib.js writes it under "faststock", or one of its per-scenario parts.
Summary = Mapping[str, Any]
Row = list[str]

HEAD = ["script", "VUs", "duration", "runs", "req/s", "x raw", "avg ms", "p50 ms", "p90 ms"]
HEAD += ["p95 ms", "p99 ms", "failed %", "cache hit %", "result"]
# k6's exit statuses that have a name: 99 is a failed threshold, 124 is timeout(1) killing it.
RESULTS = {"0": "ok", "99": "THRESHOLDS", "124": "TIMEOUT"}
CACHE_COUNTER = "faststock_cache_requests_total{"
HEALTHY_WITHIN_MS = 2000
CACHE_BACK_STREAK = 20  # every worker's breaker closed, not just the one a read happened to reach

# The raw reference run (scripts/rawref.py under the same gunicorn settings and pinning) that each
# throughput script is compared with, and the k6 script that run sends (with RAW=1): the same load
# shape (VUs, think time, requests), so that a ratio measures the app and nothing else. Scripts
# absent here (spike, redis-outage, redis-down) measure resilience, not throughput: no ratio, and
# they run once. pgbench is no HTTP load: it has no reference of its own, but runs in rounds too,
# inside the deltas' rounds when both run (their composed limit needs raw and pgbench of a round).
RAW = "raw"
RAW_SCRIPT = {
    RAW: "product",
    "raw-seed-stock": "seed-stock",
    "raw-seed-pagination": "seed-pagination",
}
RAW_OF = dict.fromkeys(["product", "stock", "products", "mixed", "update-stock", "deltas"], RAW)
RAW_OF |= {"seed-stock": "raw-seed-stock", "seed-pagination": "raw-seed-pagination"}
PGBENCH = "pgbench"
ROUNDED = {*RAW_OF, PGBENCH}

# The A/B variant (BENCH_AB): a second gunicorn of the app with a few settings changed, run in the
# same rounds as the app, right after it or right before it, alternately. Its runs are named after
# the script with this suffix (product+ab; files product+ab.product.2.json), its rows after the
# script and its settings ("product [METRICS=0]"). Only the scripts with a raw reference have one:
# pgbench does not touch the app, and the resilience scripts stop the Redis both share.
AB = "+ab"
# Settings a variant may not change: it shares the bench's servers and has an address of its own.
AB_FIXED = ("DATABASE_URL", "DATABASE_REPLICA_URLS", "REDIS_URL", "REDIS_SENTINELS")
AB_FIXED += ("REDIS_SENTINEL_MASTER", "HOST", "PORT")

# Issue 9's targets, met in one `scripts/bench --pin compare` run: one worker, 50 VUs without think
# time for the reads and the deltas (pgbench at as many clients), the seed's pagination scenario as
# its README gives it.
READ_TARGETS = {"product": 0.90, "stock": 0.90, "products": 0.80}
SEED_PAGINATION_TARGET = 0.95  # of the raw reference's req/s in the same scenario...
SEED_P95_FACTOR, SEED_P95_SLACK_MS = 2.0, 2.0  # ...with p95 at most 2x the reference's + 2 ms
DELTAS_TARGET = 0.5  # of the composed limit 1 / (1/raw + 1/pgbench)
TARGET_VUS = {"product": 50, "stock": 50, "products": 50, "deltas": 50, "pgbench": 50}
TARGET_VUS |= {"seed-pagination": 200}
TARGET_ROUNDS = 3  # scripts/bench's default BENCH_ROUNDS: a median of fewer says less
SEED_THINK_MS, SEED_PAGES = 50, 10

# The psycopg2 placeholders of a statement: %(name)s, %s, and %% (a literal %).
PLACEHOLDER = re.compile(r"%\((\w+)\)s|%s|%%")
# Values no real id or delta takes, passed to queries.add_stock to tell its parameters apart.
PGBENCH_PARAMS = {7_000_000_001: ":id", -7_000_000_002: ":delta"}

# The block of README.md that `table --save` rewrites with the latest results.
README_START, README_END = "<!-- bench:latest -->", "<!-- /bench:latest -->"
CHARTS = ("reqs.png", "latency.png")


class Step(NamedTuple):
    """One step of scripts/bench's plan: a warm-up of GROUP's script, or a measured run (KIND raw:
    of the raw reference, with k6 script SCRIPT) that leaves BENCH_DIR/ID.json."""

    kind: str  # "warmup", "raw" or "run"
    id: str  # "-" for a warm-up
    name: str
    group: str  # the script whose rounds the run belongs to (its own name, for most)
    round: int  # 1..ROUNDS; 0 for a script that runs once (and for a warm-up)
    script: str  # the k6 script it sends ("-" for pgbench)

    def line(self) -> str:
        return " ".join([self.kind, self.id, self.name, self.group, str(self.round), self.script])


def run_id(name: str, group: str, round_: int) -> str:
    """The stem of a run's files in BENCH_DIR: NAME for a script run once, NAME.ROUND in rounds of
    its own, NAME.GROUP.ROUND in another's (raw.product.2: the raw run of product's round 2)."""
    if round_ == 0:
        return name
    return f"{name}.{round_}" if name == group else f"{name}.{group}.{round_}"


def parse_id(run: str) -> tuple[str, str, int]:
    """(NAME, GROUP, ROUND) of a run_id: script names have no dots."""
    parts = run.split(".")
    if len(parts) == 1:
        return run, run, 0
    if len(parts) == 2:
        return parts[0], parts[0], int(parts[1])
    return parts[0], parts[1], int(parts[2])


def base_name(name: str) -> str:
    """The script an A/B variant's run sends ("product" for "product+ab"); other names unchanged."""
    return name.removesuffix(AB)


def is_variant(name: str) -> bool:
    return name.endswith(AB)


def plan(
    names: Sequence[str], rounds: int, with_raw: bool, warmup: bool = True, ab: bool = False
) -> list[Step]:
    """The runs of one invocation, in order. A throughput script runs `rounds` times, each right
    after a run of its raw reference (raw, product, raw, product, ...): on a shared machine the
    reference's own throughput drifts by tens of per cent within a minute, so each round's ratio
    takes the reference measured next to it, and the report takes the median of the rounds'.
    Deltas and pgbench share their rounds (raw, deltas, pgbench, ...) for the composed limit.
    A warm-up of the script comes before its first round (none for pgbench: it has no cache to
    fill), so that the first round's raw run stays next to the first measured one. Resilience
    scripts run once. A name given twice runs once.

    With `ab`, each script with a raw reference also runs against the A/B variant (NAME+ab) in
    the same rounds: after the app in odd rounds, before it in even ones (raw, product,
    product+ab, raw, product+ab, product, ...), so that neither always runs first, after the
    reference, with whatever that leaves behind (a warmer CPU cache, a busier host). Each
    gunicorn has near caches of its own to fill: the variant gets its own warm-up, after the
    app's."""
    wanted = list(dict.fromkeys(names))
    steps: list[Step] = []
    for group in wanted:
        if group == PGBENCH and "deltas" in wanted:
            continue  # in the deltas' rounds
        pair = [group, group + AB] if ab and group in RAW_OF else [group]
        if warmup and group != PGBENCH:
            steps += [Step("warmup", "-", name, group, 0, group) for name in pair]
        if group not in ROUNDED:
            steps.append(Step("run", group, group, group, 0, group))
            continue
        extra = [PGBENCH] if group == "deltas" and PGBENCH in wanted else []
        reference = [RAW_OF[group]] if with_raw and group in RAW_OF else []
        for r in range(1, rounds + 1):
            members = (pair if r % 2 else pair[::-1]) + extra
            for name in reference + members:
                kind, script = ("raw", RAW_SCRIPT[name]) if name in RAW_SCRIPT else ("run", name)
                script = "-" if name == PGBENCH else base_name(script)
                steps.append(Step(kind, run_id(name, group, r), name, group, r, script))
    return steps


class BenchError(Exception):
    """A probe gave up; the message is the one line scripts/bench shows."""


def log(message: str) -> None:
    print(f"[faststock] {message}", file=sys.stderr)


def get(url: str, timeout: float = 5.0) -> tuple[int, str]:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return response.status, response.read().decode()


def check_config() -> None:
    """Exit with the app's one-line message if it would refuse a setting.

    Checked before scripts/bench starts PostgreSQL, Redis or gunicorn, so that a typo costs one
    line instead of a failure in `flask init-db` after servers have started.
    """
    # Imported here: it loads Flask, which the probes (run several times a script) do not need.
    from faststock.config import from_env_or_exit

    from_env_or_exit()


def ab_settings(text: str, environ: Mapping[str, str]) -> dict[str, str]:
    """BENCH_AB's settings (NAME=VALUE words, "METRICS=0 FAST_LANE=0"), checked as the variant's
    gunicorn would read them on top of `environ`, so that a typo stops scripts/bench before
    anything starts rather than making a variant identical to the app (METRIC=0 would)."""
    from faststock.config import Config, ConfigError

    settings: dict[str, str] = {}
    names = Config().env_names
    for word in text.split():
        name, sep, value = word.partition("=")
        if not sep or not value:
            raise BenchError(f'BENCH_AB: {word!r} is not NAME=VALUE (e.g. BENCH_AB="METRICS=0")')
        if name not in names:
            raise BenchError(
                f"BENCH_AB: {name} is not a setting of the app (README: Settings; "
                "faststock/config.py)"
            )
        if name in AB_FIXED:
            raise BenchError(f"BENCH_AB: {name} is the bench's own: the variant keeps it")
        if name in settings:
            raise BenchError(f"BENCH_AB: {name} is given twice")
        settings[name] = value
    if not settings:
        raise BenchError('BENCH_AB has no setting (e.g. BENCH_AB="METRICS=0")')
    try:
        Config.from_env({**environ, **settings})
    except ConfigError as exc:
        raise BenchError(f"faststock: configuration error: BENCH_AB: {exc}") from None
    return settings


def ab_label(settings: str) -> str:
    """How the report names the variant: its settings as BENCH_AB gave them, or "B"."""
    return " ".join(settings.split()) or "B"


def metrics_served(base: str) -> bool:
    """Whether the app's settings (this process's environment) serve /metrics, checked against
    the server at `base`: the report must not read counters a METRICS=0 server has not got, and
    an A/B variant that did not get its settings would compare the app with itself."""
    from faststock.config import Config

    served = Config.from_env().metrics
    try:
        status = get(base + "/metrics")[0]
    except urllib.error.HTTPError as exc:
        status = exc.code
    except OSError as exc:
        raise BenchError(f"{base}/metrics: {exc}") from None
    if status != (200 if served else 404):
        setting = "on" if served else "off"
        raise BenchError(f"{base}/metrics answered {status} with metrics {setting} (METRICS)")
    return served


def process_state(pid: int) -> str:
    """The state letter of PID ("Z" once it is gone): a zombie gunicorn never answers."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "Z"
    return stat.rsplit(")", 1)[1].split()[0]  # the name before ")" may hold spaces


def wait_ready(base: str, limit: float, pid: int) -> None:
    """Return once /healthz and then /readyz answer 200; k6 must not measure a server warming up."""
    deadline = time.monotonic() + limit
    for path in ("/healthz", "/readyz"):
        while True:
            try:
                if get(base + path, 1.0)[0] == 200:
                    break
            except OSError:
                pass
            if process_state(pid) == "Z":
                raise BenchError("gunicorn exited")
            if time.monotonic() > deadline:
                raise BenchError(f"{path} did not answer 200 within {limit:.0f}s")
            time.sleep(0.1)


def cache_counts(metrics: str) -> dict[str, float]:
    """Cache outcomes (HIT, MISS, BYPASS, ...) summed over every route and worker in /metrics."""
    counts: dict[str, float] = {}
    for line in metrics.splitlines():
        if line.startswith(CACHE_COUNTER):
            labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}", 1)[0]))
            key = labels.get("result", "?")
            counts[key] = counts.get(key, 0.0) + float(line.rsplit(None, 1)[1])
    return counts


def save_cache_counts(base: str, path: Path) -> None:
    """Record the counters; a run's hit rate is the difference of two such snapshots."""
    try:
        text = get(base + "/metrics")[1]
    except OSError as exc:
        log(f"could not read /metrics: {exc}")
        text = ""
    path.write_text(json.dumps(cache_counts(text)))


def cpu_seconds(pid: int) -> float:
    """User and system CPU time that process `pid` and its children (a gunicorn master and its
    workers) have used so far. A run's share of it, per request, is what a request costs the
    server whatever else the shared machine does: req/s also moves with whoever else has the
    CPU, this much less."""
    tick = os.sysconf("SC_CLK_TCK")

    def fields(stat_path: Path) -> list[str] | None:
        try:
            return stat_path.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            return None  # gone meanwhile, or not a process

    total = 0
    for stat_path in Path("/proc").glob("[0-9]*/stat"):
        f = fields(stat_path)
        # after the name: state, ppid, ..., utime and stime are the 12th and 13th
        if f is not None and (stat_path.parent.name == str(pid) or f[1] == str(pid)):
            total += int(f[11]) + int(f[12])
    return total / tick


def check_health(base: str, products: int, path: Path) -> bool:
    """Whether the service answers promptly right after a spike; the answers are saved to `path`
    for the report's note."""
    answers = []
    for url_path in ("/healthz", f"/api/products/{random.randint(1, products)}"):
        start = time.monotonic()
        status: int | str
        try:
            status = get(base + url_path, 2.0)[0]
        except urllib.error.HTTPError as exc:
            status = exc.code
        except OSError as exc:
            status = type(getattr(exc, "reason", exc)).__name__
        elapsed = 1000 * (time.monotonic() - start)
        ok = status == 200 and elapsed <= HEALTHY_WITHIN_MS
        answers.append({"path": url_path, "status": status, "ms": round(elapsed, 1), "ok": ok})
    healthy = all(a["ok"] for a in answers)
    detail = ", ".join(f"{a['path']} {a['status']} in {a['ms']:.0f} ms" for a in answers)
    path.write_text(json.dumps({"healthy": healthy, "detail": detail, "answers": answers}))
    log(f"healthy after: {'yes' if healthy else 'NO'} ({detail})")
    return healthy


def wait_cache_back(base: str, limit: float) -> None:
    """Return once reads use Redis again, so the next script does not start on a bypassed cache."""
    start, streak = time.monotonic(), 0
    while streak < CACHE_BACK_STREAK:
        if time.monotonic() - start > limit:
            raise BenchError(
                f"reads still answer X-Cache: BYPASS {limit:.0f}s after Redis came back"
            )
        try:
            with urllib.request.urlopen(base + "/api/products/1", timeout=2) as response:
                cached = response.headers.get("X-Cache") in ("HIT", "MISS")
                streak = streak + 1 if cached else 0
        except OSError:
            streak = 0
        time.sleep(0.02)
    log(f"Redis is back and reads use it again ({time.monotonic() - start:.2f} s)")


# ---- pgbench, and what the run was ----


class _Recorder:
    """Stands in for a psycopg2 cursor: keeps the statements a query function sends."""

    def __init__(self) -> None:
        self.statements: list[tuple[str, Any]] = []

    def execute(self, sql: str, params: Any = None) -> None:
        self.statements.append((sql, params))

    def fetchone(self) -> None:
        return None


def pgbench_sql(sql: str, params: Any) -> str:
    """`sql` with each psycopg2 placeholder replaced by the pgbench variable that PGBENCH_PARAMS
    names for the value bound to it (named or positional parameters alike)."""
    positional = iter(params) if isinstance(params, Sequence) else iter(())

    def variable(match: re.Match[str]) -> str:
        if match.group(0) == "%%":
            return "%"
        value = params[match.group(1)] if match.group(1) else next(positional)
        if value not in PGBENCH_PARAMS:
            raise BenchError(f"pgbench: no variable for the parameter {match.group(0)}={value!r}")
        return PGBENCH_PARAMS[value]

    return PLACEHOLDER.sub(variable, sql)


def pgbench_script(products: int) -> str:
    """A pgbench script that runs the very statement a delta runs (queries.add_stock, outbox CTE
    included) on a random product of 1..products with a delta of -1 or +1, as k6/deltas.js draws
    them. The SQL is taken from the function, not copied, so the bound follows the service."""
    from faststock import queries  # loads Flask: only this command needs it

    cursor = _Recorder()
    product_id, delta = PGBENCH_PARAMS
    queries.add_stock(cursor, product_id, delta)
    if len(cursor.statements) != 1:
        raise BenchError(f"pgbench: add_stock sent {len(cursor.statements)} statements, not one")
    sql = pgbench_sql(*cursor.statements[0]).strip().rstrip(";")
    return f"\\set id random(1, {products})\n\\set delta random(0, 1) * 2 - 1\n{sql};\n"


def pgbench_summary(text: str) -> dict[str, Any] | None:
    """pgbench's closing report as a script's figures in k6/lib.js's shape (no percentiles: pgbench
    prints none), or None when it printed no tps (it failed)."""

    def find(pattern: str) -> str | None:
        match = re.search(pattern, text, re.MULTILINE)
        return match.group(1) if match else None

    tps = find(r"^tps = ([\d.]+)")
    if tps is None:
        return None
    done = int(find(r"actually processed: (\d+)") or 0)
    failed = int(find(r"^number of failed transactions: (\d+)") or 0)
    latency = find(r"^latency average = ([\d.]+) ms")
    seconds = find(r"^duration: (\d+) s") or "?"
    return {
        "script": "pgbench",
        "vus": int(find(r"^number of clients: (\d+)") or 0),
        "duration": f"{seconds}s",
        "requests": done,
        "rps": float(tps),
        "avg_ms": None if latency is None else float(latency),
        **dict.fromkeys(["p50_ms", "p90_ms", "p95_ms", "p99_ms"]),
        "failed_rate": failed / (done + failed) if done + failed else None,
    }


def version_of(text: str) -> str:
    """The first version number in a tool's --version line ("Redis server v=7.0.15 sha=..." is
    7.0.15), or the line itself if it has none."""
    match = re.search(r"\d+\.\d+(?:\.\d+)?", text)
    return match.group(0) if match else text.strip()


def machine() -> dict[str, str]:
    """The hardware and system the figures were measured on: absolute figures mean nothing
    without it."""
    cpu, memory = platform.processor() or platform.machine(), "?"
    try:
        models = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        cpu = models[0].strip() if models else cpu
        kib = re.search(r"^MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text(), re.M)
        memory = f"{int(kib.group(1)) / 2**20:.0f} GiB" if kib else memory
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return {"cpu": cpu, "cores": str(os.cpu_count() or "?"), "memory": memory, "os": system}


def labelled_settings(environ: Mapping[str, str]) -> dict[str, str]:
    """The settings of the service that are set for this run (FAST_LANE=0, METRICS=0, a pool
    size...), so that an A/B pair of runs says which is which. Addresses and ports are left out:
    they change every run and decide nothing."""
    from faststock.config import Config

    skip = {"DATABASE_URL", "REDIS_URL", "HOST", "PORT", "LOG_LEVEL"}
    names = [n for n in Config().env_names if n not in skip]
    names += [n for n in ("FAST_LANE", "METRICS", "GUNICORN_CMD_ARGS") if n not in names]
    return {n: environ[n].strip() for n in names if environ.get(n, "").strip()}


def server_versions(environ: Mapping[str, str]) -> dict[str, str]:
    """The versions of the PostgreSQL and Redis at DATABASE_URL and REDIS_URL, as they answer
    (not a local binary's: the servers may be someone else's); a silent one is left out."""
    import psycopg2
    import redis

    versions = {}
    try:
        url = environ["DATABASE_URL"]
        with closing(psycopg2.connect(url, connect_timeout=5)) as conn, conn.cursor() as cur:
            cur.execute("SHOW server_version")
            versions["postgres"] = version_of(cur.fetchone()[0])
    except (KeyError, psycopg2.Error) as exc:
        log(f"PostgreSQL's version unknown: {exc}")
    try:
        client = redis.Redis.from_url(environ["REDIS_URL"], socket_timeout=5)
        versions["redis"] = str(client.info("server")["redis_version"])
        client.close()
    except (KeyError, redis.RedisError) as exc:
        log(f"Redis's version unknown: {exc}")
    return versions


def write_meta(path: Path, pairs: Sequence[str]) -> None:
    """Record what scripts/bench says of the run (KEY=VALUE: command, pinning, k6's version) with
    the app's settings, its worker count, the servers' versions and the machine, for the report's
    header."""
    from importlib.metadata import version

    from faststock.config import Config

    meta: dict[str, Any] = {}
    for pair in pairs:
        key, value = pair.split("=", 1)
        meta[key] = version_of(value) if key == "k6" else value
    meta |= server_versions(os.environ)
    meta |= {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "workers": str(Config.from_env().web_concurrency),
        "settings": labelled_settings(os.environ),
        "machine": machine(),
        "python": platform.python_version(),
        "gunicorn": version("gunicorn"),
    }
    path.write_text(json.dumps(meta, indent=2))


def chart_title(meta: Mapping[str, Any]) -> str:
    """Two short lines for the charts: a chart copied out of its report still says what it shows."""
    if not meta:
        return "FastStock against the raw WSGI reference"
    workers = meta.get("workers", "?")
    workers = f"{workers} worker{'' if workers == '1' else 's'}"
    mode = "pinned" if meta.get("pinned") == "1" else "not pinned"
    settings = "".join(
        f", {k}={v}" for k, v in meta.get("settings", {}).items() if k != "WEB_CONCURRENCY"
    )
    label = f", {meta['label']}" if meta.get("label") else ""
    ab = f", A/B against {meta['ab']}" if meta.get("ab") else ""
    m = meta.get("machine", {})
    return (
        f"FastStock against the raw WSGI reference: {mode}, {workers}{settings}{ab}{label}\n"
        f"{meta.get('date', '?')}; {m.get('cpu', '?')}, {m.get('cores', '?')} cores"
    )


def describe(meta: Mapping[str, Any], md: bool = False) -> list[str]:
    """Two lines: what ran (command, date, pinning, workers, settings, label), and where."""
    if not meta:
        return []
    workers = meta.get("workers", "?")
    gunicorn = f"gunicorn with {workers} worker{'' if workers == '1' else 's'}"
    if meta.get("pinned") == "1":
        mode = (
            f"pinned: {gunicorn} on CPU {meta.get('server_cpus', '?')}, "
            f"k6 and pgbench on CPU {meta.get('client_cpus', '?')}"
        )
    else:
        mode = f"not pinned: {gunicorn}, k6 on the same cores"
    settings = ", ".join(f"{k}={v}" for k, v in meta.get("settings", {}).items()) or "defaults"
    label = f"; label: {meta['label']}" if meta.get("label") else ""
    if meta.get("ab"):
        label = f"; A/B variant: {meta['ab']}{label}"
    products = f"; {meta['products']} products" if meta.get("products") else ""
    command = meta.get("command", "scripts/bench")
    command = f"`{command}`" if md else command
    names = {"python": "Python", "gunicorn": "gunicorn", "postgres": "PostgreSQL"}
    names |= {"redis": "Redis", "k6": "k6"}
    versions = ", ".join(f"{shown} {meta[key]}" for key, shown in names.items() if meta.get(key))
    m = meta.get("machine", {})
    return [
        f"{command} on {meta.get('date', '?')}: {mode}; settings: {settings}{products}{label}",
        f"machine: {m.get('cpu', '?')}, {m.get('cores', '?')} cores, {m.get('memory', '?')}, "
        f"{m.get('os', '?')}; {versions}",
    ]


# ---- the report ----


@dataclass(frozen=True)
class Run:
    """What one k6 script (or pgbench) run left in BENCH_DIR; None (or empty) where it left
    nothing. `group` and `round` place it in the plan: the raw run of product's round 2 is
    Run("raw", ..., group="product", round=2)."""

    name: str
    rc: str  # k6's exit status, as text
    summary: Summary | None = None
    health: Mapping[str, Any] | None = None
    before: Mapping[str, float] | None = None  # cache counters before and after the run
    after: Mapping[str, float] | None = None
    events: list[list[str]] = field(default_factory=list)  # ["stopped", "3125"]: Redis, ms after t0
    group: str = ""  # the script whose rounds it belongs to; "" for its own
    round: int = 0  # 1..ROUNDS; 0 for a script run once
    cpu_before: float | None = None  # CPU seconds of its server (master and workers) before
    cpu_after: float | None = None  # and after the run

    @property
    def cpu_ms(self) -> float | None:
        """The server's CPU milliseconds per request in this run."""
        requests = (self.summary or {}).get("requests")
        if self.cpu_before is None or self.cpu_after is None or not requests:
            return None
        return 1000 * (self.cpu_after - self.cpu_before) / requests

    @property
    def key(self) -> tuple[str, str, int]:
        return self.name, self.group or self.name, self.round


class Limit(NamedTuple):
    """One round's composed limit of the deltas, 1 / (1/raw + 1/pgbench), and its two parts."""

    value: float | None
    raw: float | None
    pgbench: float | None


@dataclass(frozen=True)
class Series:
    """Every run of one script in an invocation (its rounds, or its one run), and what the report
    takes from them: figures as medians over the runs, and each round's ratio to the runs it was
    measured next to, never to a run of another round (on a noisy machine that is mostly noise)."""

    name: str
    runs: tuple[Run, ...]
    summary: Summary | None  # medians over the runs that left a summary; None if none did
    ratios: tuple[float | None, ...] = ()  # per round: req/s / its round's raw reference's
    scenario_ratios: Mapping[str, tuple[float | None, ...]] = field(default_factory=dict)
    limits: tuple[Limit, ...] = ()  # deltas: per round, with raw and pgbench of that round
    of_limits: tuple[float | None, ...] = ()  # deltas: per round, req/s / its round's limit
    label: str = ""  # its rows' name: the script's, or "product [METRICS=0]" for a variant
    costs: tuple[float | None, ...] = ()  # per round: the A/B variant's req/s / this one's - 1
    cpu_costs: tuple[float | None, ...] = ()  # per round: CPU per request / the variant's - 1

    @property
    def shown(self) -> str:
        return self.label or self.name


@dataclass(frozen=True)
class Target:
    """One of issue 9's targets as this run measured it."""

    what: str
    measured: str
    needed: str
    ok: bool

    def row(self) -> Row:
        return [self.what, self.measured, self.needed, "PASS" if self.ok else "FAIL"]


TARGET_HEAD = ["target", "measured", "needed", "verdict"]
FIGURES = ("rps", "avg_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms")


def num(x: float | None, digits: int) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def ms(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f} ms"


def times(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}x"


def median(values: Iterable[float | None]) -> float | None:
    """The median of the known values (None when there is none): one disturbed round moves it
    less than it moves a mean."""
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def spread(ratios: Sequence[float | None], digits: int = 2) -> str:
    """A ratio cell: the median of the rounds' ratios (to `digits` places), then each round's in
    order when there are several ("0.87x (0.85, 0.87, 0.91)"), so that the reader sees how far
    the rounds agree; "-" when no round has one."""
    mid = median(ratios)
    if mid is None:
        return "-"
    if len(ratios) < 2:
        return times(mid, digits)
    return f"{times(mid, digits)} ({', '.join(num(r, 2) for r in ratios)})"


def hit_rate(counts: Mapping[str, float]) -> str:
    """Per cent of cache outcomes that were HITs, or "-" when nothing was read."""
    reads = sum(counts.values())
    return f"{100 * counts.get('HIT', 0) / reads:.1f}" if reads > 0 else "-"


def result_of(rc: str) -> str:
    return RESULTS.get(rc, f"ERROR({rc})")


def ratio(x: float | None, ref: float | None) -> float | None:
    return None if x is None or not ref else x / ref


def cost(app: float | None, variant: float | None) -> float | None:
    """What a request costs the app beyond what it costs the variant, as a share of the
    variant's, from their req/s: variant / app - 1. Both serve the same load on the same cores,
    so req/s is the inverse of the time a request takes: 0.05 is 5% more time per request (and
    the app answers 1 - 1/1.05, 4.8%, fewer requests a second). From CPU time per request, which
    grows with the cost, the arguments swap: cost(variant's, app's)."""
    r = ratio(variant, app)
    return None if r is None else r - 1


def percent_spread(values: Sequence[float | None]) -> str:
    """A cost cell, as spread() makes a ratio's: "2.1% (1.5, 2.1, 3.0)"."""
    mid = median(values)
    if mid is None:
        return "-"
    text = f"{100 * mid:.1f}%"
    if len(values) < 2:
        return text
    return f"{text} ({', '.join(num(None if v is None else 100 * v, 1) for v in values)})"


def composed_limit(raw_rps: float | None, pgbench_tps: float | None) -> float | None:
    """The most a write can reach if it costs one raw HTTP answer plus one pgbench transaction,
    paid one after the other: 1 / (1/raw + 1/pgbench)."""
    if not raw_rps or not pgbench_tps:
        return None
    return 1 / (1 / raw_rps + 1 / pgbench_tps)


def rps(s: Summary | None) -> float | None:
    return None if s is None else s.get("rps")


def merged_figures(parts: Sequence[Summary]) -> dict[str, Any]:
    """The figures of several runs of one script (or scenario, endpoint): req/s and each latency
    the median of the runs', the requests all of theirs, the failed rate over all of them (so
    that one failed request in any round shows)."""
    out: dict[str, Any] = {key: median(p.get(key) for p in parts) for key in FIGURES}
    counts = [p.get("requests") or 0 for p in parts]
    out["requests"] = sum(counts)
    rated = [(p["failed_rate"], n) for p, n in zip(parts, counts, strict=True)]
    rated = [(rate, n) for rate, n in rated if rate is not None]
    total = sum(n for _, n in rated)
    if not rated:
        out["failed_rate"] = None
    elif total:
        out["failed_rate"] = sum(rate * n for rate, n in rated) / total
    else:
        out["failed_rate"] = max(rate for rate, _ in rated)
    return out


def merged(summaries: Sequence[Summary]) -> Summary | None:
    """One summary for the runs of a script: the first's shape and settings (VUs, duration,
    think time), merged_figures for it and for each of its scenarios and endpoints. A single
    run's summary is returned as it is (with its phases, statuses and the like)."""
    if len(summaries) <= 1:
        return summaries[0] if summaries else None
    first = summaries[0]
    out = {**first, **merged_figures(summaries)}
    for part in ("scenarios", "endpoints"):
        with_part = [s for s in summaries if s.get(part)]
        if first.get(part):
            out[part] = {
                key: {
                    **value,
                    **merged_figures([s[part][key] for s in with_part if key in s[part]]),
                }
                for key, value in first[part].items()
            }
    return out


def measure(runs: Sequence[Run], variant: str = "B") -> dict[str, Series]:
    """The runs gathered into a Series per script, in the order each script first ran, each
    round's ratios taken against the runs of the same group and round (the adjacent ones); an
    A/B variant's series is labelled with `variant` (its settings), and the app's has the cost of
    each round against the variant's run of that round."""
    index = {run.key: run.summary for run in runs}
    cpu_of = {run.key: run.cpu_ms for run in runs}
    by_name: dict[str, list[Run]] = {}
    for run in runs:
        by_name.setdefault(run.name, []).append(run)

    def partner(run: Run, name: str) -> Summary | None:
        """The summary of run `name` in the same round as `run`."""
        return index.get((name, run.group or run.name, run.round))

    found: dict[str, Series] = {}
    for name, own in by_name.items():
        summary = merged([r.summary for r in own if r.summary is not None])
        ratios: tuple[float | None, ...] = ()
        scenario_ratios: dict[str, tuple[float | None, ...]] = {}
        ref_name = RAW_OF.get(base_name(name))
        refs = [rps(partner(r, ref_name)) for r in own] if ref_name else []
        if any(refs):  # without a reference in any round there is nothing to compare with
            ratios = tuple(ratio(rps(r.summary), x) for r, x in zip(own, refs, strict=True))
            for scenario in (summary or {}).get("scenarios", {}):
                scenario_ratios[scenario] = tuple(
                    ratio(rps((r.summary or {}).get("scenarios", {}).get(scenario)), x)
                    for r, x in zip(own, refs, strict=True)
                )
        limits: tuple[Limit, ...] = ()
        of_limits: tuple[float | None, ...] = ()
        if name == "deltas":
            parts = [(rps(partner(r, RAW)), rps(partner(r, PGBENCH))) for r in own]
            limits = tuple(Limit(composed_limit(a, b), a, b) for a, b in parts)
            if any(limit.value for limit in limits):
                of_limits = tuple(
                    ratio(rps(r.summary), limit.value) for r, limit in zip(own, limits, strict=True)
                )
            else:
                limits = ()
        costs: tuple[float | None, ...] = ()
        cpu_costs: tuple[float | None, ...] = ()
        if name + AB in by_name:
            costs = tuple(cost(rps(r.summary), rps(partner(r, name + AB))) for r in own)
            cpu_costs = tuple(
                cost(cpu_of.get((name + AB, r.group or name, r.round)), r.cpu_ms) for r in own
            )
            if all(c is None for c in cpu_costs):
                cpu_costs = ()
        label = f"{base_name(name)} [{variant}]" if is_variant(name) else name
        found[name] = Series(
            name,
            tuple(own),
            summary,
            ratios,
            scenario_ratios,
            limits,
            of_limits,
            label,
            costs,
            cpu_costs,
        )
    return found


def raw_cell(series: Series) -> str:
    """The "x raw" cell of a script's row: "ref" for a raw reference, "-" where nothing compares
    (pgbench is no HTTP load; spike and the outage runs have no raw reference)."""
    return "ref" if series.name in RAW_SCRIPT else spread(series.ratios)


def table_row(label: str, s: Summary, hit: str, result: str, x: str = "-", runs: str = "1") -> Row:
    failed = None if s.get("failed_rate") is None else 100 * s["failed_rate"]
    latencies = ["avg_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms"]
    return [
        label,
        str(s.get("vus", "-")),
        str(s.get("duration", "-")),
        runs,
        num(s.get("rps"), 1),
        x,
        *(num(s.get(k), 2) for k in latencies),
        num(failed, 2),
        hit,
        result,
    ]


def series_report(series: Series) -> tuple[list[Row], list[str], dict[str, float | None]]:
    """The rows and notes of one script's runs, and its outage p95 by name (nothing unless it has
    phases): the 2x criterion compares redis-outage's with redis-down's, run apart."""
    name, summary, runs = series.shown, series.summary, series.runs
    rows: list[Row] = []
    notes: list[str] = []
    counted: dict[str, float] = {}  # the runs' cache outcomes: each run's difference, summed
    snapshots = [(r.before, r.after) for r in runs if r.before is not None and r.after is not None]
    for before, after in snapshots:
        for key, value in after.items():
            counted[key] = counted.get(key, 0.0) + value - before.get(key, 0)
    hit = hit_rate(counted) if snapshots else "-"
    result = result_of(next((r.rc for r in runs if r.rc != "0"), "0"))
    for run in runs:
        if run.health is not None:
            healthy = run.health["healthy"]
            notes.append(
                f"{name}: healthy after: {'yes' if healthy else 'NO'} ({run.health['detail']})"
            )
            if not healthy and result == "ok":
                result = "UNHEALTHY"
    count = str(len(runs))
    if summary is None:  # k6 died before writing it: the row still says how
        return [[name, "-", "-", count, *["-"] * (len(HEAD) - 5), result]], notes, {}
    rows.append(table_row(name, summary, hit, result, raw_cell(series), count))
    for scenario, s in summary.get("scenarios", {}).items():
        whole = {**s, "vus": summary["vus"], "duration": summary["duration"]}
        x = spread(series.scenario_ratios.get(scenario, ()))
        rows.append(table_row(f"  {name}:{scenario}", whole, "-", "", x, count))
    for endpoint, s in summary.get("endpoints", {}).items():
        rows.append(table_row(f"  {endpoint}", {**s, "vus": "", "duration": ""}, "-", "", runs=""))
    if summary.get("think_ms") is not None:
        pages = f", pages 1..{summary['pages']}" if summary.get("pages") else ""
        notes.append(f"{name}: {summary['think_ms']:g} ms think time after each answer{pages}")
    phases = summary.get("phases", {})
    for phase, s in phases.items():
        if s["requests"] or not summary["outage"]["down"]:
            timed = {**s, "vus": summary["vus"], "duration": f"{s['seconds']:.1f}s"}
            rows.append(
                table_row(f"  {name}:{phase}", timed, hit_rate(s["x_cache"]), "", runs=count)
            )
    if "statuses" in summary:
        st = summary["statuses"]
        notes.append(
            f"{name}: answers 200 {st['200']}, 503 {st['503']}, other {st['other']}; "
            f"p95 of the 200s {ms(summary['p95_200_ms'])}"
        )
    if not phases:
        return rows, notes, {}
    outage_p95 = phases["outage"]["p95_ms"]
    failed = f"failed requests {summary['failed_requests']} of {summary['requests']}"
    if summary["outage"]["down"]:
        notes.append(f"{name}: p95 {ms(outage_p95)} with Redis down throughout; {failed}")
        return rows, notes, {series.name: outage_p95}
    events = runs[-1].events
    redis = ", ".join(f"{k} at +{int(v) / 1000:.2f} s" for k, v in events) or "never stopped"
    during = " / ".join(f"{p} {ms(phases[p]['p95_ms'])}" for p in ("before", "outage", "after"))
    resumed = summary["hit_resumed_after_s"]
    resumed_text = "none" if resumed is None else f"{resumed:.2f} s"
    outage = summary["outage"]
    notes.append(
        f"{name}: p95 {during}; {failed}; first HIT after restore: {resumed_text} "
        f"(outage {outage['start_s']:g}-{outage['end_s']:g} s; Redis {redis})"
    )
    return rows, notes, {series.name: outage_p95}


def rounds_of(measured: Mapping[str, Series]) -> int:
    """How many rounds the scripts that run in rounds had (0: none ran in rounds)."""
    return max((run.round for s in measured.values() for run in s.runs), default=0)


def rounds_note(measured: Mapping[str, Series]) -> str | None:
    """What the figures of a script run in several rounds are, said once above the other notes."""
    rounds = rounds_of(measured)
    if rounds < 2:
        return None
    if not any(name in RAW_SCRIPT for name in measured):
        return (
            f"{rounds} rounds: each throughput script ran {rounds} times; req/s and latencies "
            "are medians over its runs, failed % and cache hit % over all of them"
        )
    return (
        f"{rounds} rounds: each compared script ran {rounds} times, each right after a run of its "
        "raw reference (raw, script, raw, script, ...); req/s and latencies are medians over a "
        "script's runs, x raw the median of its rounds' ratios to the raw run next to them (each "
        "round's in brackets, in order), failed % and cache hit % over all its runs"
    )


def deltas_note(deltas: Series) -> str:
    """The deltas' ratio to the composed limit of each round, and what each limit was made of."""
    if len(deltas.limits) == 1:
        limit = deltas.limits[0]
        return (
            f"deltas: {num(rps(deltas.summary), 1)} req/s = {spread(deltas.of_limits)} the "
            f"composed limit {num(limit.value, 1)}/s = 1 / (1/raw {num(limit.raw, 1)} + "
            f"1/pgbench {num(limit.pgbench, 1)})"
        )

    def listed(values: Iterable[float | None]) -> str:
        return ", ".join(num(v, 1) for v in values)

    return (
        f"deltas: {spread(deltas.of_limits)} the composed limit 1 / (1/raw + 1/pgbench) of its "
        f"round: {listed(lim.value for lim in deltas.limits)}/s, from raw "
        f"{listed(lim.raw for lim in deltas.limits)} and pgbench "
        f"{listed(lim.pgbench for lim in deltas.limits)}"
    )


def ab_notes(measured: Mapping[str, Series]) -> list[str]:
    """The A/B costs: for each script run against the app and its variant, the median over the
    rounds of the cost of the app's run against the variant's run of the same round (each
    round's in brackets), then, over several scripts, the median of all their rounds' costs."""
    pairs = [(s, measured[s.name + AB]) for s in measured.values() if s.costs]
    if not pairs:
        return []
    first = pairs[0][1]
    tag = first.shown.removeprefix(base_name(first.name)).strip()  # "[METRICS=0]"
    notes = [
        f"A/B: each script also ran against a second gunicorn of the app, the variant (rows "
        f"{tag}), in the same rounds: after the app in odd rounds, before it in even ones. The "
        "app's cost in one round is the share of time a request takes beyond the variant's: in "
        "req/s, the variant's / the app's - 1; in CPU, the server's CPU time (master and "
        "workers, user and system) per request during the run, the app's / the variant's - 1, "
        "which moves far less with what else the machine runs. Median first, then each round's"
    ]

    def cpu_part(app: Series, variant: Series) -> str:
        if not app.cpu_costs:
            return ""
        app_ms = median(r.cpu_ms for r in app.runs)
        variant_ms = median(r.cpu_ms for r in variant.runs)
        return (
            f"; {percent_spread(app.cpu_costs)} in CPU per request ({num(app_ms, 3)} ms, "
            f"{num(variant_ms, 3)} ms)"
        )

    for app, variant in pairs:
        notes.append(
            f"{app.shown} against {variant.shown}: costs {percent_spread(app.costs)} in req/s"
            f"{cpu_part(app, variant)}"
        )
    every = [c for app, _ in pairs for c in app.costs if c is not None]
    every_cpu = [c for app, _ in pairs for c in app.cpu_costs if c is not None]
    if len(pairs) > 1 and every:
        names = ", ".join(app.shown for app, _ in pairs)
        cpu = f"; {percent_spread([median(every_cpu)])} in CPU per request" if every_cpu else ""
        notes.append(
            f"A/B over every round of {names}: costs {percent_spread([median(every)])} in req/s"
            f"{cpu} (medians of {len(every)} rounds' costs)"
        )
    return notes


def report(measured: Mapping[str, Series]) -> tuple[list[Row], list[str]]:
    """The table's rows and the notes, in the order the scripts first ran."""
    rows: list[Row] = []
    notes: list[str] = []
    note = rounds_note(measured)
    if note is not None:
        notes.append(note)
    p95: dict[str, float | None] = {}
    for series in measured.values():
        series_rows, series_notes, series_p95 = series_report(series)
        rows += series_rows
        notes += series_notes
        p95.update(series_p95)
    outage, down = p95.get("redis-outage"), p95.get("redis-down")
    if outage and down:
        notes.append(
            f"outage p95 / redis-down p95 = {outage / down:.2f} (the criterion: at most 2)"
        )
    deltas = measured.get("deltas")
    if deltas is not None and deltas.limits:
        notes.append(deltas_note(deltas))
    notes += ab_notes(measured)
    return rows, notes


def targets(measured: Mapping[str, Series]) -> list[Target]:
    """Issue 9's targets that this run's scripts can tell, each on the median over the rounds of
    the ratio to the reference run next to it; and, if any, that no run failed a request."""
    found: list[Target] = []

    def at_least(what: str, ratios: Sequence[float | None], need: float) -> Target:
        r = median(ratios)
        # A median just short of the target would read as meeting it when rounded (0.949 as
        # 0.95x next to ">= 0.95x ... FAIL"): it is then shown with as many places as it takes.
        digits = 2
        while r is not None and r < need <= round(r, digits) and digits < 6:
            digits += 1
        return Target(what, spread(ratios, digits), f">= {need:.2f}x", r is not None and r >= need)

    for name, need in READ_TARGETS.items():
        series = measured.get(name)
        if series is not None and series.ratios:
            found.append(at_least(f"{name} req/s / raw", series.ratios, need))
    seed, ref = measured.get("seed-pagination"), measured.get("raw-seed-pagination")
    if seed is not None and ref is not None and seed.ratios:
        what = "seed-pagination req/s / raw-seed-pagination"
        found.append(at_least(what, seed.ratios, SEED_PAGINATION_TARGET))
        p95, ref_p95 = (seed.summary or {}).get("p95_ms"), (ref.summary or {}).get("p95_ms")
        bound = None if ref_p95 is None else SEED_P95_FACTOR * ref_p95 + SEED_P95_SLACK_MS
        ok = p95 is not None and bound is not None and p95 <= bound
        what = "seed-pagination p95 (medians; 2x raw's + 2 ms)"
        found.append(Target(what, ms(p95), f"<= {ms(bound)}", ok))
    deltas = measured.get("deltas")
    if deltas is not None and deltas.limits:
        what = "deltas req/s / 1/(1/raw + 1/pgbench)"
        found.append(at_least(what, deltas.of_limits, DELTAS_TARGET))
    if found:
        failing = [
            f"{s.shown} {100 * s.summary['failed_rate']:.2f}%"
            for s in measured.values()
            if s.summary is not None and (s.summary.get("failed_rate") or 0) > 0
        ]
        measured_text = ", ".join(failing) or "none"
        found.append(Target("failed requests, every run", measured_text, "none", not failing))
    return found


def target_caveats(meta: Mapping[str, Any], measured: Mapping[str, Series]) -> list[str]:
    """How this run differs from the one the targets are stated for (none: it is that run)."""
    caveats = []
    if meta.get("pinned") != "1":
        caveats.append("not pinned (--pin)")
    if meta.get("workers", "1") != "1":
        caveats.append(f"{meta['workers']} workers, not 1")
    rounds = rounds_of(measured)
    if rounds < TARGET_ROUNDS:
        caveats.append(f"{rounds} round{'' if rounds == 1 else 's'}, not {TARGET_ROUNDS}")
    summaries = {name: s.summary for name, s in measured.items() if s.summary is not None}
    off: dict[tuple[Any, int], list[str]] = {}  # (VUs run, VUs stated): the scripts so run
    for name, vus in TARGET_VUS.items():
        if name in summaries and summaries[name].get("vus") != vus:
            off.setdefault((summaries[name].get("vus"), vus), []).append(name)
    for (ran, stated), names in off.items():
        caveats.append(f"{', '.join(names)} at {ran} VUs, not {stated}")
    seed = summaries.get("seed-pagination") or {}
    think, pages = seed.get("think_ms"), seed.get("pages")
    if seed and (think, pages) != (SEED_THINK_MS, SEED_PAGES):
        caveats.append(
            f"seed-pagination with {think} ms think time and pages 1..{pages}, "
            f"not {SEED_THINK_MS} ms and 1..{SEED_PAGES}"
        )
    return caveats


TARGETS_TITLE = (
    "targets (issue 9; met in one `scripts/bench --pin compare` run, one worker; "
    "medians of its rounds)"
)


def align(head: Sequence[str], rows: Sequence[Row], indent: str = "") -> list[str]:
    """The table's lines, columns aligned: the first to the left, figures to the right."""
    table = [list(head), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    return [
        indent
        + "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w)
            for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in table
    ]


def render(
    rows: Sequence[Row],
    notes: Sequence[str],
    found: Sequence[Target] = (),
    caveats: Sequence[str] = (),
    header: Sequence[str] = (),
) -> str:
    """The text report: what ran where, the table, the notes, then the targets."""
    lines = [*header, *align(HEAD, rows)]
    if notes:
        lines += ["", *notes]
    if found:
        lines += ["", f"{TARGETS_TITLE}:", *align(TARGET_HEAD, [t.row() for t in found], "  ")]
        if caveats:
            lines.append(f"  not the targets' conditions ({'; '.join(caveats)}): indicative only")
    return "\n".join(lines) + "\n"


def md_table(head: Sequence[str], rows: Sequence[Row]) -> list[str]:
    def cell(text: str) -> str:
        return text.strip().replace("|", "\\|")

    rule = "|" + "|".join("---" if i == 0 else "---:" for i in range(len(head))) + "|"
    return [
        "| " + " | ".join(head) + " |",
        rule,
        *("| " + " | ".join(cell(c) for c in r) + " |" for r in rows),
    ]


def markdown(
    rows: Sequence[Row],
    notes: Sequence[str],
    found: Sequence[Target],
    caveats: Sequence[str],
    meta: Mapping[str, Any],
    images: Mapping[str, str],
) -> str:
    """The report in Markdown (results.md, and the README's block): `images` maps each chart's
    description to its path."""
    lines: list[str] = []
    for line in describe(meta, md=True):
        lines += [line[0].upper() + line[1:], ""]
    lines += md_table(HEAD, rows)
    if notes:
        lines += ["", *(f"- {note}" for note in notes)]
    if found:
        lines += ["", f"{TARGETS_TITLE[0].upper()}{TARGETS_TITLE[1:]}:", ""]
        lines += md_table(TARGET_HEAD, [t.row() for t in found])
        if caveats:
            lines += ["", f"Not the targets' conditions ({'; '.join(caveats)}): indicative only."]
    for alt, path in images.items():
        lines += ["", f"![{alt}]({path})"]
    return "\n".join(lines) + "\n"


CHART_ALT = {"reqs.png": "req/s per scenario", "latency.png": "p50, p95 and p99 per scenario"}


def write_charts(
    runs: Sequence[tuple[str, Summary]],
    title: str,
    out_dir: Path,
    ratios: Mapping[str, str] | None = None,
) -> list[Path]:
    """reqs.png (req/s of each script, labelled with its ratio to its raw reference from
    `ratios`, "0.87x") and latency.png (p50, p95, p99 of each, log scale: the raw reference
    answers in a millisecond, a loaded service in hundreds) in out_dir; a chart with nothing to
    show is not written. The figures are the report's: medians over the rounds."""
    import matplotlib

    matplotlib.use("Agg")  # files only: no display, whatever MPLBACKEND says
    from matplotlib import pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    ratios = ratios or {}
    written: list[Path] = []
    measured = [(n, s) for n, s in runs if s.get("rps")]
    if measured:
        fig, ax = plt.subplots(figsize=(9, 1.4 + 0.42 * len(measured)))
        colors = [
            "#9e9e9e"
            if n in RAW_SCRIPT
            else "#4caf50"
            if n == "pgbench"
            else "#ff7f0e"
            if n.endswith("]")  # an A/B variant's label, "product [METRICS=0]"
            else "#1f77b4"
            for n, _ in measured
        ]
        values = [s["rps"] for _, s in measured]
        ax.barh(range(len(measured)), values, color=colors)
        ax.set_yticks(range(len(measured)), [n for n, _ in measured])
        ax.invert_yaxis()
        for i, (name, s) in enumerate(measured):
            x = ratios.get(name, "-")
            label = f" {s['rps']:,.0f}" + (f" ({x} raw)" if x not in ("-", "ref") else "")
            ax.text(s["rps"], i, label, va="center", fontsize=8)
        ax.set_xlim(0, 1.3 * max(values))
        variant = "; orange: the A/B variant" if "#ff7f0e" in colors else ""
        ax.set_xlabel(
            "requests/s (pgbench: transactions/s), medians of the rounds\nx raw: the median of "
            f"the rounds' ratios; grey: the raw reference{variant}"
        )
        ax.set_title(title, fontsize=9)
        fig.tight_layout()
        written.append(out_dir / "reqs.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    keys = [("p50_ms", "p50"), ("p95_ms", "p95"), ("p99_ms", "p99")]
    timed = [(n, s) for n, s in runs if all(s.get(k) is not None for k, _ in keys)]
    if timed:
        fig, ax = plt.subplots(figsize=(9, 1.6 + 0.6 * len(timed)))
        height = 0.27
        for j, (key, label) in enumerate(keys):
            ys = [i + (j - 1) * height for i in range(len(timed))]
            ax.barh(ys, [max(s[key], 1e-3) for _, s in timed], height, label=label)
        ax.set_yticks(range(len(timed)), [n for n, _ in timed])
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.set_xlim(left=0.5 * min(max(s[k], 1e-3) for _, s in timed for k, _ in keys))
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("latency, ms (log scale)")
        ax.set_title(title, fontsize=9)
        ax.legend(loc="lower right", fontsize=8)
        fig.tight_layout()
        written.append(out_dir / "latency.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written


def replace_block(text: str, block: str) -> str | None:
    """`text` with what lies between README_START and README_END replaced by `block`, or None
    if it has no such block."""
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        return None
    return f"{text[: start + len(README_START)]}\n{block.strip()}\n{text[end:]}"


def write_results(bench_dir: Path, runs: Sequence[Run], save: tuple[Path, Path] | None) -> str:
    """The text report (returned), and results.md and the charts in bench_dir; with `save`
    (DEST, README), copies of them in DEST and the Markdown in README's block."""
    meta = _load_json(bench_dir / "meta.json") or {}
    measured = measure(runs, ab_label(meta.get("ab", "")))
    rows, notes = report(measured)
    found = targets(measured)
    caveats = target_caveats(meta, measured) if found else []
    header = describe(meta)
    text = render(rows, notes, found, caveats, header)
    for stale in [bench_dir / "results.md"] + [bench_dir / c for c in CHARTS]:
        stale.unlink(missing_ok=True)
    try:
        charts = write_charts(
            [(s.shown, s.summary) for s in measured.values() if s.summary],
            chart_title(meta),
            bench_dir,
            {s.shown: times(median(s.ratios)) for s in measured.values()},
        )
    except ImportError as exc:  # matplotlib is a dev requirement; the table matters more
        log(f"no charts: {exc}")
        charts = []
    images = {CHART_ALT[c.name]: c.name for c in charts}
    (bench_dir / "results.md").write_text(markdown(rows, notes, found, caveats, meta, images))
    if save is not None:
        dest, readme = save
        dest.mkdir(parents=True, exist_ok=True)
        for name in ("results.md", *CHARTS):
            (dest / name).unlink(missing_ok=True)
            if (bench_dir / name).exists():
                shutil.copyfile(bench_dir / name, dest / name)
        prefix = os.path.relpath(dest, readme.resolve().parent)
        linked = {alt: f"{prefix}/{name}" for alt, name in images.items()}
        block = markdown(rows, notes, found, caveats, meta, linked)
        try:
            updated = replace_block(readme.read_text(), block)
        except OSError:
            updated = None
        if updated is None:
            log(f"{readme} has no {README_START} ... {README_END} block: not updated")
        else:
            readme.write_text(updated)
        log(f"saved the results to {dest}")
    return text


def _load_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def load_run(bench_dir: Path, item: str) -> Run:
    """The Run of ID:RC (ID as run_id makes it) from the files scripts/bench and k6 left in
    `bench_dir`."""
    stem, rc = item.rsplit(":", 1)
    name, group, round_ = parse_id(stem)
    try:  # stopped=MS, started=MS after k6 was started
        events = [line.split("=") for line in (bench_dir / f"{stem}.events").read_text().split()]
    except OSError:
        events = []
    return Run(
        name=name,
        rc=rc,
        summary=(_load_json(bench_dir / f"{stem}.json") or {}).get("faststock"),
        health=_load_json(bench_dir / f"{stem}.health"),
        before=_load_json(bench_dir / f"{stem}.before.cache"),
        after=_load_json(bench_dir / f"{stem}.after.cache"),
        events=events,
        group=group,
        round=round_,
        cpu_before=_load_json(bench_dir / f"{stem}.before.cpu"),
        cpu_after=_load_json(bench_dir / f"{stem}.after.cpu"),
    )


def main(argv: Sequence[str]) -> int:
    if not argv:
        print(__doc__, file=sys.stderr)
        return 2
    cmd, args = argv[0], argv[1:]
    try:
        if cmd == "check-config":
            check_config()
        elif cmd == "wait":
            wait_ready(args[0], float(args[1]), int(args[2]))
        elif cmd == "cache":
            save_cache_counts(args[0], Path(args[1]))
        elif cmd == "cpu":
            Path(args[1]).write_text(json.dumps(cpu_seconds(int(args[0]))))
        elif cmd == "healthy":
            return 0 if check_health(args[0], int(args[1]), Path(args[2])) else 1
        elif cmd == "cache-back":
            wait_cache_back(args[0], float(args[1]))
        elif cmd == "plan":
            ab = args[:1] == ["--ab"]
            args = args[1:] if ab else args
            rounds, with_raw, warmup, names = int(args[0]), args[1] == "1", args[2] == "1", args[3:]
            for step in plan(names, rounds, with_raw, warmup, ab):
                print(step.line())
        elif cmd == "ab-settings":
            for name, value in ab_settings(args[0], os.environ).items():
                print(f"{name}={value}")
        elif cmd == "metrics":
            print(int(metrics_served(args[0])))
        elif cmd == "pgbench-script":
            Path(args[0]).write_text(pgbench_script(int(args[1])))
        elif cmd == "pgbench-summary":
            summary = pgbench_summary(Path(args[0]).read_text())
            if summary is not None:
                Path(args[1]).write_text(json.dumps({"faststock": summary}))
        elif cmd == "meta":
            write_meta(Path(args[0]), args[1:])
        elif cmd == "table":
            bench_dir, items, save = Path(args[0]), args[1:], None
            if items[:1] == ["--save"]:
                save, items = (Path(items[1]), Path(items[2])), items[3:]
            runs = [load_run(bench_dir, item) for item in items]
            sys.stdout.write(write_results(bench_dir, runs, save))
        else:
            raise BenchError(f"unknown command {cmd!r}")
    except BenchError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
