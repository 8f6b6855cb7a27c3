"""FastStock: a product-and-stock API on PostgreSQL and Redis, built for gunicorn + gevent."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import click
from flask import Flask, Response, g, request

from .config import Config, ConfigError, from_env_or_exit
from .requestid import request_id

__all__ = ["Config", "ConfigError", "FastStock", "create_app"]

MAX_BODY_BYTES = 16 * 1024


def _request_id() -> None:
    g.request_id = request_id(request.environ.get("HTTP_X_REQUEST_ID"))


def _echo_request_id(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "")
    return response


class FastStock(Flask):
    """Flask, with each hook's and view's sync check made once.

    Flask runs `inspect.iscoroutinefunction` on every hook and view of every request (`ensure_sync`,
    which Flask documents as the method to override): six times a write, for functions that never
    change.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._synced: dict[Callable[..., Any], Callable[..., Any]] = {}

    def ensure_sync(self, func: Callable[..., Any]) -> Callable[..., Any]:
        try:
            synced = self._synced.get(func)
        except TypeError:  # an unhashable callable object: checked every time, as Flask does
            return super().ensure_sync(func)
        if synced is None:
            synced = self._synced[func] = super().ensure_sync(func)
        return synced


def create_app(config: Config | None = None) -> Flask:
    """Build the app; nothing connects to PostgreSQL or Redis until a request needs it.

    The modules are imported here, not at the top, so that gunicorn.conf.py can read `Config`
    in the master without importing redis-py and friends before gevent patches the workers.
    """
    from . import (
        auth,
        cache,
        db,
        errors,
        fastlane,
        hardening,
        health,
        logs,
        metrics,
        nearcache,
        openapi,
        outbox,
        products,
        ratelimit,
        replicas,
        seed,
        singleflight,
    )

    if config is None:
        # Under the `flask` command a bad setting ends it with the one line gunicorn prints, not
        # the traceback flask shows for an app that fails to load. Other callers get ConfigError.
        in_cli = click.get_current_context(silent=True) is not None
        config = from_env_or_exit() if in_cli else Config.from_env()
    app = FastStock(__name__)
    app.config["FASTSTOCK"] = config
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES

    logs.init_app(app)  # first: its access clock starts before any other before_request hook
    errors.init_app(app)
    db.init_app(app)
    # The breaker's opening wakes the keeper, which owns recovery from Redis failures.
    cache.init_app(app, on_outage=lambda: outbox.get_keeper(app).wake())
    nearcache.init_app(app, cache.get_cache(app))
    outbox.init_app(app)
    replicas.init_app(app)  # after the keeper, which it tells whether to keep the replay mark
    singleflight.init_app(app)
    metrics.init_app(app)
    seed.init_app(app)
    app.before_request(_request_id)
    app.after_request(_echo_request_id)
    auth.init_app(app)  # after the request id (a 401 carries it), before the rate limits
    app.register_blueprint(products.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    ratelimit.init_app(app)  # counts writes per key name; limits the products blueprint
    hardening.init_app(app)
    fastlane.init_app(app)  # last: it wraps the finished app's WSGI callable
    return app
