"""The gunicorn worker: gevent's, plus what an HTTP API behind a load balancer needs.

1. Stopping drops nothing. gunicorn's gevent worker stops when it has served max_requests, on
   TERM (a HUP reload replaces workers with TERM) and on INT/QUIT (Ctrl-C), and loses requests
   every time: it closes its listening socket, and connections it had accepted but not started
   yet then fail asking that closed socket its name (`OSError: [Errno 9]`, the client is cut
   off); after max_requests nothing closes connections idle between keep-alive requests, so the
   worker holds on for the whole graceful timeout, and with one worker nobody accepts meanwhile;
   INT/QUIT exit within 0.1 s, cutting requests in flight, with a SystemExit traceback. This
   worker stops one way whatever the reason: it stops accepting at once; requests in flight
   finish (answered with `Connection: close`); a connection waiting for a request gets
   `STOP_GRACE` seconds to send one, so a client sending requests back to back gets its next one
   answered and is told to close, instead of seeing the connection closed under a request it is
   sending; then the connection is closed. The worker exits once its connections are done, or at
   the graceful timeout; a second Ctrl-C exits at once.
2. Requests gunicorn rejects itself (request line over 4094 bytes, oversized or malformed headers,
   a broken chunked body) are answered with the API's JSON error shape instead of an HTML page,
   with the headers every error carries (errors.HARDENED).
3. No `Server` header: gunicorn 27 sends `Server: gunicorn` on every answer and has no setting to
   drop it; telling the world which server (and so which bugs) answers helps only an attacker.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from typing import Any

import gevent
import gevent.event
from gevent.pool import Pool
from gevent.server import StreamServer
from gunicorn import util
from gunicorn.http import wsgi
from gunicorn.sock import ssl_context
from gunicorn.workers.ggevent import GeventWorker

from .errors import HARDENED, code_for_status, error_body

# Seconds a connection waiting for a request is kept once the worker stops. A client that sends
# requests back to back sends its next one well within this; an idle one is closed after it.
STOP_GRACE = 1.0


class _Listener:
    """Stands in for a listening socket in gunicorn's `handle`, which asks it only for its name.
    The name is read at start-up: by the time a connection is handled, the worker may have closed
    the socket to stop accepting."""

    __slots__ = ("_name",)

    def __init__(self, name: Any) -> None:
        self._name = name

    def getsockname(self) -> Any:
        return self._name


class Worker(GeventWorker):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._stopping = gevent.event.Event()  # set when `alive` turns False
        self._hurry = gevent.event.Event()  # set by a repeated INT/QUIT: exit without waiting
        self._quit_signals: set[int] = set()
        self._waiting: dict[gevent.Greenlet, gevent.Timeout] = {}  # connections between requests
        super().__init__(*args, **kwargs)

    @property
    def alive(self) -> bool:
        return self._alive

    @alive.setter
    def alive(self, value: bool) -> None:
        """gunicorn stops a worker by setting `alive` to False: after max_requests (inside a
        request), on TERM, INT or QUIT, when the reloader sees a change. Catching that assignment
        wakes `run` to stop the same way for every reason, at once rather than at the next
        one-second tick of gunicorn's loop, during which the worker would go on accepting."""
        if not value:
            self._stopping.set()
        self._alive = value

    def run(self) -> None:
        """gunicorn's gevent `run`, stopping as the module docstring says."""
        ssl_args = {"ssl_context": ssl_context(self.cfg)} if self.cfg.is_ssl else {}
        servers = []
        for sock in self.sockets:
            sock.setblocking(1)
            handle = partial(self.handle, _Listener(sock.getsockname()))
            server = StreamServer(
                sock, handle=handle, spawn=Pool(self.worker_connections), **ssl_args
            )
            if self.cfg.workers > 1:
                server.max_accept = 1
            server.start()
            servers.append(server)

        while self.alive:
            self.notify()
            self._stopping.wait(1.0)

        for server in servers:
            server.close()  # stop accepting: the master and the other workers keep the port
        ending = gevent.get_hub().loop.timer(STOP_GRACE)
        ending.start(self._end_waits)

        def drain() -> None:
            for server in servers:
                server.pool.join()

        drained = gevent.spawn(drain)
        deadline = time.monotonic() + self.cfg.graceful_timeout
        while not drained.ready() and not self._hurry.is_set():
            left = deadline - time.monotonic()
            if left <= 0:
                self.log.warning("Worker graceful timeout (pid:%s)", self.pid)
                break
            self.notify()
            gevent.wait([drained, self._hurry], timeout=min(left, 1.0), count=1)
        # Done. Python restores default handlers while it finalizes, and the QUIT the master
        # sends on Ctrl-C often arrives then, after the INT this worker got from the terminal:
        # it would kill the worker ("was sent SIGQUIT!" in the log, maybe a core dump).
        for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)

    @contextmanager
    def timeout_ctx(self) -> Iterator[None]:
        """Wraps each wait for a request on a connection, with the keep-alive timeout, or
        `STOP_GRACE` once the worker stops; `_end_waits` can cut it short with the same timeout,
        which ends the wait as if it had expired (no request: the connection closes)."""
        timeout = gevent.Timeout(self.cfg.keepalive if self.alive else STOP_GRACE, False)
        current = gevent.getcurrent()
        self._waiting[current] = timeout
        try:
            with timeout:
                yield
        finally:
            del self._waiting[current]

    def _end_waits(self) -> None:
        """Close the connections still waiting for a request `STOP_GRACE` after the stop. Runs
        in the hub (a timer callback), so no connection can start a request between the check
        and the throw."""
        for greenlet, timeout in list(self._waiting.items()):
            if self._waiting.get(greenlet) is timeout:
                greenlet.throw(timeout)

    def handle_quit(self, sig: int, frame: Any) -> None:
        """INT and QUIT stop the worker like TERM, quietly (gunicorn's exits from a greenlet
        with sys.exit, cutting requests in flight and printing a SystemExit traceback). Ctrl-C
        sends INT to the master and the workers alike, and the master sends QUIT: the same
        signal a second time (Ctrl-C again) means exit without waiting."""
        if sig in self._quit_signals:
            self._hurry.set()
        self._quit_signals.add(sig)
        if self.alive:
            gevent.spawn(self.cfg.worker_int, self)  # the hook may block: not in a signal handler
        self.alive = False


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """gunicorn's `util.write_error`, answering in the API's error shape.

    A client's bad framing is its error: gunicorn's 501 for an unsupported Transfer-Encoding
    becomes a 400, so nothing a client sends produces a 5xx.
    """
    if status_int == 501:
        status_int, reason = 400, "Bad Request"
    code = code_for_status(status_int)
    body = error_body(code, mesg or reason)
    hardened = "".join(f"{name}: {value}\r\n" for name, value in HARDENED)
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n{hardened}\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


class Response(wsgi.Response):
    """gunicorn's HTTP/1 response without its `Server: gunicorn` line."""

    def default_headers(self) -> list[str]:
        headers = super().default_headers()
        if headers[1].startswith("Server:"):
            del headers[1]
        return headers


def install() -> None:
    """Route gunicorn's own error pages through `write_json_error`, and its answers through
    `Response` (called in the master; the workers inherit both)."""
    util.write_error = write_json_error
    wsgi.Response = Response
