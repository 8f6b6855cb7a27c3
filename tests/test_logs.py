"""JSON log lines: the fields, the request id on each, the access log, tracebacks kept inside."""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from datetime import datetime, timedelta

import pytest
import requests
from flask import Flask, g
from flask.logging import default_handler

from faststock import logs
from faststock.config import Config
from faststock.fastlane import FastLane
from faststock.nearcache import get_near
from tests.servers import get, poll

BASE_FIELDS = {"time", "level", "logger", "message", "request_id", "pid"}
ACCESS_FIELDS = BASE_FIELDS | {"method", "route", "status", "duration_ms", "cache", "fast_lane"}


def make_record(msg: str = "hello %s", args: tuple = ("world",), **extra: object):
    record = logging.LogRecord("faststock.test", logging.WARNING, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def format_line(record: logging.LogRecord) -> dict:
    """The line StderrHandler writes for `record`, parsed; it must be a single line."""
    handler = logs.StderrHandler()
    assert handler.filter(record)
    text = handler.format(record)
    assert "\n" not in text
    return json.loads(text)


def parse_lines(text: str) -> list[dict]:
    """Every non-empty line of `text` as a JSON object: fails on the first one that is not."""
    lines = []
    for line in text.splitlines():
        if line.strip():
            try:
                parsed = json.loads(line)
            except ValueError:
                pytest.fail(f"not a JSON line: {line!r}")
            assert isinstance(parsed, dict), line
            lines.append(parsed)
    return lines


def written(server) -> str:
    """The server's log up to its last complete line (workers may be writing one right now)."""
    log = server.log()
    return log[: log.rfind("\n") + 1]


def access_lines(text: str) -> dict[str, dict]:
    """The access lines of `text`, by request id."""
    found = {}
    for line in parse_lines(text):
        if line["logger"] == logs.ACCESS_LOGGER:
            assert line["request_id"] not in found, f"two access lines for {line}"
            found[line["request_id"]] = line
    return found


# ---- the formatter and the filter ----


def test_a_record_is_one_json_line_with_the_fields():
    line = format_line(make_record())
    assert set(line) == BASE_FIELDS
    assert next(iter(line)) == "time"
    logged = datetime.fromisoformat(line["time"])
    assert logged.utcoffset() == timedelta(0)
    assert abs(logged.timestamp() - time.time()) < 60
    assert (line["level"], line["logger"], line["message"]) == (
        "WARNING",
        "faststock.test",
        "hello world",
    )
    assert (line["request_id"], line["pid"]) == ("-", os.getpid())


def test_an_exception_is_a_traceback_field_on_the_same_line():
    record = make_record()
    try:
        raise ValueError("bad thing")
    except ValueError:
        record.exc_info = sys.exc_info()
    line = format_line(record)
    assert line["traceback"].startswith("Traceback (most recent call last)")
    assert line["traceback"].endswith("ValueError: bad thing")


def test_the_request_id_comes_from_the_flask_request_or_is_passed():
    app = Flask("bare")
    with app.test_request_context():
        g.request_id = "req-in-g"
        assert format_line(make_record())["request_id"] == "req-in-g"
        assert format_line(make_record(request_id="passed"))["request_id"] == "passed"
    with app.app_context():  # a CLI command: an app, no request
        assert format_line(make_record())["request_id"] == "-"


def test_a_message_quoting_a_lone_surrogate_still_makes_a_line():
    assert format_line(make_record("id %s", ("\ud800",)))["message"] == "id \ud800"


def test_init_app_gives_the_faststock_logger_one_handler_however_many_apps():
    logger = logging.getLogger("faststock")
    level = logger.level
    logger.addHandler(default_handler)  # as Flask does for an app whose logger has no handler
    try:
        for name in ("ERROR", "DEBUG"):
            app = Flask("bare")
            app.config["FASTSTOCK"] = Config(log_level=name)
            logs.init_app(app)
        assert [type(h) for h in logger.handlers] == [logs.StderrHandler]
        assert logger.level == logging.DEBUG
    finally:
        logger.setLevel(level)


# ---- the access log, in-process ----


@pytest.fixture
def flask_only(make_app):
    """An app whose every request goes through Flask (no fast lane), access log on."""
    return make_app(access_log=True, fast_lane=False).test_client()


def test_access_lines_have_the_route_template_status_and_cache(flask_only, capsys):
    made = {  # request id: method, path, route template, status
        "a-miss": ("GET", "/api/products/1", "/api/products/<raw_id>", 200),
        "a-hit": ("GET", "/api/products/1", "/api/products/<raw_id>", 200),
        "a-stock": ("GET", "/api/products/2/stock", "/api/products/<raw_id>/stock", 200),
        "a-list": ("GET", "/api/products?page=2&limit=3", "/api/products", 200),
        "a-bad-id": ("GET", "/api/products/zzz", "/api/products/<raw_id>", 400),
        "a-no-route": ("GET", "/nope/17", None, 404),
        "a-method": ("DELETE", "/api/products/1", None, 405),
    }
    answers = {
        request_id: flask_only.open(path, method=method, headers={"X-Request-ID": request_id})
        for request_id, (method, path, _, _) in made.items()
    }
    err = capsys.readouterr().err
    found = access_lines(err)
    for request_id, (method, _, route, status) in made.items():
        line = found[request_id]
        assert set(line) == ACCESS_FIELDS, line
        assert (line["method"], line["route"], line["status"]) == (method, route, status), line
        assert line["cache"] == answers[request_id].headers.get("X-Cache"), line
        assert line["fast_lane"] is False
        assert line["level"] == "INFO"
        assert isinstance(line["duration_ms"], float) and 0 <= line["duration_ms"] < 10_000
    assert (found["a-miss"]["cache"], found["a-hit"]["cache"]) == ("MISS", "HIT")
    assert found["a-bad-id"]["cache"] is None
    assert "page=2" not in err and "/nope/17" not in err


def test_a_request_body_is_never_logged(flask_only, capsys):
    response = flask_only.post(
        "/api/products/3/update-stock",
        json={"delta": 1, "note": "BODY-MARKER-51"},
        headers={"X-Request-ID": "a-body"},
    )
    assert response.status_code == 400
    err = capsys.readouterr().err
    assert access_lines(err)["a-body"]["route"] == "/api/products/<raw_id>/update-stock"
    assert "BODY-MARKER-51" not in err


def test_no_access_lines_by_default(make_app, capsys):
    client = make_app().test_client()
    assert client.get("/api/products/1").status_code == 200
    assert client.get("/healthz").status_code == 200
    assert access_lines(capsys.readouterr().err) == {}


def test_fast_lane_hits_log_with_their_request_id(make_app, capsys):
    app = make_app(access_log=True)
    get_near(app).heartbeat()  # a gunicorn worker's keeper does this every second
    assert isinstance(app.wsgi_app, FastLane)
    client = app.test_client()
    for _ in range(3):
        client.get("/api/products/7")
    hit = client.get("/api/products/7", headers={"X-Request-ID": "lane-hit"})
    assert hit.headers["X-Cache"] == "HIT"
    client.get("/healthz", headers={"X-Request-ID": "lane-health"})
    found = access_lines(capsys.readouterr().err)
    assert found["lane-hit"]["fast_lane"] is True, "the fast lane did not answer (or log) it"
    assert set(found["lane-hit"]) == ACCESS_FIELDS
    assert {k: found["lane-hit"][k] for k in ("method", "route", "status", "cache")} == {
        "method": "GET",
        "route": "/api/products/<raw_id>",
        "status": 200,
        "cache": "HIT",
    }
    assert (found["lane-health"]["route"], found["lane-health"]["fast_lane"]) == ("/healthz", True)


def test_an_unhandled_error_logs_its_traceback_under_the_request_id(make_app, capsys):
    app = make_app(access_log=True)

    @app.get("/boom")
    def boom():
        raise RuntimeError("secret detail")

    response = app.test_client().get("/boom", headers={"X-Request-ID": "req-500"})
    assert response.status_code == 500
    assert response.get_json() == {"error": "internal", "message": "internal server error"}
    body = response.get_data(as_text=True)
    assert "Traceback" not in body and "secret" not in body
    logged = parse_lines(capsys.readouterr().err)
    lines = [line for line in logged if line["request_id"] == "req-500"]
    errors = [line for line in lines if line["level"] == "ERROR"]
    assert len(errors) == 1, lines
    assert errors[0]["traceback"].startswith("Traceback (most recent call last)")
    assert "RuntimeError: secret detail" in errors[0]["traceback"]
    access = [(line["route"], line["status"]) for line in lines if "route" in line]
    assert access == [("/boom", 500)]


# ---- a real gunicorn ----


def test_gunicorn_writes_only_json_lines_and_logs_both_paths(live_server):
    server = live_server(ACCESS_LOG="1", LOG_LEVEL="INFO")  # two gevent workers
    answered: dict[str, requests.Response] = {}

    def fetch(path: str) -> requests.Response:
        response = get(server, path)
        answered[response.headers["X-Request-ID"]] = response
        return response

    def lane_hit() -> str | None:
        """Read product 1 until a worker's fast lane answers it: the id of that read."""
        request_id = fetch("/api/products/1").headers["X-Request-ID"]
        line = access_lines(written(server)).get(request_id)
        return request_id if line and line["fast_lane"] else None

    first = fetch("/api/products/1")
    assert first.headers["X-Cache"] == "MISS"
    hit_id = poll(lane_hit, within=15)
    assert hit_id, "no read was answered by a fast lane"
    fetch("/api/products?page=2&limit=3")
    fetch("/nope")
    server.stop()  # its shutdown lines are checked too

    log = server.log()
    lines = parse_lines(log)
    assert all(set(line) >= BASE_FIELDS for line in lines)
    gunicorn_lines = [line for line in lines if line["logger"] == "gunicorn.error"]
    assert any(line["message"].startswith("Booting worker") for line in gunicorn_lines), log
    assert all(line["request_id"] == "-" for line in gunicorn_lines)
    assert not [line for line in lines if line["logger"] == "gunicorn.access"]
    found = access_lines(log)
    probes = {rid: line for rid, line in found.items() if line["route"] == "/healthz"}
    assert probes, "the start-up probes of /healthz were not logged"
    assert all(line["fast_lane"] for line in probes.values())
    assert set(found) - set(probes) == set(answered)
    for request_id, response in answered.items():
        line = found[request_id]
        assert set(line) == ACCESS_FIELDS
        assert (line["status"], line["cache"]) == (
            response.status_code,
            response.headers.get("X-Cache"),
        )
    assert found[first.headers["X-Request-ID"]]["fast_lane"] is False
    assert found[hit_id]["route"] == "/api/products/<raw_id>"
    routes = {found[request_id]["route"] for request_id in answered}
    assert routes == {"/api/products/<raw_id>", "/api/products", None}


def test_a_503_is_found_in_the_log_by_the_request_id_the_client_got(live_server, private_pg):
    server = live_server(DATABASE_URL=private_pg.url, DB_POOL_TIMEOUT="1", ACCESS_LOG="1")
    private_pg.stop()
    response = get(server, "/api/products/50")
    assert response.status_code == 503
    request_id = response.headers["X-Request-ID"]

    def lines_of_the_request() -> list[dict] | None:
        lines = [line for line in parse_lines(written(server)) if line["request_id"] == request_id]
        return lines if len(lines) >= 2 else None  # the access line and the reason for the 503

    lines = poll(lines_of_the_request, within=5)
    assert lines, server.log()
    access = [line for line in lines if line["logger"] == logs.ACCESS_LOGGER]
    assert [(line["route"], line["status"]) for line in access] == [("/api/products/<raw_id>", 503)]
    why = [line for line in lines if line["logger"] == "faststock.db"]
    assert why and why[0]["level"] == "WARNING" and "PostgreSQL" in why[0]["message"], lines
