"""Liveness and readiness for load balancers and orchestrators.

`/healthz` touches nothing, so a slow database never gets a healthy worker killed; `/readyz`
needs PostgreSQL (without it no write can succeed) and only reports Redis, which is optional.
"""

from __future__ import annotations

from flask import Blueprint, Response, request

from . import db, queries
from .cache import get_cache
from .errors import ApiError, json_error

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


@bp.get("/readyz")
def readyz() -> Response:
    cache = get_cache()
    redis_state = "ok" if not cache.breaker.is_open and cache.ping() else "unavailable"
    try:
        with db.cursor() as cur:
            queries.ping(cur)
    except ApiError as exc:
        return json_error(
            503,
            "unavailable",
            f"PostgreSQL is not answering: {exc.message}",
            {"Retry-After": "1"},
            {"postgres": "unavailable", "redis": redis_state},
        )
    return _ok(b'{"status":"ok","postgres":"ok","redis":"%s"}' % redis_state.encode())
