"""Rate limits (Flask-Limiter): WRITE_RATE_LIMIT per API key name, or per client address for
anonymous writes; READ_RATE_LIMIT per client address.

The counters live in Redis, so every worker of every host draws on the same allowance: 100/second
is 100 a second for a client, however many instances answer it. Fixed windows (one INCR with an
expiry per request, and two reads for the headers): a window starts at a client's first request
and the count resets when it ends.

Redis down: Flask-Limiter's in-memory fallback. The first request that meets the failure marks
the storage dead and is counted in the worker's own memory, as are the requests after it, until a
ping finds Redis back (tried after 1, 2, 4, ... 32 s). Requests are never failed by the limiter
and never go unlimited, but while Redis is down each worker counts alone, so a client may get up
to the limit from each worker. The limiter's Redis calls go through the cache's connection pool
(cache.py), with its short timeouts (REDIS_TIMEOUT_MS) and, under Sentinel, to the current master.

Over the limit: 429 `rate_limited` with `Retry-After` (seconds), and on every limited answer
Flask-Limiter's headers: `X-RateLimit-Limit`, `X-RateLimit-Remaining` and `X-RateLimit-Reset` (the
Unix time the window ends), and the same under the IETF draft's names, `RateLimit-Limit`,
`RateLimit-Remaining` and `RateLimit-Reset` (seconds to the window's end).

With no limit set there is no limiter at all; with one, Flask-Limiter's hooks run only for the
requests a limit applies to (`_gate`), so a write limit costs reads nothing: on every other
request they would cost some 20 µs of CPU, a tenth of a read through Flask.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from contextlib import suppress
from contextvars import ContextVar
from typing import Any

from flask import Flask, Response, request
from flask_limiter import Limiter, RateLimitExceeded
from werkzeug.datastructures import Headers

from . import auth
from .cache import get_cache
from .config import Config
from .errors import json_error

READS = frozenset({"GET", "HEAD"})
log = logging.getLogger("faststock.ratelimit")


Hook = Callable[..., Any]


def _gate(app: Flask, limiter: Limiter, methods: frozenset[str]) -> None:
    """`limiter.init_app(app)`, with the before_request, after_request and teardown hooks it
    adds run only for the API's requests of `methods`: the hooks are taken out of the app's
    lists (whatever they are called) and registered again behind one check each."""
    lists = (app.before_request_funcs, app.after_request_funcs, app.teardown_request_funcs)
    known = [list(hooks.get(None, ())) for hooks in lists]
    limiter.init_app(app)
    added: list[list[Hook]] = []
    for hooks, before in zip(lists, known, strict=True):
        now = hooks.get(None, [])
        added.append([hook for hook in now if hook not in before])
        hooks[None] = before
    checks, responses, teardowns = added
    # Whether this request is limited: a context variable (per thread, per greenlet) rather
    # than `g`, read on every request at the cost of a dict lookup instead of a proxy's.
    limited: ContextVar[bool] = ContextVar("faststock_rate_limited", default=False)

    def check() -> None:
        if request.method in methods and request.blueprint == "products":
            limited.set(True)
            for hook in checks:
                _twice(hook)

    def respond(response: Response) -> Response:
        if limited.get():
            kept = response.headers.get("Retry-After")
            for hook in responses:
                response = _twice(hook, response) or response
            _draft_headers(response.headers)
            if response.status_code != 429:
                # Flask-Limiter puts the window's end in Retry-After on every answer, a 503's
                # own one second included; it means that only on a 429.
                if kept is None:
                    response.headers.pop("Retry-After", None)
                else:
                    response.headers["Retry-After"] = kept
        return response

    def tear_down(error: BaseException | None) -> None:
        if limited.get():
            limited.set(False)  # a kept-alive connection's next request runs in this context
            for hook in teardowns:
                hook(error)

    app.before_request(check)
    app.after_request(respond)
    app.teardown_request(tear_down)


def _draft_headers(headers: Headers) -> None:
    """Flask-Limiter's X-RateLimit-* fields, repeated under the IETF draft's names
    (draft-ietf-httpapi-ratelimit-headers, `RateLimit-Limit`, `RateLimit-Remaining` and
    `RateLimit-Reset`, the last in seconds from now), for clients that read either."""
    limit = headers.get("X-RateLimit-Limit")
    if limit is None:
        return
    headers["RateLimit-Limit"] = limit
    headers["RateLimit-Remaining"] = headers.get("X-RateLimit-Remaining", "0")
    reset = headers.get("X-RateLimit-Reset")
    if reset is not None:
        with suppress(ValueError):  # not a time: left out rather than guessed
            # Whole seconds as Flask-Limiter counts its Retry-After, so the two agree on a 429.
            headers["RateLimit-Reset"] = str(max(0, int(float(reset) - time.time())))


def _twice(hook: Hook, *args: Any) -> Any:
    """Run a Flask-Limiter hook; if Redis fails under it, run it again, in memory by then.

    Flask-Limiter switches to its in-memory fallback when Redis fails under a request, and
    counts that request in memory. But under gevent many requests wait on Redis at once, and
    those whose call fails after another has switched would be let through uncounted (or, not
    swallowed, fail): each is counted again here instead, now in memory. A second failure is
    logged and the request served: the limiter must never fail a request.
    """
    try:
        return hook(*args)
    except RateLimitExceeded:
        raise
    except Exception:
        try:
            return hook(*args)
        except RateLimitExceeded:
            raise
        except Exception:
            log.exception("rate limiting failed; the request goes on unlimited")
            return None


def address_key() -> str:
    """The client address: the peer's, or X-Forwarded-For's from a trusted proxy (hardening.py
    puts it in REMOTE_ADDR)."""
    return f"addr:{request.remote_addr}"


def writer_key() -> str:
    """The API key's name, else (anonymous) the client address. Names, never keys: this ends
    up in Redis key names and in Flask-Limiter's log line."""
    name = auth.client()
    return f"key:{name}" if name else address_key()


def _too_many(error: RateLimitExceeded) -> Response:
    """The 429 in the API's shape; Flask-Limiter's after_request hook adds Retry-After and the
    X-RateLimit-* headers, as on every limited answer."""
    message = f"rate limit exceeded ({error.description}); retry after Retry-After seconds"
    return json_error(429, "rate_limited", message)


def init_app(app: Flask) -> None:
    """After auth (writes are counted per key name) and the request id hook (a 429 carries the
    id); the products blueprint must be registered already."""
    config: Config = app.config["FASTSTOCK"]
    app.extensions["faststock.limiter"] = None
    if not (config.write_rate_limit or config.read_rate_limit):
        return
    methods = (auth.WRITE_METHODS if config.write_rate_limit else frozenset()) | (
        READS if config.read_rate_limit else frozenset()
    )
    limiter = Limiter(
        key_func=address_key,
        # The scheme picks limits' Redis storage; the connections come from the cache's pool.
        storage_uri="redis://",
        storage_options={"connection_pool": get_cache(app).pool},
        strategy="fixed-window",
        key_prefix="faststock",
        headers_enabled=True,
        retry_after="delta-seconds",
        in_memory_fallback_enabled=True,
        # Errors reach `_twice`, which counts the request again in memory rather than let it
        # through: a limiter must neither fail requests nor stop limiting.
        swallow_errors=False,
    )
    _gate(app, limiter, methods)
    api = app.blueprints["products"]
    if config.write_rate_limit:
        writes = sorted(auth.WRITE_METHODS)
        limiter.shared_limit(config.write_rate_limit, "write", key_func=writer_key, methods=writes)(
            api
        )
    if config.read_rate_limit:
        limiter.shared_limit(
            config.read_rate_limit, "read", key_func=address_key, methods=sorted(READS)
        )(api)
    app.register_error_handler(RateLimitExceeded, _too_many)
    app.extensions["faststock.limiter"] = limiter
