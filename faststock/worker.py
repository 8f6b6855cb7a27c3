"""The gunicorn worker: gevent's, plus two things an HTTP API behind a load balancer needs.

1. On shutdown, connections idle between keep-alive requests are closed at once. Stock gunicorn
   leaves them open until the graceful timeout, then kills them and writes a 500 on a connection
   no request was made on, which a client reusing it reads as a failure.
2. Requests gunicorn rejects itself (request line over 4094 bytes, oversized or malformed headers,
   a broken chunked body) are answered with the API's JSON error shape instead of an HTML page.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import gevent
from gunicorn import util
from gunicorn.workers.ggevent import GeventWorker

from .errors import CODES, error_body


class Worker(GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._served: set[gevent.Greenlet] = set()  # connections that answered a request
        self._idle: set[gevent.Greenlet] = set()  # ...and now wait for the next one

    def handle(self, listener: Any, client: Any, addr: Any) -> None:
        try:
            super().handle(listener, client, addr)
        finally:
            self._served.discard(gevent.getcurrent())

    def handle_request(self, listener_name: Any, req: Any, sock: Any, addr: Any) -> Any:
        try:
            return super().handle_request(listener_name, req, sock, addr)
        finally:
            self._served.add(gevent.getcurrent())

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """Wraps each wait for a request. A connection waiting for its first request is left
        alone at shutdown (its request may be on the wire); one that has been answered and sits
        idle is remembered, so shutdown can close it."""
        current = gevent.getcurrent()
        idle = current in self._served
        if idle:
            self._idle.add(current)
        try:
            with gevent.Timeout(self.cfg.keepalive, False):
                yield
        finally:
            if idle:
                self._idle.discard(current)

    def handle_exit(self, sig: int, frame: Any) -> None:
        super().handle_exit(sig, frame)
        gevent.spawn(self._close_idle)

    def handle_quit(self, sig: int, frame: Any) -> None:
        super().handle_quit(sig, frame)
        gevent.spawn(self._close_idle)

    def _close_idle(self) -> None:
        for greenlet in list(self._idle):
            greenlet.kill(block=False)

    def handle_error(self, req: Any, client: Any, addr: Any, exc: BaseException) -> None:
        if req is None and isinstance(exc, gevent.GreenletExit):
            return  # an idle keep-alive connection closed at shutdown: there is nothing to answer
        super().handle_error(req, client, addr, exc)


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error`, answering in the API's error shape.

    A client's bad framing is its error: gunicorn's 501 for an unsupported Transfer-Encoding
    becomes a 400, so nothing a client sends produces a 5xx.
    """
    if status_int == 501:
        status_int, reason = 400, "Bad Request"
    code = CODES.get(status_int, "bad_request" if status_int < 500 else "internal")
    body = error_body(code, mesg or reason)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


def install() -> None:
    """Route gunicorn's own error pages through `write_json_error` (called in the master)."""
    util.write_error = write_json_error
