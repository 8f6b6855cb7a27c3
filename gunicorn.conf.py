"""gunicorn settings for FastStock, from the same validated Config the app reads.

Workers are gevent: one process per core, each holding up to `worker_connections` concurrent
requests on cooperative sockets. The app is imported in each worker after fork (no preload), so
no connection or pool is ever shared across processes. Override any of these with
`GUNICORN_CMD_ARGS`, e.g. `--access-logfile -`.
"""

import contextlib
import os
import resource
import shutil
import sys
import tempfile

import faststock.shared  # noqa: F401 - maps the page the workers share, before they fork
from faststock import worker
from faststock.config import Config, ConfigError

try:
    _config = Config.from_env()
except ConfigError as exc:
    sys.stderr.write(f"faststock: configuration error: {exc}\n")
    sys.exit(1)

bind = f"0.0.0.0:{_config.port}"
workers = _config.web_concurrency
worker_class = "faststock.worker.Worker"  # gevent's, closing idle connections on exit
worker_connections = 1000
backlog = 2048
# Longer than the usual load balancer idle timeout (60 s), so the balancer closes first; on
# shutdown idle connections are closed at once anyway (faststock/worker.py).
keepalive = 75
timeout = 30
graceful_timeout = 30
max_requests = 200_000  # a safety valve against leaks, not a routine: minutes apart at full load
max_requests_jitter = 20_000
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


def on_exit(server) -> None:  # noqa: ANN001 - gunicorn's Arbiter
    if _own_metrics_dir:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)
