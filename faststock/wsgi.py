"""The WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py faststock.wsgi:app`.

Imported in each worker after fork (no `--preload`), so pools and sockets are born there.
"""

import sys

from . import create_app
from .config import ConfigError
from .outbox import get_keeper

try:
    app = create_app()
except ConfigError as exc:
    sys.stderr.write(f"faststock: configuration error: {exc}\n")
    sys.exit(3)

# Replay whatever cache updates a previous process left pending before it stopped.
get_keeper(app).wake()
