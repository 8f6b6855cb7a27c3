# FastStock API image.
#
# Two stages: "builder" resolves requirements.txt into a virtualenv at /opt/venv, and the final
# stage copies only that venv plus the application code onto a clean base. The compiled runtime
# dependencies (psycopg2-binary, gevent, hiredis, ...) ship manylinux wheels and psycogreen is
# pure Python, so neither stage needs apt or a compiler, and the dev/test tools listed in
# requirements-dev.txt never reach the image.
#
# Build: docker build -t faststock .
# Run:   docker run -p 8000:8000 -e DATABASE_URL=... -e REDIS_URL=... faststock
# Schema and seed data (same image): flask --app faststock init-db
#                                    flask --app faststock seed --products N [--reset] [--if-empty]

FROM python:3.11-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1

# The venv sits at the same path in both stages, so its interpreter symlink and script shebangs
# stay valid after the copy (both stages use the same base image, hence the same Python).
RUN python -m venv /opt/venv
ENV PATH="/opt/venv/bin:$PATH"

# Only the runtime requirements, copied on their own so this layer is reused until they change.
COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir -r /tmp/requirements.txt


FROM python:3.11-slim-bookworm

LABEL org.opencontainers.image.title="faststock" \
      org.opencontainers.image.description="FastStock products/stock API (Flask, gunicorn + gevent)"

# HOST: every interface of the container (the app's own default is loopback only), so that a
# published port reaches it.
ENV PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PATH="/opt/venv/bin:$PATH" \
    HOME=/home/faststock \
    HOST=0.0.0.0 \
    PORT=8000

# Unprivileged runtime user with a real, writable HOME: gunicorn 27 opens a control socket under
# $HOME/.gunicorn unless told not to (gunicorn.conf.py does, but nothing should depend on that).
# --no-log-init keeps the high UID from bloating /var/log/lastlog.
RUN groupadd --system --gid 10001 faststock \
    && useradd --system --no-log-init --uid 10001 --gid faststock \
        --home-dir /home/faststock --create-home --shell /usr/sbin/nologin faststock

COPY --from=builder /opt/venv /opt/venv

WORKDIR /app
# The code stays root-owned, so the runtime user cannot modify it. Its bytecode is compiled once
# here, since PYTHONDONTWRITEBYTECODE (and the read-only dir) stop it being cached at run time.
COPY gunicorn.conf.py ./
COPY faststock/ ./faststock/
RUN python -m compileall -q faststock

# Numeric, so that runtimes enforcing "run as non-root" (e.g. Kubernetes runAsNonRoot) can check it.
USER 10001:10001

EXPOSE 8000

# No curl in slim images: probe liveness with the standard library. The opener raises on
# connection errors and non-2xx answers, so python exits non-zero and the container is unhealthy.
# PORT is read at run time, so a container started with another PORT is still probed correctly,
# and proxies are bypassed, since Docker may inject HTTP_PROXY into containers from client config.
HEALTHCHECK --interval=10s --timeout=3s --start-period=15s --retries=3 \
    CMD ["python", "-c", "import os, urllib.request as r; r.build_opener(r.ProxyHandler({})).open('http://127.0.0.1:' + os.environ.get('PORT', '8000') + '/healthz', timeout=2)"]

# Exec form: gunicorn is PID 1 and gets SIGTERM directly, for a graceful shutdown of its workers.
CMD ["gunicorn", "-c", "gunicorn.conf.py", "faststock.wsgi:app"]
