"""The WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py faststock.wsgi:app`.

Imported in each worker after fork (no `--preload`), so pools and sockets are born there.
"""

import sys

from . import create_app, metrics
from .config import ConfigError
from .outbox import get_keeper

try:
    app = create_app()
except ConfigError as exc:
    sys.stderr.write(f"faststock: configuration error: {exc}\n")
    sys.exit(3)

# For the life of the worker: replays the cache outbox (including what a previous process left
# pending) and closes the Redis breaker once Redis answers again.
get_keeper(app).start()
# This worker's gauges (process, breaker, near cache) stay fresh between scrapes.
metrics.start(app)
