"""Rate limits against a real gunicorn (two gevent workers) and real Redis: one allowance however
many workers answer, per key name or per address, a per-worker fallback while Redis is down, and
X-Forwarded-For believed only from a trusted proxy."""

from __future__ import annotations

import hashlib
import secrets
import time
from collections import Counter
from collections.abc import Callable

import pytest
import requests

from faststock.config import Config, ConfigError
from faststock.seed import product_row
from tests.servers import fire, poll


def make_key(name: str) -> tuple[str, str]:
    key = secrets.token_urlsafe(32)
    return key, f"{name}:{hashlib.sha256(key.encode()).hexdigest()}"


KEY_A, ENTRY_A = make_key("a")
KEY_B, ENTRY_B = make_key("b")


def write(server, product_id: int = 5, **headers: str) -> requests.Response:
    """A delta on a fresh connection: gunicorn hands each to whichever worker accepts first."""
    return requests.post(
        server.url(f"/api/products/{product_id}/update-stock"),
        json={"delta": 1},
        headers={"Connection": "close", **headers},
        timeout=30,
    )


def worker_of(response: requests.Response) -> str:
    """The worker that answered: generated request ids start with a per-process prefix."""
    return response.headers["X-Request-ID"][:16]


def burst(server, count: int, **headers: str) -> list[requests.Response]:
    return fire([lambda: write(server, **headers)] * count)


def until_both_workers(
    send: Callable[[], list[requests.Response]], within: float = 60
) -> list[requests.Response]:
    """Send bursts until both workers have answered at least one request; all the answers."""
    answers: list[requests.Response] = []

    def both() -> bool:
        answers.extend(send())
        return len({worker_of(r) for r in answers}) >= 2

    assert poll(both, within=within, every=0), "one worker answered everything"
    return answers


def statuses(answers: list[requests.Response]) -> Counter[int]:
    return Counter(r.status_code for r in answers)


def test_write_limit_is_one_allowance_across_both_workers(live_server, sql):
    """10 writes an hour (a window far longer than the test) per key name, or per address for
    anonymous writes: of all the writes sent at once over both workers, exactly 10 per client
    are applied."""
    server = live_server(API_KEYS=f"{ENTRY_A},{ENTRY_B}", WRITE_RATE_LIMIT="10/hour")
    anonymous = until_both_workers(lambda: burst(server, 12))
    assert statuses(anonymous) == {200: 10, 429: len(anonymous) - 10}
    keyed_a = until_both_workers(lambda: burst(server, 12, Authorization=f"Bearer {KEY_A}"))
    assert statuses(keyed_a) == {200: 10, 429: len(keyed_a) - 10}
    keyed_b = burst(server, 3, Authorization=f"Bearer {KEY_B}")  # b has an allowance of its own
    assert statuses(keyed_b) == {200: 3}
    # Every applied write added 1 (versions can skip under concurrent updates of one row).
    assert sql("SELECT stock FROM products WHERE id = 5") == [(product_row(5)[3] + 23,)]

    refused = next(r for r in keyed_a if r.status_code == 429)
    body = refused.json()
    assert body["error"] == "rate_limited" and "10 per 1 hour" in body["message"]
    assert 0 < int(refused.headers["Retry-After"]) <= 3600
    assert refused.headers["X-RateLimit-Limit"] == "10"
    assert refused.headers["X-RateLimit-Remaining"] == "0"
    assert int(refused.headers["X-RateLimit-Reset"]) > time.time()
    # The same under the IETF draft's names, the reset in seconds from now.
    assert refused.headers["RateLimit-Limit"] == "10"
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert 0 < int(refused.headers["RateLimit-Reset"]) <= 3600
    assert refused.headers["X-Content-Type-Options"] == "nosniff"
    assert refused.headers["Cache-Control"] == "no-store"
    allowed = keyed_b[0]
    assert allowed.headers["X-RateLimit-Limit"] == allowed.headers["RateLimit-Limit"] == "10"
    assert allowed.headers["RateLimit-Remaining"] == allowed.headers["X-RateLimit-Remaining"]
    assert "Retry-After" not in allowed.headers  # it means something on a 429 only
    # Reads are not limited, and carry none of it.
    reads = [requests.get(server.url("/api/products/5"), timeout=10) for _ in range(30)]
    assert {r.status_code for r in reads} == {200}
    assert not [r for r in reads if {"X-RateLimit-Limit", "RateLimit-Limit"} & set(r.headers)]


def test_read_limit_per_address_and_the_fast_lane_stands_aside(live_server):
    server = live_server(READ_RATE_LIMIT="5/hour")
    with requests.Session() as session:  # one worker, whose near cache would answer from the
        answers = [session.get(server.url("/api/products/3")) for _ in range(8)]  # 3rd read on
    assert [r.status_code for r in answers] == [200] * 5 + [429] * 3
    assert answers[-1].json()["error"] == "rate_limited"
    assert answers[-1].headers["Retry-After"]
    assert requests.get(server.url("/api/products?page=1")).status_code == 429  # one allowance
    assert write(server).status_code == 200  # writes have no limit here
    assert requests.get(server.url("/healthz")).status_code == 200  # not an API read


def test_when_redis_is_down_each_worker_limits_on_its_own(live_server, private_redis):
    """No Redis: Flask-Limiter counts in each worker's memory. No request fails, none goes
    unlimited; each worker allows the limit, so the client gets it twice. When Redis is back,
    the counters are Redis's again."""
    private_redis.stop()
    server = live_server(REDIS_URL=private_redis.url, WRITE_RATE_LIMIT="3/hour")
    answers: list[requests.Response] = []

    def each_worker_refused() -> bool:
        answers.extend(burst(server, 8))
        refused = {worker_of(r) for r in answers if r.status_code == 429}
        return len(refused) >= 2

    assert poll(each_worker_refused, within=60, every=0), statuses(answers)
    assert set(statuses(answers)) == {200, 429}, statuses(answers)  # nothing failed
    allowed = Counter(worker_of(r) for r in answers if r.status_code == 200)
    assert sorted(allowed.values()) == [3, 3], allowed
    assert "falling back to in-memory storage" in server.log()

    private_redis.start()  # empty: a count of 0 for this client
    assert poll(lambda: write(server).status_code == 200, within=90, every=0.5)


def test_x_forwarded_for_is_believed_only_from_a_trusted_proxy(live_server):
    """Two instances on the same Redis: one behind no proxy it trusts, one trusting loopback."""
    distrusting = live_server(TRUSTED_PROXIES="192.0.2.0/24", WRITE_RATE_LIMIT="2/hour")
    sent = [write(distrusting, **{"X-Forwarded-For": f"198.51.100.{n}"}) for n in range(1, 4)]
    assert [r.status_code for r in sent] == [200, 200, 429]  # all one client: the peer

    trusting = live_server(TRUSTED_PROXIES="127.0.0.0/8", WRITE_RATE_LIMIT="2/hour")
    client_1 = {"X-Forwarded-For": "198.51.100.1"}
    client_2 = {"X-Forwarded-For": "203.0.113.9, 198.51.100.2"}  # the proxy's own entry is last
    assert [write(trusting, **client_1).status_code for _ in range(3)] == [200, 200, 429]
    assert [write(trusting, **client_2).status_code for _ in range(3)] == [200, 200, 429]
    # The proxy's own address, with no X-Forwarded-For: the client the first instance counted.
    assert write(trusting).status_code == 429


def test_rate_limits_are_checked_at_start():
    assert Config.from_env({"WRITE_RATE_LIMIT": "100/second"}).write_rate_limit == "100/second"
    assert Config.from_env({"READ_RATE_LIMIT": "10 per minute;1000/day"}).read_rate_limit
    for value in ("fast", "0/second", "100/fortnight"):
        with pytest.raises(ConfigError, match="WRITE_RATE_LIMIT must be a rate such as"):
            Config.from_env({"WRITE_RATE_LIMIT": value})
    with pytest.raises(ConfigError, match="TRUSTED_PROXIES must be comma-separated addresses"):
        Config.from_env({"TRUSTED_PROXIES": "10.0.0.0/8,proxy"})
