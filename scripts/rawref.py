"""The raw WSGI reference: the fastest answer gunicorn and gevent can give, for scripts/bench.

A WSGI callable that answers every request with the same 62-byte JSON body (product 42 of the
README without its `updated_at`), touching nothing: no Flask, no Redis, no PostgreSQL. scripts/bench
serves it with the service's own gunicorn.conf.py (same worker class, worker count, keep-alive,
backlog) and the same CPU pinning, so that `req/s of a scenario / req/s of this` is the share of
the stack's own limit that FastStock reaches, whatever the machine.

It lives beside benchkit.py rather than in faststock/ (it is not part of the service and must not
reach the Docker image) or in k6/ (which holds the load, not servers): scripts/bench runs it as
`gunicorn -c gunicorn.conf.py --pythonpath scripts rawref:app`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

BODY = b'{"id":42,"name":"Product 000042","price":"327.98","stock":224}'
HEADERS = [("Content-Type", "application/json"), ("Content-Length", str(len(BODY)))]


def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
    """Answer 200 with BODY, whatever the method, path or body of the request."""
    start_response("200 OK", HEADERS)
    return [BODY]
