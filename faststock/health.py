"""Liveness and readiness for load balancers and orchestrators.

`/healthz` touches nothing, so a slow database never gets a healthy worker killed; `/readyz`
needs PostgreSQL (without it no write can succeed) and only reports the rest (Redis, which is
optional, and the answering worker's breaker, pool and last outbox count), from state the worker
already holds: one PostgreSQL round trip and at most one Redis ping.
"""

from __future__ import annotations

from typing import Any

import orjson
from flask import Blueprint, Response, request

from . import db, queries
from .cache import get_cache
from .errors import ApiError, json_error
from .outbox import get_keeper

bp = Blueprint("health", __name__)
HEALTHY = b'{"status":"ok"}'  # the fast lane (fastlane.py) answers /healthz with it too


def _ok(body: bytes) -> Response:
    return Response(body, mimetype="application/json")


@bp.get("/healthz")
def healthz() -> Response:
    # Polled every few seconds by every load balancer and orchestrator: timing it in the
    # request metrics cost more than the rest of the request and told nobody anything.
    request.prom_do_not_track = True
    return _ok(HEALTHY)


def _state() -> dict[str, Any]:
    """This worker's view of its dependencies; the pool is read before /readyz takes a
    connection of its own, so `in_use` counts other requests only."""
    cache = get_cache()
    breaker = cache.breaker
    pool = db.get_pool()
    return {
        "redis": "ok" if not breaker.is_open and cache.ping() else "unavailable",
        "breaker": {"state": "open" if breaker.is_open else "closed", "openings": breaker.openings},
        "pool": {"size": pool.size, "in_use": pool.in_use, "waiters": pool.waiters},
        "outbox": {"backlog": get_keeper().backlog},
    }


@bp.get("/readyz")
def readyz() -> Response:
    state = _state()
    try:
        with db.cursor() as cur:
            queries.ping(cur)
    except ApiError as exc:
        return json_error(
            503,
            "unavailable",
            f"PostgreSQL is not answering: {exc.message}",
            {"Retry-After": "1"},
            {"postgres": "unavailable", **state},
        )
    return _ok(orjson.dumps({"status": "ok", "postgres": "ok", **state}))
