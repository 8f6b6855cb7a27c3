"""Logs as JSON lines on stderr, each carrying the id of the request it is about.

One record is one line holding one JSON object, a traceback included (as its `traceback` field),
so a log shipper needs no multi-line rules, and the `X-Request-ID` a client got finds every line
about its request: the access line, the pool's warning, the unhandled error. python-json-logger
does the formatting; this module decides the fields and where the request id comes from.

- `init_app(app)` gives the "faststock" logger tree its handler and level (the same for gunicorn
  workers, `flask` commands and the tests) and, with ACCESS_LOG=1, logs one line per request.
- `gunicorn_logconfig()` is gunicorn's `logconfig_dict`: gunicorn's own lines (start, workers,
  errors) and whatever a library logs come out in the same shape.
- `GunicornLogger` keeps gunicorn's access log off, which any `logconfig_dict` turns on.
"""

from __future__ import annotations

import logging
import sys
import time
from datetime import timedelta
from typing import Any, TextIO

from flask import Flask, Response, g, has_app_context, request
from flask.logging import default_handler
from gunicorn.glogging import Logger as _GunicornBaseLogger
from pythonjsonlogger.json import JsonFormatter

ACCESS_LOGGER = "faststock.access"
NO_REQUEST = "-"  # the request id of a line logged outside any request

# LogRecord attribute -> field name. Every line has these, `traceback` when there is one, and
# any `extra=` fields (the access line's) after them.
FIELDS = {
    "levelname": "level",
    "name": "logger",
    "message": "message",
    "request_id": "request_id",
    "process": "pid",
}

_access = logging.getLogger(ACCESS_LOGGER)


class RequestIdFilter(logging.Filter):
    """Stamp each record with a request id: the one passed as `extra={"request_id": ...}`, else
    the Flask request's (`g.request_id`), else "-". On the handler rather than a logger, so it
    sees records from every logger below it too. The fast lane has no Flask context: it passes
    the id explicitly."""

    def filter(self, record: logging.LogRecord) -> bool:
        if "request_id" not in record.__dict__:
            record.request_id = g.get("request_id", NO_REQUEST) if has_app_context() else NO_REQUEST
        return True


class JsonLinesFormatter(JsonFormatter):
    """One JSON object per record: FIELDS, an ISO 8601 UTC `time`, the exception as `traceback`.

    The standard library's encoder with ensure_ascii: a message quoting a client's lone UTF-16
    surrogate still encodes (orjson would refuse it and the line would be lost)."""

    def __init__(self) -> None:
        super().__init__(
            list(FIELDS),
            rename_fields={**FIELDS, "exc_info": "traceback"},
            timestamp="time",
            defaults={"time": None},  # a placeholder, so that the time (set last) comes first
        )


class StderrHandler(logging.StreamHandler):
    """JSON lines to whatever `sys.stderr` is when a record comes (as logging's own last-resort
    handler does): a handler holding the stream it was made with writes to a closed file once
    something swaps stderr, as pytest's capture does between tests."""

    def __init__(self) -> None:
        logging.Handler.__init__(self)
        self.setFormatter(JsonLinesFormatter())
        self.addFilter(RequestIdFilter())

    @property
    def stream(self) -> TextIO:  # type: ignore[override]
        return sys.stderr


def log_access(
    method: str,
    route: str | None,
    status: int,
    seconds: float,
    cache: str | None,
    request_id: str,
    *,
    fast_lane: bool,
) -> None:
    """The access line of one request. `route` is the route template (None when no route
    matched), never the path: ids would make every line unique to search and aggregate. Neither
    the query string nor the body is logged."""
    _access.info(
        "%s %s %s",
        method,
        route or "(no route)",
        status,
        extra={
            "method": method,
            "route": route,
            "status": status,
            "duration_ms": round(seconds * 1000, 3),
            "cache": cache,
            "request_id": request_id,
            "fast_lane": fast_lane,
        },
    )


def _start_clock() -> None:
    g.access_started = time.perf_counter()


def _log_flask_access(response: Response) -> Response:
    started = g.get("access_started")
    rule = request.url_rule
    log_access(
        request.method,
        rule.rule if rule is not None else None,
        response.status_code,
        time.perf_counter() - started if started is not None else 0.0,
        response.headers.get("X-Cache"),
        g.get("request_id", NO_REQUEST),
        fast_lane=False,
    )
    return response


def init_app(app: Flask) -> None:
    """Call first in create_app: the clock then starts before every other before_request hook,
    and the access line, logged by the after_request hook that runs last, sees the final
    response."""
    config = app.config["FASTSTOCK"]
    logger = logging.getLogger("faststock")  # the Flask app's logger too (its import name)
    logger.setLevel(config.log_level)
    logger.removeHandler(default_handler)  # Flask's plain-text one, if an earlier app added it
    if not any(isinstance(h, StderrHandler) for h in logger.handlers):
        logger.addHandler(StderrHandler())  # once per process, however many apps are made
    # ACCESS_LOG=1 asks for the access lines whatever LOG_LEVEL says.
    _access.setLevel(logging.INFO if config.access_log else logging.NOTSET)
    if config.access_log:
        app.before_request(_start_clock)
        app.after_request(_log_flask_access)


def gunicorn_logconfig() -> dict[str, Any]:
    """gunicorn's `logconfig_dict`: one JSON handler for gunicorn's loggers, the root logger
    (libraries, `py.warnings`) and "faststock". "faststock" does not propagate here, or its lines
    would come out twice; elsewhere it does, so pytest's caplog sees them. Levels are left to
    gunicorn's `loglevel` and to `init_app`."""
    own = ("gunicorn.error", "gunicorn.access", "faststock")
    return {
        "version": 1,
        "disable_existing_loggers": False,  # the loggers faststock made before gunicorn started
        "formatters": {},
        "handlers": {"json": {"()": StderrHandler}},
        "root": {"level": "WARNING", "handlers": ["json"]},
        "loggers": {name: {"handlers": ["json"], "propagate": False} for name in own},
    }


class GunicornLogger(_GunicornBaseLogger):
    """gunicorn's logger with its access log on only when asked for (`--access-logfile`).

    gunicorn turns its access log on whenever `logconfig_dict` is set, and then builds a dict of
    every request header and environ entry for each request, even with nothing to write it to:
    a real share of a cache hit. ACCESS_LOG=1 is the access log here (JSON, route templates)."""

    def setup(self, cfg: Any) -> None:
        super().setup(cfg)
        self._asked_for_access = cfg.accesslog is not None
        logging.captureWarnings(True)  # Python warnings as JSON lines too, through the root

    def access(self, resp: Any, req: Any, environ: dict[str, Any], request_time: timedelta) -> None:
        if self._asked_for_access:
            super().access(resp, req, environ, request_time)
