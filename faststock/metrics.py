"""Prometheus metrics: per-route latency and status from prometheus-flask-exporter, plus ours.

Requests are labelled by route template (`/api/products/<raw_id>`), never by raw path, so a
scan of random ids cannot explode the number of series. Under gunicorn every worker writes to
`PROMETHEUS_MULTIPROC_DIR` (gunicorn.conf.py sets it) and any worker's `/metrics` reports the sum
of all of them; a worker that exits is marked dead from gunicorn's `child_exit` hook.
"""

from __future__ import annotations

import atexit
import bisect
import os
import threading
import time

from flask import Flask, Request, current_app
from prometheus_client import CollectorRegistry, Counter
from prometheus_flask_exporter import PrometheusMetrics

BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def route(request: Request) -> str:
    """The matched route template; one label value for everything that matched no route."""
    return request.url_rule.rule if request.url_rule is not None else "<unmatched>"


def multiprocess() -> bool:
    return bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))


def count_cache(endpoint: str, result: str) -> None:
    """Counts one cache outcome (HIT, MISS or BYPASS) for a read endpoint."""
    current_app.extensions["faststock.metrics"].labels(endpoint, result).inc()


def mark_process_dead(pid: int) -> None:
    """Called by gunicorn's master when a worker exits, so its live gauges stop being reported."""
    if multiprocess():
        from prometheus_client import multiprocess as mp

        mp.mark_process_dead(pid)


def _real_lock() -> threading.Lock:
    """The operating system's lock even where gevent has patched `threading` (1.5 µs of a
    1-2 µs count saved per hit). Safe under gevent only because it is never held across
    anything that could yield to another greenlet."""
    try:
        from gevent import monkey
    except ImportError:
        return threading.Lock()
    return monkey.get_original("_thread", "allocate_lock")()


class LaneCounts:
    """Requests the fast lane answered, counted in memory and flushed into the same series the
    Flask path feeds (request duration and total, cache outcome).

    Feeding them one request at a time costs more than the rest of a fast-lane hit (the
    multiprocess values are locked and written to a file per update). Pending counts are
    flushed every FLUSH_SECONDS by a background thread, when `/metrics` is scraped from this
    worker, and at exit; so after N requests the counters have grown by exactly N once a flush
    has run, whichever path served them.
    """

    FLUSH_SECONDS = 0.25

    def __init__(self, registry: CollectorRegistry, cache: Counter) -> None:
        collectors = registry._names_to_collectors
        self._duration = collectors["flask_http_request_duration_seconds"]
        self._total = collectors["flask_http_request_total"]
        self._cache = cache
        self._bounds = list(self._duration._upper_bounds)
        self._pending: dict[tuple[str, str], list] = {}
        self._lock = _real_lock()
        self._started = False
        os.register_at_fork(after_in_child=self._forked)

    def _forked(self) -> None:
        """A forked worker counts only its own requests, and flushes them itself."""
        self._pending = {}
        self._lock = _real_lock()
        self._started = False

    def hit(self, route: str, endpoint: str, seconds: float) -> None:
        """Count one 200 GET of `route` answered from the near cache in `seconds`."""
        with self._lock:
            if not self._started:
                self._start()
            counts = self._pending.get((route, endpoint))
            if counts is None:
                counts = self._pending[(route, endpoint)] = [0, 0.0, [0] * len(self._bounds)]
            counts[0] += 1
            counts[1] += seconds
            counts[2][bisect.bisect_left(self._bounds, seconds)] += 1

    def _start(self) -> None:
        self._started = True
        atexit.register(self.flush)
        threading.Thread(
            target=self._flush_forever, name="faststock-lane-metrics", daemon=True
        ).start()

    def _flush_forever(self) -> None:
        while True:
            time.sleep(self.FLUSH_SECONDS)
            self.flush()

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
        for (route, endpoint), (count, total, buckets) in pending.items():
            child = self._duration.labels(method="GET", route=route, status="200")
            child._sum.inc(total)
            for i, n in enumerate(buckets):
                if n:
                    child._buckets[i].inc(n)
            self._total.labels(method="GET", status="200").inc(count)
            self._cache.labels(endpoint, "HIT").inc(count)


def get_lane_counts(app: Flask | None = None) -> LaneCounts:
    return (app or current_app).extensions["faststock.lane_counts"]


def init_app(app: Flask) -> None:
    options = {"group_by": route, "buckets": BUCKETS, "default_labels": {}}
    if multiprocess():
        from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

        exporter = GunicornInternalPrometheusMetrics(app, **options)
        own_registry = None
    else:
        own_registry = CollectorRegistry(auto_describe=True)
        exporter = PrometheusMetrics(app, registry=own_registry, **options)
    exporter.info("faststock_info", "FastStock service", version="1")
    cache = app.extensions["faststock.metrics"] = Counter(
        "faststock_cache_requests",
        "Reads by endpoint and cache outcome (HIT, MISS, BYPASS)",
        ["endpoint", "result"],
        registry=own_registry,
    )
    app.extensions["faststock.lane_counts"] = LaneCounts(exporter.registry, cache)
