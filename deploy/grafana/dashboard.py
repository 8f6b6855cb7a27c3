"""The FastStock Grafana dashboard, as code (grafana-foundation-sdk).

Regenerate the JSON Grafana provisions after any change here (tests/test_observability.py fails
while the committed file differs from this output):

    .venv/bin/python deploy/grafana/dashboard.py

Every query names only metrics of the README's metric contract, and every one returns a series
while the service is under load (the live test runs each through a real Prometheus). A count
that may be zero (no 5xx yet) is written `(sum(rate(x{...}[i])) or sum(rate(x[i])) * 0)`: zero
while requests flow, but nothing at all if the metric itself is missing, which `or vector(0)`
would hide behind a flat zero line.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from grafana_foundation_sdk.builders.dashboard import Dashboard, Row
from grafana_foundation_sdk.builders.prometheus import Dataquery as PrometheusQuery
from grafana_foundation_sdk.builders.timeseries import Panel as Timeseries
from grafana_foundation_sdk.cog.encoder import JSONEncoder
from grafana_foundation_sdk.models.common import TimeZoneBrowser
from grafana_foundation_sdk.models.dashboard import DataSourceRef

OUTPUT = Path(__file__).resolve().parent / "dashboards" / "faststock.json"
# The datasource deploy/grafana/provisioning/datasources/prometheus.yml provisions.
DATASOURCE = DataSourceRef(type_val="prometheus", uid="prometheus")
# Grafana widens it to at least four scrape intervals (the datasource's timeInterval).
RATE = "$__rate_interval"


def rate(selector: str) -> str:
    return f"rate({selector}[{RATE}])"


def or_zero(by: str, metric: str, matchers: str) -> str:
    """sum(rate(metric{matchers})), or 0 for each group that has requests but none matching."""
    group = f"sum by ({by}) " if by else "sum"
    return f"({group}({rate(metric + '{' + matchers + '}')}) or {group}({rate(metric)}) * 0)"


def quantile(q: float, histogram: str, by: str = "") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) ({rate(histogram + '_bucket')}))"


def hit_ratio(counter: str, hit: str) -> str:
    """Share of `counter` per endpoint whose result is `hit` (0 where there was none)."""
    hits = or_zero("endpoint", counter, 'result="' + hit + '"')
    return f"{hits} / sum by (endpoint) ({rate(counter)})"


@dataclass(frozen=True)
class Query:
    expr: str
    legend: str


@dataclass(frozen=True)
class PanelSpec:
    title: str
    description: str
    unit: str
    queries: tuple[Query, ...]


HTTP = "flask_http_request_duration_seconds"

ROWS: tuple[tuple[str, tuple[PanelSpec, ...]], ...] = (
    (
        "Requests",
        (
            PanelSpec(
                "Requests per second by endpoint and status class",
                "Every request the app answered, by route template and status class (2xx, 4xx, "
                "5xx), whether Flask or the fast lane answered it.",
                "reqps",
                (
                    Query(
                        "sum by (route, status_class) (label_replace("
                        f'{rate(HTTP + "_count")}, "status_class", "${{1}}xx", "status", "(.)..")'
                        ")",
                        "{{route}} {{status_class}}",
                    ),
                ),
            ),
            PanelSpec(
                "Client errors (4xx) and server errors (5xx) per second",
                "4xx: the client's mistake (bad id, absent product, not enough stock). 5xx: "
                "FastStock answers 503 only when PostgreSQL is unusable; the FastStockHigh5xxRatio "
                "alert fires above 1% of requests for 5 minutes.",
                "reqps",
                (
                    Query(or_zero("", "flask_http_request_total", 'status=~"4.."'), "4xx"),
                    Query(or_zero("", "flask_http_request_total", 'status=~"5.."'), "5xx"),
                ),
            ),
            PanelSpec(
                "Share of requests answered 5xx",
                "5xx answers as a share of all requests: the FastStockHigh5xxRatio alert fires "
                "above 1% for 5 minutes.",
                "percentunit",
                (
                    Query(
                        or_zero("", "flask_http_request_total", 'status=~"5.."')
                        + f" / sum({rate('flask_http_request_total')})",
                        "5xx share",
                    ),
                ),
            ),
            PanelSpec(
                "Latency by endpoint: p50, p95 and p99",
                "How long requests took, per route template, from the request histogram (buckets "
                "from 0.25 ms, so cache hits show). The FastStockSlowP95 alert fires when the "
                "overall p95 stays above 50 ms for 10 minutes.",
                "s",
                tuple(
                    Query(quantile(q, HTTP, "route"), f"p{round(q * 100)} {{{{route}}}}")
                    for q in (0.5, 0.95, 0.99)
                ),
            ),
        ),
    ),
    (
        "Caches",
        (
            PanelSpec(
                "Cache hit ratio by endpoint",
                "Share of reads answered from cache (X-Cache: HIT) per read endpoint: product, "
                "stock and list. MISS went to PostgreSQL and filled the cache; BYPASS skipped "
                "Redis (breaker open, or Redis not trusted).",
                "percentunit",
                (Query(hit_ratio("faststock_cache_requests_total", "HIT"), "{{endpoint}}"),),
            ),
            PanelSpec(
                "In-process cache hit ratio by endpoint",
                "Share of reads each worker answered from its own memory (the near cache in "
                "front of Redis), per endpoint; `off` counts reads while it stood aside.",
                "percentunit",
                (Query(hit_ratio("faststock_near_cache_requests_total", "hit"), "{{endpoint}}"),),
            ),
            PanelSpec(
                "In-process cache invalidations per second by source",
                "Why entries were dropped: write (a write on this host stamped its product), "
                "channel (product ids heard from the change channel: every host's writes), "
                "flush (a worker's whole near cache dropped: start, seed, Redis trouble).",
                "ops",
                (
                    Query(
                        f"sum by (source) ({rate('faststock_near_cache_invalidations_total')})",
                        "{{source}}",
                    ),
                ),
            ),
            PanelSpec(
                "In-process cache entries (all workers)",
                "Products and list pages the workers' near caches hold, summed over workers.",
                "short",
                (Query("sum(faststock_near_cache_entries)", "entries"),),
            ),
        ),
    ),
    (
        "Redis breaker and PostgreSQL pool",
        (
            PanelSpec(
                "Redis circuit breaker per worker (1 = open)",
                "While a worker's breaker is open its reads skip Redis and go to PostgreSQL "
                "(X-Cache: BYPASS); the keeper closes it once Redis answers again. Openings: "
                "how many times a breaker opened in the interval.",
                "short",
                (
                    Query("max by (pid) (faststock_redis_breaker_open)", "worker {{pid}}"),
                    Query(
                        f"sum(increase(faststock_redis_breaker_openings_total[{RATE}]))",
                        "openings",
                    ),
                ),
            ),
            PanelSpec(
                "Database connections in use, of the pool size",
                "PostgreSQL connections checked out of the pools of all workers, against the "
                "pools' total size (DB_POOL_SIZE per worker).",
                "short",
                (
                    Query("sum(faststock_db_pool_in_use)", "in use"),
                    Query("sum(faststock_db_pool_size)", "pool size"),
                ),
            ),
            PanelSpec(
                "Requests waiting for a database connection",
                "Requests queued for a connection right now, and those that gave up after "
                "DB_POOL_TIMEOUT (answered 503). The FastStockDbPoolWaiters alert fires when "
                "requests wait for 5 minutes.",
                "short",
                (
                    Query("sum(faststock_db_pool_waiters)", "waiting"),
                    Query(f"sum({rate('faststock_db_pool_timeouts_total')})", "timeouts/s"),
                ),
            ),
            PanelSpec(
                "Wait for a database connection, p95",
                "95th percentile of the time a request waited to get a pooled connection.",
                "s",
                (Query(quantile(0.95, "faststock_db_pool_wait_seconds"), "p95 wait"),),
            ),
            PanelSpec(
                "SQL statement latency p95 by query",
                "95th percentile of each statement's duration, by its function in "
                "faststock/queries.py (fetch_product, add_stock, ...).",
                "s",
                (
                    Query(
                        quantile(0.95, "faststock_db_statement_duration_seconds", "query"),
                        "{{query}}",
                    ),
                ),
            ),
        ),
    ),
    (
        "Stock writes and the cache outbox",
        (
            PanelSpec(
                "Stock changes per second by kind and outcome",
                "update-stock requests by kind (set, delta) and outcome: applied, insufficient "
                "(409), out_of_range (409), replayed (Idempotency-Key retry), key_reused (422), "
                "not_found (404).",
                "ops",
                (
                    Query(
                        f"sum by (kind, outcome) ({rate('faststock_stock_changes_total')})",
                        "{{kind}} {{outcome}}",
                    ),
                ),
            ),
            PanelSpec(
                "Cache outbox: records pending and replays",
                "Records left in cache_outbox after a keeper's last pass (every write leaves one "
                "until a sweep sees Redis holds its version), and rows the keepers replayed into "
                "Redis per second because it had missed a change. The "
                "FastStockOutboxBacklogGrowing alert fires when the backlog grows for 5 minutes.",
                "short",
                (
                    Query("max(faststock_outbox_backlog)", "pending records"),
                    Query(f"sum({rate('faststock_outbox_replays_total')})", "replays/s"),
                ),
            ),
        ),
    ),
    (
        "Workers",
        (
            PanelSpec(
                "Worker CPU (share of one core)",
                "CPU time each gunicorn worker used per second of wall time: 100% is one core.",
                "percentunit",
                (
                    Query(
                        f"sum by (pid) ({rate('faststock_worker_cpu_seconds')})",
                        "worker {{pid}}",
                    ),
                ),
            ),
            PanelSpec(
                "Worker memory (resident)",
                "Resident memory of each gunicorn worker.",
                "bytes",
                (Query("sum by (pid) (faststock_worker_resident_memory_bytes)", "worker {{pid}}"),),
            ),
            PanelSpec(
                "Worker open file descriptors",
                "Sockets and files each worker holds open (client connections, the pools, Redis).",
                "short",
                (Query("sum by (pid) (faststock_worker_open_fds)", "worker {{pid}}"),),
            ),
        ),
    ),
)


def panel(spec: PanelSpec, panel_id: int) -> Timeseries:
    built = (
        Timeseries()
        .id(panel_id)
        .title(spec.title)
        .description(spec.description)
        .datasource(DATASOURCE)
        .unit(spec.unit)
        .min(0)
        .height(8)
        .span(12)
    )
    for index, query in enumerate(spec.queries):
        built = built.with_target(
            PrometheusQuery()
            .expr(query.expr)
            .legend_format(query.legend)
            .ref_id(chr(ord("A") + index))
            .datasource(DATASOURCE)
        )
    return built


def dashboard() -> Dashboard:
    built = (
        Dashboard("FastStock")
        .uid("faststock")
        .description("Traffic, latency, caches, Redis breaker, PostgreSQL pool and workers.")
        .tags(["faststock", "generated"])
        .refresh("10s")
        .time("now-30m", "now")
        .timezone(TimeZoneBrowser)
        .readonly()
    )
    # Stable ids, in layout order: links to a panel (viewPanel=ID) survive regeneration.
    next_id = 1
    for title, panels in ROWS:
        built = built.with_row(Row(title).id(next_id))
        next_id += 1
        for spec in panels:
            built = built.with_panel(panel(spec, next_id))
            next_id += 1
    return built


def render() -> str:
    """The dashboard JSON, byte for byte as committed."""
    return JSONEncoder(sort_keys=True, indent=2).encode(dashboard().build()) + "\n"


def main() -> None:
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")


if __name__ == "__main__":
    main()
