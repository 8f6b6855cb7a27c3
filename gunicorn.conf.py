"""gunicorn settings for FastStock, from the same validated Config the app reads.

Workers are gevent: one process per core, each holding up to `worker_connections` concurrent
requests on cooperative sockets. The app is imported in each worker after fork (no preload), so
no connection or pool is ever shared across processes. Override any of these with
`GUNICORN_CMD_ARGS`, e.g. `--timeout 60`. Logs are JSON lines on stderr (faststock/logs.py);
ACCESS_LOG=1 adds one per request.
"""

import atexit
import contextlib
import os
import resource
import shutil
import tempfile

import faststock.shared  # noqa: F401 - maps the page the workers share, before they fork
from faststock import logs, worker
from faststock.config import from_env_or_exit

_config = from_env_or_exit()

bind = _config.bind  # HOST:PORT; loopback unless HOST says otherwise (the image sets 0.0.0.0)
workers = _config.web_concurrency
worker_class = "faststock.worker.Worker"  # gevent's, stopping without dropping a connection
worker_connections = 1000
backlog = 2048
# Longer than the usual load balancer idle timeout (60 s), so the balancer closes first; once a
# worker stops, an idle connection is closed after 1 s anyway (faststock/worker.py).
keepalive = 75
timeout = 30
graceful_timeout = 30
# No recycling: a worker's memory stays flat, and each recycle is a cold start (README, Shutdown).
max_requests = 0
preload_app = False
# gunicorn's access log stays off: ACCESS_LOG=1 has the app log requests, as JSON with route
# templates, the fast lane's included.
accesslog = None
errorlog = "-"
loglevel = _config.log_level.lower()
# gunicorn's own lines (start, workers, errors) as JSON too, in the app's shape. The logger class
# keeps the access log off, which any logconfig_dict would turn on at a cost to every request.
logconfig_dict = logs.gunicorn_logconfig()
logger_class = logs.GunicornLogger
control_socket_disable = True
proc_name = "faststock"


def _remove_metrics_dir(path: str, master_pid: int) -> None:
    """Workers leave through sys.exit and so run atexit handlers too: only the master removes it."""
    if os.getpid() == master_pid:
        shutil.rmtree(path, ignore_errors=True)


# Every worker writes its metrics here; one directory per gunicorn run, emptied at start and
# removed when the master exits, however it exits: on_exit is not called when the bind fails.
if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="faststock-metrics-")
    atexit.register(_remove_metrics_dir, os.environ["PROMETHEUS_MULTIPROC_DIR"], os.getpid())


# Each gevent worker holds up to worker_connections sockets plus its pools: lift the soft limit on
# open files to the hard one (commonly 1024 soft), or a spike fails with EMFILE.
_soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
if _soft != resource.RLIM_INFINITY and _soft < _hard:
    # some platforms (macOS) cap it below the reported hard limit: keep the soft one then
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (_hard, _hard))

# gunicorn's own error pages (malformed or oversized requests) in the API's JSON shape.
worker.install()


def on_starting(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    path = os.environ["PROMETHEUS_MULTIPROC_DIR"]
    os.makedirs(path, exist_ok=True)
    for name in os.listdir(path):
        if name.endswith(".db"):
            os.unlink(os.path.join(path, name))


def child_exit(server, worker) -> None:  # noqa: ANN001 - gunicorn's Arbiter and Worker
    from faststock.metrics import mark_process_dead

    mark_process_dead(worker.pid)
