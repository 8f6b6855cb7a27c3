"""scripts/up, as a user runs it: serves a seeded database, and Ctrl-C or SIGTERM leaves nothing."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
from pathlib import Path

import requests

from tests.servers import ROOT, free_port, poll


def refused(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) != 0


def run_up(run_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
    env.update({"PORT": str(port), "FS_RUN": str(run_dir), "WEB_CONCURRENCY": "1"})
    return subprocess.Popen(
        [str(ROOT / "scripts" / "up")],
        env=env,
        stdout=log.open("ab"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


def wait_serving(proc: subprocess.Popen[bytes], url: str, log: Path) -> requests.Response:
    def serving() -> requests.Response | None:
        assert proc.poll() is None, log.read_text()
        try:
            # no keep-alive: an idle open connection would hold up gunicorn's graceful shutdown
            response = requests.get(url, timeout=2, headers={"Connection": "close"})
        except requests.RequestException:
            return None
        return response if response.status_code == 200 else None

    response = poll(serving, within=180, every=0.1)
    assert response is not None, log.read_text()
    return response


def test_up_serves_seeded_data_and_cleans_up(tmp_path):
    run_dir, log = tmp_path / "run", tmp_path / "up.log"
    for stop_signal, stop_target in ((signal.SIGTERM, "script"), (signal.SIGINT, "group")):
        port = free_port()
        proc = run_up(run_dir, port, log)
        try:
            body = wait_serving(
                proc, f"http://127.0.0.1:{port}/api/products?page=1000&limit=10", log
            ).json()
            assert [item["id"] for item in body["items"]] == list(range(9991, 10001))
            assert body["next_page"] is None
            pg_port = int((run_dir / "pg" / "port").read_text())
            redis_port = int((run_dir / "redis" / "port").read_text())
        finally:
            if stop_target == "script":
                proc.send_signal(stop_signal)
            else:
                os.killpg(proc.pid, stop_signal)  # what Ctrl-C in a terminal does
            proc.wait(60)
        assert refused(port) and refused(pg_port) and refused(redis_port), log.read_text()
    assert log.read_text().count("inserted 10000 products") == 1  # the second run kept the data
