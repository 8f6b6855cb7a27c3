"""The fast lane answers exactly as the Flask views would, and only what it can prove current."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import requests

from faststock.fastlane import FastLane
from faststock.metrics import get_tally
from faststock.nearcache import get_near
from tests.servers import poll

REQUEST_ID = {"X-Request-ID": "table-test-1"}

TABLE = [
    "/api/products/1",
    "/api/products/100",
    "/api/products/0042",
    "/api/products/42/stock",
    "/api/products/0",
    "/api/products/-1",
    "/api/products/abc",
    "/api/products/1.5",
    "/api/products/%31",
    "/api/products/%EF%BC%91",  # a full-width digit one
    "/api/products/9999",
    "/api/products/9223372036854775807",
    "/api/products/9223372036854775808",
    "/api/products/" + "9" * 40,
    "/api/products/1/",
    "/api/products/1/stock/",
    "/api/products/1/stocks",
    "/api/products/1?x=1",
    "/api/products/1/stock?verbose=1",
    "/api/products",
    "/api/products/",
    "/api/products?page=2",
    "/api/products?limit=5",
    "/api/products?page=2&limit=5",
    "/api/products?limit=5&page=2",
    "/api/products?page=02&limit=005",
    "/api/products?page=11&limit=10",
    "/api/products?page=1&page=2",
    "/api/products?page=0",
    "/api/products?limit=101",
    "/api/products?limit=0",
    "/api/products?page=1&x=1",
    "/api/products?page=1&",
    "/api/products?&page=1",
    "/api/products?page=%31",
    "/api/products?page=+1",
    "/api/products?page=1;limit=2",
    "/api/products?PAGE=1",
    "/api/products?page",
    "/api/products?page=",
    "/api/products?page=92233720368547759",
    "/api/products?page=92233720368547760",
    "/api/productsx",
    "/healthz",
    "/healthz?x=1",
    "/healthz/",
]


def answer(server, path: str, headers: dict | None = None) -> tuple[int, dict, bytes]:
    response = requests.get(
        server.url(path), headers={"Connection": "close", **(headers or {})}, timeout=10
    )
    kept = {k: v for k, v in response.headers.items() if k not in ("Date", "Server")}
    return response.status_code, kept, response.content


@pytest.fixture
def lane_and_flask(live_server):
    """One worker each, on the same database and Redis: the fast lane on, and off."""
    return live_server(WEB_CONCURRENCY="1"), live_server(WEB_CONCURRENCY="1", FAST_LANE="0")


def warm(server, path: str) -> None:
    """Load `path` into the worker's near cache: a page's products join it from its 2nd read."""
    for _ in range(3):
        answer(server, path)


def test_the_lane_and_flask_give_the_same_status_headers_and_bytes(lane_and_flask):
    lane, flask_only = lane_and_flask
    for path in TABLE:
        warm(lane, path)
        warm(flask_only, path)
    for path in TABLE:
        for headers in (REQUEST_ID, {}):
            got = answer(lane, path, headers)
            want = answer(flask_only, path, headers)
            if not headers:  # a fresh id each time: same shape, not the same value
                for _, kept, _ in (got, want):
                    assert re.fullmatch(r"[0-9a-f]{32}", kept.pop("X-Request-ID")), path
            assert got == want, path


def test_the_lane_answers_hits_and_leaves_the_rest_to_flask(make_app, fresh):
    app = make_app()
    near = get_near(app)
    near.heartbeat()  # a gunicorn worker's keeper does this every second
    assert near.usable()
    assert isinstance(app.wsgi_app, FastLane)
    client = app.test_client()
    counts = get_tally(app)
    for path in ("/api/products/7", "/api/products?page=3&limit=4"):
        for _ in range(3):
            assert client.get(path).status_code == 200
    counts.flush()
    answered: list[str] = []
    real_hit = counts.hit
    counts.hit = lambda route, endpoint, seconds: (
        answered.append(endpoint),
        real_hit(route, endpoint, seconds),
    )
    client.get("/api/products/7")
    client.get("/api/products/7/stock")
    client.get("/api/products?page=3&limit=4")
    client.get("/api/products?limit=4&page=3")
    client.get("/api/products/8")  # not cached: Flask
    client.get("/api/products/7?x=1")  # a query the lane does not read: Flask
    client.head("/api/products/7")  # not a GET: Flask
    assert answered == ["product", "stock", "list", "list"]


def lane_answers(app, path: str) -> list[str]:
    """The endpoints the lane answered while `path` was read once."""
    counts = get_tally(app)
    answered: list[str] = []
    real_hit = counts.hit
    counts.hit = lambda route, endpoint, seconds: (
        answered.append(endpoint),
        real_hit(route, endpoint, seconds),
    )
    try:
        app.test_client().get(path)
    finally:
        counts.hit = real_hit
    return answered


def warmed(make_app, path: str):
    """An app, and its test client, whose near cache holds `path`."""
    app = make_app()
    get_near(app).heartbeat()  # a gunicorn worker's keeper does this every second
    client = app.test_client()
    for _ in range(3):  # a page's products join the near cache from its second read
        client.get(path)
    return app, client


def test_a_list_hit_follows_a_change_of_a_product_on_the_page(make_app, fresh):
    path = "/api/products?page=2&limit=3"
    app, client = warmed(make_app, path)
    before = client.get(path).get_json()
    assert lane_answers(app, path) == ["list"]
    product_id = before["items"][1]["id"]
    assert (
        client.post(f"/api/products/{product_id}/update-stock", json={"delta": 5}).status_code
        == 200
    )
    for _ in range(3):  # the page's products come back into the near cache
        after = client.get(path).get_json()
    assert lane_answers(app, path) == ["list"]
    assert after["items"][1]["stock"] == before["items"][1]["stock"] + 5
    assert client.get(path).get_json() == after


def test_a_list_hit_follows_a_new_next_link_of_the_same_items(make_app, fresh):
    """A one-item page's joined items are its product's own bytes, the same object when the page
    is listed again: a body kept by the items alone would keep the old next link."""
    last = "/api/products?page=100&limit=1"
    app, client = warmed(make_app, last)
    near = get_near(app)
    assert lane_answers(app, last) == ["list"]
    assert client.get(last).get_json()["next_page"] is None
    ids, _ = near.page(100, 1)
    near.put_page(100, 1, ids, True, near.generation)  # as if a product 101 had been listed since
    assert lane_answers(app, last) == ["list"]
    assert client.get(last).get_json()["next_page"] == 101


def test_list_queries_parsed_once_answer_alike_and_stay_bounded(make_app, fresh):
    app, client = warmed(make_app, "/api/products?page=3&limit=4")
    lane = app.wsgi_app
    for _ in range(2):  # the second time from the kept parse
        assert lane_answers(app, "/api/products?page=3&limit=4") == ["list"]
        refused = client.get("/api/products?page=0")
        assert refused.status_code == 400
        assert refused.get_json()["error"] == "bad_request"
        assert lane_answers(app, "/api/products?page=1&page=2") == []
    assert lane._queries["page=0"] is False
    for page in range(1, 3000):
        client.get(f"/api/products?page={page}&limit=7")
    client.get("/api/products?page=1&limit=1" + "&" * 80)
    assert 0 < len(lane._queries) <= 1024
    assert all(len(query) <= 64 for query in lane._queries)
    for page in range(2, 1100):  # empty pages past the end, each answered by the lane once
        for _ in range(3):
            client.get(f"/api/products?page={page}&limit=100")
    assert 0 < len(lane._bodies) <= 1024


def test_fast_lane_0_leaves_it_out(make_app):
    assert not isinstance(make_app(fast_lane=False).wsgi_app, FastLane)
    assert not isinstance(make_app(near_cache_size=0).wsgi_app, FastLane)


def test_counters_grow_by_exactly_the_requests_whichever_path_served_them(live_server):
    server = live_server(WEB_CONCURRENCY="2")

    def total(text: str, pattern: str) -> float:
        return sum(float(v) for v in re.findall(pattern, text))

    def counted() -> tuple[float, float, float, float]:
        text = requests.get(server.url("/metrics"), headers={"Connection": "close"}).text
        durations = total(
            text,
            r'flask_http_request_duration_seconds_count\{method="GET",'
            r'route="/api/products[^"]*",status="200"\} (\S+)',
        )
        requests_total = total(text, r'flask_http_request_total\{method="GET",status="200"\} (\S+)')
        lookups = total(text, r"faststock_cache_requests_total\{[^}]*\} (\S+)")
        hits = total(text, r'faststock_cache_requests_total\{[^}]*result="HIT"\} (\S+)')
        return durations, requests_total, lookups, hits

    before = counted()
    paths = [f"/api/products/{i % 7 + 1}" for i in range(200)]
    paths += [f"/api/products/{i % 5 + 1}/stock" for i in range(100)]
    paths += ["/api/products?page=2&limit=5"] * 100
    with requests.Session() as a, requests.Session() as b:  # two connections: both workers
        for i, path in enumerate(paths):
            assert (a if i % 2 else b).get(server.url(path)).status_code == 200

    def grown() -> tuple[float, ...]:
        return tuple(now - then for now, then in zip(counted(), before, strict=True))

    assert poll(lambda: grown()[:3] == (400.0, 400.0, 400.0), within=5), grown()
    assert grown()[3] > 300  # most of them were near-cache hits, answered by the lane


GREEN_FIRST_HITS = """
from gevent import monkey

monkey.patch_all()
import gevent

from faststock import create_app
from faststock.metrics import get_tally

counts = get_tally(create_app())
workers = [gevent.spawn(counts.hit, "/api/products/<raw_id>", "product", 0.001) for _ in range(20)]
gevent.joinall(workers, timeout=10)
print(sum(w.successful() for w in workers))
"""


def test_first_hits_of_a_gevent_worker_never_deadlock(database_url, redis_url):
    """The first hit starts the flushing thread, which yields under gevent: it must do so outside
    the counts' lock (a real lock), or the next greenlet's hit blocks the whole worker."""
    proc = subprocess.run(
        [sys.executable, "-c", GREEN_FIRST_HITS],
        env={**os.environ, "DATABASE_URL": database_url, "REDIS_URL": redis_url},
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["20"]
