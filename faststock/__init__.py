"""FastStock: a product-and-stock API on PostgreSQL and Redis, built for gunicorn + gevent."""

from __future__ import annotations

import logging
import uuid

from flask import Flask, Response, g, request

from .config import Config, ConfigError

__all__ = ["Config", "ConfigError", "create_app"]

MAX_BODY_BYTES = 16 * 1024


def _request_id() -> None:
    incoming = request.headers.get("X-Request-ID", "")
    ok = 0 < len(incoming) <= 128 and incoming.isascii() and incoming.isprintable()
    g.request_id = incoming if ok else uuid.uuid4().hex


def _echo_request_id(response: Response) -> Response:
    response.headers["X-Request-ID"] = g.get("request_id", "")
    return response


def create_app(config: Config | None = None) -> Flask:
    """Build the app; nothing connects to PostgreSQL or Redis until a request needs it.

    The modules are imported here, not at the top, so that gunicorn.conf.py can read `Config`
    in the master without importing redis-py and friends before gevent patches the workers.
    """
    from . import cache, db, errors, health, metrics, openapi, outbox, products, seed

    config = config or Config.from_env()
    app = Flask(__name__)
    app.config["FASTSTOCK"] = config
    app.config["MAX_CONTENT_LENGTH"] = MAX_BODY_BYTES
    logging.getLogger("faststock").setLevel(config.log_level)

    errors.init_app(app)
    db.init_app(app)
    cache.init_app(app)
    outbox.init_app(app)
    metrics.init_app(app)
    seed.init_app(app)
    app.before_request(_request_id)
    app.after_request(_echo_request_id)
    app.register_blueprint(products.bp)
    app.register_blueprint(health.bp)
    app.register_blueprint(openapi.bp)
    return app
