"""The WSGI entry point for gunicorn: `gunicorn -c gunicorn.conf.py faststock.wsgi:app`.

Imported in each worker after fork (no `--preload`), so pools and sockets are born there.
"""

import sys

from . import create_app
from .config import ConfigError

try:
    app = create_app()
except ConfigError as exc:
    sys.stderr.write(f"faststock: configuration error: {exc}\n")
    sys.exit(3)
