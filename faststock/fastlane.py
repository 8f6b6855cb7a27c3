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

from collections.abc import Callable, Iterable
from time import perf_counter
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
_PREFIX_LENGTH = len(PREFIX)
_DIGITS = frozenset("0123456789")
_HEALTHY_LENGTH = str(len(HEALTHY))
# List query strings whose parse is kept: at most this many, each at most this long (a client
# cycling through pages and limits stays within it; one sending junk only clears it).
_QUERIES_KEPT = 1024
_QUERY_KEPT_LENGTH = 64
# List bodies kept (about a kilobyte each at limit 10): the pages read over and over are few, and
# the near cache already holds each page's joined items.
_BODIES_KEPT = 1024

StartResponse = Callable[..., Any]
Found = tuple[bytes, str, str, str]  # (body, its Content-Length, route template, endpoint)


class FastLane:
    def __init__(self, app: Flask, wsgi_app: Callable[..., Iterable[bytes]]) -> None:
        self.wsgi_app = wsgi_app
        self.near: NearCache = get_near(app)
        self.counts: Tally = get_tally(app)
        self.access_log: bool = app.config["FASTSTOCK"].access_log  # read once, checked per hit
        # query string -> (page, limit), or False for one Flask must answer: the parse of the
        # same few query strings again and again cost a list hit a fifth of its own time
        self._queries: dict[str, tuple[int, int] | bool] = {}
        # (page, limit) -> (the joined items and next link it was built from, body, its length)
        self._bodies: dict[tuple[int, int], tuple[bytes, bool, bytes, str]] = {}

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ["PATH_INFO"]
        if path.startswith(PREFIX) and environ["REQUEST_METHOD"] == "GET":
            started = perf_counter()
            query = environ.get("QUERY_STRING", "")
            if len(path) == _PREFIX_LENGTH:
                found = self._page(query)
            elif path[_PREFIX_LENGTH] == "/" and not query:
                found = self._product(path[_PREFIX_LENGTH + 1 :])
            else:
                found = None
            if found is not None:
                body, length, route, endpoint = found
                rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
                start_response(
                    "200 OK",
                    [
                        ("Content-Type", "application/json"),
                        ("Content-Length", length),
                        ("X-Cache", "HIT"),
                        ("X-Request-ID", rid),
                    ],
                )
                self.counts.hit(route, endpoint, perf_counter() - started)
                if self.access_log:
                    seconds = perf_counter() - started
                    log_access("GET", route, 200, seconds, "HIT", rid, fast_lane=True)
                return [body]
        elif path == "/healthz" and environ["REQUEST_METHOD"] == "GET":
            # Liveness, polled by every balancer and orchestrator: it needs nothing from Flask.
            started = perf_counter()
            rid = request_id(environ.get("HTTP_X_REQUEST_ID"))
            start_response(
                "200 OK",
                [
                    ("Content-Type", "application/json"),
                    ("Content-Length", _HEALTHY_LENGTH),
                    ("X-Request-ID", rid),
                ],
            )
            if self.access_log:
                seconds = perf_counter() - started
                log_access("GET", "/healthz", 200, seconds, None, rid, fast_lane=True)
            return [HEALTHY]
        return self.wsgi_app(environ, start_response)

    def _product(self, raw: str) -> Found | None:
        """A product or its stock, when the near cache holds it current; `raw` follows the prefix
        and its slash."""
        stock = raw.endswith("/stock")
        if stock:
            raw = raw[:-6]
        try:
            product_id = parse_id(raw)
        except ApiError:
            return None
        entry = self.near.current(product_id)
        if entry is None:
            return None
        if stock:
            body = stock_body(product_id, entry[1])
            return body, str(len(body)), STOCK_ROUTE, "stock"
        return entry[0], entry[4], PRODUCT_ROUTE, "product"

    def _page(self, query: str) -> Found | None:
        """A list page, when the near cache holds it and all its products current."""
        parsed = self._queries.get(query)
        if parsed is None:
            parsed = _parse_list_query(query)
            if len(query) <= _QUERY_KEPT_LENGTH:
                if len(self._queries) >= _QUERIES_KEPT:
                    self._queries.clear()
                self._queries[query] = parsed
        if parsed is False:
            return None
        page, limit = parsed
        found = self.near.current_page(page, limit)
        if found is None:
            return None
        items, has_next = found
        # The page's body, kept while the near cache answers with the very same joined items
        # object and next link (the body is a function of those, the page and the limit): a
        # list hit then copies no kilobyte of JSON. The object, not equal bytes: held here, it
        # cannot be freed and its address reused by other items.
        kept = self._bodies.get((page, limit))
        if kept is not None and kept[0] is items and kept[1] is has_next:
            return kept[2], kept[3], LIST_ROUTE, "list"
        body = list_body(items, page, limit, has_next)
        length = str(len(body))
        if len(self._bodies) >= _BODIES_KEPT:
            self._bodies.clear()
        self._bodies[(page, limit)] = (items, has_next, body, length)
        return body, length, LIST_ROUTE, "list"


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


def _parse_list_query(query: str) -> tuple[int, int] | bool:
    """(page, limit) of a list query the lane can answer, or False: it is Flask's to answer
    (anything `_page_query` leaves to Flask, or values `parse_page` refuses)."""
    pages = _page_query(query)
    if pages is None:
        return False
    try:
        return parse_page(*pages)
    except ApiError:
        return False


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
