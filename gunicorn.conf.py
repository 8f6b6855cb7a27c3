"""gunicorn settings for FastStock, from the same validated Config the app reads.

Workers are gevent: one process per core, each holding up to `worker_connections` concurrent
requests on cooperative sockets. The app is imported in each worker after fork (no preload), so
no connection or pool is ever shared across processes. Override any of these with
`GUNICORN_CMD_ARGS`, e.g. `--access-logfile -`.
"""

import os
import resource
import shutil
import sys
import tempfile

import orjson
from gunicorn import util

import faststock.shared  # noqa: F401 - maps the page the workers share, before they fork
from faststock.config import Config, ConfigError

try:
    _config = Config.from_env()
except ConfigError as exc:
    sys.stderr.write(f"faststock: configuration error: {exc}\n")
    sys.exit(1)

bind = f"0.0.0.0:{_config.port}"
workers = _config.web_concurrency
worker_class = "gevent"
worker_connections = 1000
backlog = 2048
keepalive = 75  # longer than the usual load balancer idle timeout (60 s), so it closes first
timeout = 30
graceful_timeout = 30
max_requests = 20_000
max_requests_jitter = 2_000
preload_app = False
accesslog = None
errorlog = "-"
loglevel = _config.log_level.lower()
control_socket_disable = True
proc_name = "faststock"

# Every worker writes its metrics here; one directory per gunicorn run, emptied at start.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="faststock-metrics-")
    _own_metrics_dir = True
else:
    _own_metrics_dir = False


# Each gevent worker holds up to worker_connections sockets plus its pools: lift the soft limit on
# open files to the hard one (commonly 1024 soft), or a spike fails with EMFILE.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _hard == resource.RLIM_INFINITY or _soft < _hard:
    resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

_CODES = {400: "bad_request", 403: "bad_request", 414: "bad_request", 417: "bad_request"}
_CODES |= {431: "bad_request"}


def _write_json_error(sock, status_int: int, reason: str, mesg: str) -> None:  # noqa: ANN001
    """gunicorn answers requests it cannot parse (request line over 4094 bytes, oversized or
    malformed headers) itself, before the app sees them, with an HTML page; clients of this API
    always get the JSON error shape instead. A client's bad framing is its error, never a 5xx."""
    if status_int == 501:  # an unsupported Transfer-Encoding is the client's mistake
        status_int, reason = 400, "Bad Request"
    code = _CODES.get(status_int, "bad_request" if status_int < 500 else "internal")
    body = orjson.dumps({"error": code, "message": mesg or reason})
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


util.write_error = _write_json_error


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))


def child_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's Arbiter and Worker
    from faststock.metrics import mark_process_dead

    mark_process_dead(worker.pid)


def on_exit(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
