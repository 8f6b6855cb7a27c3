"""Prometheus metrics: per-route latency and status from prometheus-flask-exporter, plus ours.

Requests are labelled by route template (`/api/products/<raw_id>`), never by raw path, so a
scan of random ids cannot explode the number of series. Under gunicorn every worker writes to
`PROMETHEUS_MULTIPROC_DIR` (gunicorn.conf.py sets it) and any worker's `/metrics` reports the sum
of all of them; a worker that exits is marked dead from gunicorn's `child_exit` hook.
"""

from __future__ import annotations

import os

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
    app.extensions["faststock.metrics"] = Counter(
        "faststock_cache_requests",
        "Reads by endpoint and cache outcome (HIT, MISS, BYPASS)",
        ["endpoint", "result"],
        registry=own_registry,
    )
