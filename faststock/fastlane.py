"""The fast lane: a WSGI middleware that answers near-cache hits before Flask sees the request.

A cached read through Flask spends most of its time in Flask's request machinery (context,
routing, hooks, the Response object); the lane answers a GET of a product, its stock or a list
page that this worker's near cache holds, provably current, with the same status, headers and
bytes the Flask views send, counts it in the same metrics and logs it in the same access log
(ACCESS_LOG=1). Anything it is not sure of (a miss, an id or query string it does not fully
understand, another method or path, the near cache standing aside) goes to Flask untouched. It
parses ids and pages with the views' own parsers, and builds bodies with their own functions, so
the two cannot disagree.

It also answers `/healthz` (the same bytes as the health view), which needs nothing from Flask.
`FAST_LANE=0` leaves it out, for debugging and for A/B benchmarks.

With READS_REQUIRE_KEY=1 the lane is `KeyedFastLane`: a read with a valid key is answered as
usual, any other goes to Flask, which answers 401 (the lane never refuses: Flask is the one place
errors are made). Reads that need no key pay nothing for it: the plain `FastLane` is used. With
READ_RATE_LIMIT set the lane stands aside: every read must be counted, in Redis, through Flask.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Any

from flask import Flask

from .auth import Keys, get_keys
from .errors import ApiError
from .health import HEALTHY
from .logs import log_access
from .metrics import Tally, get_tally
from .nearcache import NearCache, get_near
from .products import list_body, stock_body
from .requestid import request_id
from .validation import parse_id, parse_page

PREFIX = "/api/products"
PRODUCT_ROUTE = "/api/products/<raw_id>"
STOCK_ROUTE = "/api/products/<raw_id>/stock"
LIST_ROUTE = "/api/products"
_DIGITS = frozenset("0123456789")

StartResponse = Callable[..., Any]


class FastLane:
    def __init__(self, app: Flask, wsgi_app: Callable[..., Iterable[bytes]]) -> None:
        self.wsgi_app = wsgi_app
        self.near: NearCache = get_near(app)
        self.counts: Tally = get_tally(app)
        self.access_log: bool = app.config["FASTSTOCK"].access_log  # read once, checked per hit

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path.startswith(PREFIX) and environ["REQUEST_METHOD"] == "GET" and self.near.usable():
            started = time.perf_counter()
            found = self._lookup(path, environ.get("QUERY_STRING", ""))
            if found is not None:
                body, route, endpoint = found
                rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
                start_response(
                    "200 OK",
                    [
                        ("Content-Type", "application/json"),
                        ("Content-Length", str(len(body))),
                        ("X-Cache", "HIT"),
                        ("X-Request-ID", rid),
                    ],
                )
                self.counts.hit(route, endpoint, time.perf_counter() - started)
                if self.access_log:
                    seconds = time.perf_counter() - started
                    log_access("GET", route, 200, seconds, "HIT", rid, fast_lane=True)
                return [body]
        elif path == "/healthz" and environ["REQUEST_METHOD"] == "GET":
            # Liveness, polled by every balancer and orchestrator: it needs nothing from Flask.
            started = time.perf_counter()
            rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
            start_response(
                "200 OK",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", str(len(HEALTHY))),
                    ("X-Request-ID", rid),
                ],
            )
            if self.access_log:
                seconds = time.perf_counter() - started
                log_access("GET", "/healthz", 200, seconds, None, rid, fast_lane=True)
            return [HEALTHY]
        return self.wsgi_app(environ, start_response)

    def _lookup(self, path: str, query: str) -> tuple[bytes, str, str] | None:
        """(body, route, endpoint) when the near cache can answer, else None (Flask will)."""
        near = self.near
        if path == PREFIX:
            pages = _page_query(query)
            if pages is None:
                return None
            try:
                page, limit = parse_page(*pages)
            except ApiError:
                return None
            found = near.page_items(page, limit)
            if found is None:
                return None
            return list_body(found[0], page, limit, found[1]), LIST_ROUTE, "list"
        if query or path[len(PREFIX)] != "/":
            return None
        raw = path[len(PREFIX) + 1 :]
        stock = raw.endswith("/stock")
        if stock:
            raw = raw[:-6]
        try:
            product_id = parse_id(raw)
        except ApiError:
            return None
        hit = near.product(product_id)
        if hit is None:
            return None
        if stock:
            return stock_body(product_id, hit[1]), STOCK_ROUTE, "stock"
        return hit[0], PRODUCT_ROUTE, "product"


class KeyedFastLane(FastLane):
    """The lane for READS_REQUIRE_KEY=1: API paths without a valid key go straight to Flask."""

    def __init__(self, app: Flask, wsgi_app: Callable[..., Iterable[bytes]]) -> None:
        super().__init__(app, wsgi_app)
        self.keys: Keys = get_keys(app)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        if environ["PATH_INFO"].startswith(PREFIX) and (
            self.keys.name_of(environ.get("HTTP_AUTHORIZATION")) is None
        ):
            return self.wsgi_app(environ, start_response)
        return super().__call__(environ, start_response)


def _page_query(query: str) -> tuple[str | None, str | None] | None:
    """(page, limit) raw values from the simplest query strings only: `page=D` and `limit=D`,
    each at most once, digits only. Anything else (encodings, repeats, other names, empty
    parts) is left to Flask's parser, which is the reference."""
    if not query:
        return None, None
    values: dict[str, str] = {}
    for part in query.split("&"):
        name, sep, value = part.partition("=")
        if (
            not sep
            or name not in ("page", "limit")
            or name in values
            or not value
            or not _DIGITS.issuperset(value)
        ):
            return None
        values[name] = value
    return values.get("page"), values.get("limit")


def init_app(app: Flask) -> None:
    """Last in create_app (it wraps the finished WSGI callable); after auth (the keys)."""
    config = app.config["FASTSTOCK"]
    if config.fast_lane and get_near(app).enabled and not config.read_rate_limit:
        lane = KeyedFastLane if config.reads_require_key else FastLane
        app.wsgi_app = lane(app, app.wsgi_app)  # type: ignore[method-assign]
