"""Around the API: no Server banner, errors and writes neither sniffed nor stored, /metrics only
for the networks METRICS_ALLOW lists. A real gunicorn: the banner and some error pages are its."""

from __future__ import annotations

import socket

import pytest
import requests

from faststock.config import Config, ConfigError

HARDENED = {"X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}


def raw_request(port: int, data: bytes) -> bytes:
    """Send bytes as they are (requests would refuse to send a malformed request) and read the
    answer until the server closes."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(data)
        answer = b""
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


def hardened(headers) -> bool:
    return all(headers.get(name) == value for name, value in HARDENED.items())


def test_no_server_banner_and_errors_and_writes_are_hardened(live_server):
    server = live_server()
    url = server.url
    with requests.Session() as session:  # one worker: a MISS, a Redis HIT, its fast lane's HIT
        reads = [session.get(url("/api/products/1")) for _ in range(3)]
    assert [r.headers["X-Cache"] for r in reads] == ["MISS", "HIT", "HIT"]
    flask_read = requests.get(url("/api/products?page=2&limit=2"))
    write = requests.post(url("/api/products/1/update-stock"), json={"delta": 1})
    errors = [
        requests.get(url("/api/products/abc")),  # 400
        requests.get(url("/nope")),  # 404
        requests.put(url("/api/products/1")),  # 405
        requests.post(
            url("/api/products/1/update-stock"), data="x", headers={"Content-Type": "text/plain"}
        ),
    ]
    for response in (*reads, flask_read, write, *errors):
        assert "Server" not in response.headers, (response.url, response.headers)
    for response in (*reads, flask_read):
        assert response.status_code == 200
        assert (
            "X-Content-Type-Options" not in response.headers
            and "Cache-Control" not in response.headers
        )
    assert write.status_code == 200 and hardened(write.headers)
    for response in errors:
        assert response.status_code >= 400 and hardened(response.headers), response.url

    # gunicorn's own answer to a request line over 4094 bytes: JSON, hardened, no banner.
    answer = raw_request(server.port, b"GET /" + b"a" * 5000 + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].split()[1] in ("400", "414"), lines[0]
    fields = dict(line.split(": ", 1) for line in lines[1:])
    assert "Server" not in fields and hardened(fields), fields
    assert body.startswith(b'{"error":"bad_request"')


def test_metrics_answer_only_the_networks_metrics_allow_lists(live_server):
    closed = live_server(METRICS_ALLOW="192.0.2.0/24")
    refused = requests.get(closed.url("/metrics"))
    assert refused.status_code == 403
    assert refused.json()["error"] == "forbidden"
    assert hardened(refused.headers)
    assert requests.get(closed.url("/api/products/1")).status_code == 200  # only /metrics

    behind_proxy = live_server(METRICS_ALLOW="127.0.0.1,10.0.0.0/8", TRUSTED_PROXIES="127.0.0.1")
    assert requests.get(behind_proxy.url("/metrics")).status_code == 200
    inside = requests.get(behind_proxy.url("/metrics"), headers={"X-Forwarded-For": "10.1.2.3"})
    assert inside.status_code == 200
    # A client outside, sent on by the proxy: the proxy's own address does not let it in.
    outside = requests.get(
        behind_proxy.url("/metrics"), headers={"X-Forwarded-For": "198.51.100.7"}
    )
    assert outside.status_code == 403


def test_address_lists_are_checked_at_start():
    config = Config.from_env({"METRICS_ALLOW": "127.0.0.1, 10.0.0.0/8 ,::1"})
    assert [str(n) for n in config.metrics_networks] == ["127.0.0.1/32", "10.0.0.0/8", "::1/128"]
    assert Config.from_env({}).trusted_networks == ()
    with pytest.raises(ConfigError, match="METRICS_ALLOW must be comma-separated addresses"):
        Config.from_env({"METRICS_ALLOW": "10.0.0.0/33"})
