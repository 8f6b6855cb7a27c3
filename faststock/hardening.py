"""What every answer of a service on a network needs, around the API itself.

- The client address: `X-Forwarded-For` is believed only from a proxy TRUSTED_PROXIES lists.
  werkzeug's ProxyFix believes it from anyone (any client could then pick the address its rate
  limit is counted under), so it runs only for requests whose peer is trusted, and takes the last
  address, the one that proxy added: one proxy hop.
- METRICS_ALLOW: /metrics answers only the networks listed, 403 `forbidden` to others.

Errors and writes carry `X-Content-Type-Options: nosniff` and `Cache-Control: no-store`
(errors.HARDENED: set where error answers and writes are made, so reads pay nothing for them),
gunicorn's own error pages too; gunicorn's `Server` header is dropped (worker.py).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Iterable
from functools import lru_cache
from typing import Any

from flask import Flask, request
from werkzeug.middleware.proxy_fix import ProxyFix

from .config import Config, Network
from .errors import ApiError


def within(networks: tuple[Network, ...]) -> Callable[[str | None], bool]:
    """A cached test of whether an address (a string, as in REMOTE_ADDR) is in `networks`; a
    malformed or missing address is not."""

    @lru_cache(maxsize=4096)
    def test(address: str | None) -> bool:
        try:
            ip = ipaddress.ip_address(address or "")
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in network for network in networks)

    return test


class TrustedProxies:
    """ProxyFix (X-Forwarded-For, one hop) for requests whose peer is a trusted proxy only."""

    def __init__(self, wsgi_app: Callable[..., Iterable[bytes]], trusted: Callable) -> None:
        self.direct = wsgi_app
        self.proxied = ProxyFix(wsgi_app, x_for=1, x_proto=0, x_host=0, x_port=0, x_prefix=0)
        self.trusted = trusted

    def __call__(self, environ: dict[str, Any], start_response: Callable) -> Iterable[bytes]:
        if self.trusted(environ.get("REMOTE_ADDR")):
            return self.proxied(environ, start_response)
        return self.direct(environ, start_response)


def _metrics_guard(allowed: Callable[[str | None], bool]) -> Callable[[], None]:
    def guard() -> None:
        if request.path == "/metrics" and not allowed(request.remote_addr):
            raise ApiError(403, "forbidden", "/metrics is not served to this address")

    return guard


def init_app(app: Flask) -> None:
    """Before the fast lane wraps the app: the lane stays in front of ProxyFix, which reads need
    only when they are rate limited, and then the lane stands aside (fastlane.py)."""
    config: Config = app.config["FASTSTOCK"]
    if config.trusted_networks:
        app.wsgi_app = TrustedProxies(app.wsgi_app, within(config.trusted_networks))  # type: ignore[method-assign]
    if config.metrics and config.metrics_networks:
        app.before_request(_metrics_guard(within(config.metrics_networks)))
