"""Checks for Dockerfile, .dockerignore and docker-compose.yml that need neither Docker nor servers.

No Docker engine is available where these run, so the files are kept honest by linting them
(hadolint, the compose-spec JSON schema) and by cross-checking them against the code they start:
the Config fields, the gunicorn entry point, the Flask CLI commands and the /healthz probe.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from functools import cache
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
COMPOSE = ROOT / "docker-compose.yml"

# Read by the app besides Config: the metrics directory and gunicorn's own extra arguments.
EXTRA_ENV = frozenset({"PROMETHEUS_MULTIPROC_DIR", "GUNICORN_CMD_ARGS"})
# What the final image must contain from the build context, and nothing else.
APP_FILES = frozenset({"faststock", "gunicorn.conf.py"})
ROOT_USERS = frozenset({"root", "0"})

# The image runs from /app with the faststock package beside gunicorn.conf.py; mirror that here so
# `import faststock` works whether or not pytest was started with the repo root on sys.path.
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


# --- helpers -------------------------------------------------------------------------------------


def _tool(name: str) -> str:
    """Find a dev tool in the running venv first, so the version requirements-dev.txt pins runs."""
    local = Path(sys.executable).parent / name
    if local.is_file():
        return str(local)
    found = shutil.which(name)
    if found is None:
        hint = "pip install -r requirements-dev.txt"
        pytest.fail(f"{name} is neither next to {sys.executable} nor on PATH: {hint}")
    return found


def _run(argv: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120, **kwargs)


@cache
def _instructions() -> tuple[tuple[str, str], ...]:
    """The Dockerfile as (KEYWORD, arguments) pairs, joining continuations and dropping comments."""
    result: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue  # Docker also drops comment and blank lines inside a continuation.
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, args = (pending + line).partition(" ")
        result.append((keyword.upper(), args.strip()))
        pending = ""
    assert not pending, "Dockerfile ends inside a line continuation"
    return tuple(result)


def _final_stage() -> list[tuple[str, str]]:
    """Instructions after the last FROM: only these shape the image that runs."""
    instructions = list(_instructions())
    last_from = max(i for i, (keyword, _) in enumerate(instructions) if keyword == "FROM")
    return instructions[last_from + 1 :]


def _args(instructions: list[tuple[str, str]], keyword: str) -> list[str]:
    return [args for kw, args in instructions if kw == keyword]


def _exec_form(args: str) -> list[str]:
    """Parse a JSON-array (exec form) argument; shell form would hide PORT and signals in sh -c."""
    argv = json.loads(args)
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), args
    return argv


def _final_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in _args(_final_stage(), "ENV"):
        for token in shlex.split(args):
            key, sep, value = token.partition("=")
            assert sep, f"use ENV KEY=value, not the legacy 'ENV KEY value': {args}"
            env[key] = value
    return env


def _sources(args: str) -> list[str]:
    """Build-context paths a COPY/ADD reads; none when it copies from another stage (--from=)."""
    words = shlex.split(args)
    if any(w.startswith("--from=") for w in words):
        return []
    paths = [w for w in words if not w.startswith("--")]
    return [p.rstrip("/").removeprefix("./") for p in paths[:-1]]


def _context_sources() -> set[str]:
    return {src for kw, args in _instructions() if kw in ("COPY", "ADD") for src in _sources(args)}


@cache
def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(data, dict)
    return data


def _service(name: str) -> dict[str, Any]:
    services = _compose()["services"]
    assert name in services, f"docker-compose.yml has no {name!r} service"
    return services[name]


def _environment(service: dict[str, Any]) -> dict[str, str]:
    """A service's environment as a dict, whichever of the two Compose syntaxes it uses."""
    env = service.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def _command(service: dict[str, Any]) -> list[str]:
    command = service.get("command")
    return shlex.split(command) if isinstance(command, str) else [str(c) for c in command or []]


def _config_env_names() -> set[str]:
    from faststock.config import Config

    return {f.name.upper() for f in dataclasses.fields(Config)}


def _ignore_regex(pattern: str) -> re.Pattern[str]:
    """A .dockerignore pattern as a regex: `**/` is any number of directories, `*` and `?` stay
    within one path segment, `[...]` is a character class (Docker's patternmatcher rules)."""
    parts = []
    for tok in re.findall(r"\*\*/|\*\*|\*|\?|\[[^\]]*\]|.", pattern.strip("/")):
        if tok == "**/":
            parts.append("(?:.*/)?")
        elif tok == "**":
            parts.append(".*")
        elif tok == "*":
            parts.append("[^/]*")
        elif tok == "?":
            parts.append("[^/]")
        elif tok.startswith("["):
            parts.append(tok.replace("[!", "[^", 1))
        else:
            parts.append(re.escape(tok))
    return re.compile("".join(parts))


def _ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore keeps `path` out of the build context: the last matching rule wins,
    `!` re-includes, and a rule that matches a directory also covers everything below it."""
    segments = path.split("/")
    candidates = ["/".join(segments[: i + 1]) for i in range(len(segments))]
    ignored = False
    for pattern in patterns:
        regex = _ignore_regex(pattern.removeprefix("!"))
        if any(regex.fullmatch(c) for c in candidates):
            ignored = not pattern.startswith("!")
    return ignored


# --- Dockerfile ----------------------------------------------------------------------------------


def test_hadolint_passes() -> None:
    """hadolint's defaults (pinning, exec form, USER, pip cache...) hold with no rule ignored."""
    result = _run([_tool("hadolint"), "--no-color", "Dockerfile"])
    assert result.returncode == 0, result.stdout + result.stderr


def test_base_images_pinned_python_311_slim() -> None:
    """Both stages share one pinned base, so the venv copied from the builder runs unchanged."""
    bases = [args.split()[0] for args in _args(list(_instructions()), "FROM")]
    assert len(bases) >= 2, "expected a multi-stage build (builder + final)"
    assert set(bases) == {"python:3.11-slim-bookworm"}, bases


def test_builder_installs_runtime_requirements_only() -> None:
    """Dev/test tools (requirements-dev.txt) must never be installed into the image."""
    text = " ".join(args for _, args in _instructions())
    assert "requirements-dev" not in text
    runs = _args(list(_instructions()), "RUN")
    assert any("pip install" in r and "-r /tmp/requirements.txt" in r for r in runs), runs
    assert any("/opt/venv" in r and "venv" in r for r in runs), "builder must create /opt/venv"


def test_final_stage_copies_only_venv_and_app() -> None:
    """The final image gets the builder's venv and the app files, not the whole build context."""
    stage = _final_stage()
    copies = _args(stage, "COPY")
    assert any(c.startswith("--from=builder") and "/opt/venv" in c for c in copies), copies
    sources = {src for kind, args in stage if kind in ("COPY", "ADD") for src in _sources(args)}
    assert sources == APP_FILES, sources
    builder_reads = _context_sources() - APP_FILES
    assert builder_reads == {"requirements.txt"}, builder_reads


def test_final_stage_runtime_settings() -> None:
    """Unbuffered logs, no bytecode writes, the venv first on PATH, and the default PORT."""
    from faststock.config import Config

    env = _final_env()
    assert env.get("PYTHONUNBUFFERED") == "1"
    assert env.get("PYTHONDONTWRITEBYTECODE") == "1"
    assert env.get("PATH", "").startswith("/opt/venv/bin:"), env.get("PATH")
    assert env.get("HOME"), "gunicorn wants a HOME for its control socket"
    default_port = next(f.default for f in dataclasses.fields(Config) if f.name == "port")
    assert env.get("PORT") == str(default_port) == "8000"
    # The app binds loopback by default; in a container that would leave the published port dead.
    assert env.get("HOST") == "0.0.0.0", env.get("HOST")
    exposed = {p.split("/")[0] for args in _args(_final_stage(), "EXPOSE") for p in args.split()}
    assert "8000" in exposed, exposed


def test_runs_as_non_root_user() -> None:
    users = _args(_final_stage(), "USER")
    assert users, "final stage has no USER: the app would run as root"
    user, _, group = users[-1].partition(":")
    assert user not in ROOT_USERS and group not in ROOT_USERS, users[-1]


def test_cmd_starts_gunicorn_with_config_and_wsgi_app() -> None:
    """Exec form, so gunicorn is PID 1 and receives SIGTERM itself."""
    stage = _final_stage()
    assert not _args(stage, "ENTRYPOINT"), "an ENTRYPOINT would change how compose commands run"
    cmds = _args(stage, "CMD")
    assert cmds, "final stage has no CMD"
    assert _exec_form(cmds[-1]) == ["gunicorn", "-c", "gunicorn.conf.py", "faststock.wsgi:app"]


def _healthcheck_argv() -> list[str]:
    checks = _args(_final_stage(), "HEALTHCHECK")
    assert checks, "final stage has no HEALTHCHECK"
    _, sep, command = checks[-1].partition("CMD ")
    assert sep, checks[-1]
    return _exec_form(command)


def test_healthcheck_probes_healthz_with_stdlib() -> None:
    """slim images have no curl, so the probe must be plain python on the /healthz endpoint."""
    argv = _healthcheck_argv()
    assert argv[0] == "python", argv
    assert "/healthz" in " ".join(argv)
    assert "127.0.0.1" in " ".join(argv)


class _StubHandler(BaseHTTPRequestHandler):
    """Answers /healthz with the status stored on its server (`server.status`)."""

    def do_GET(self) -> None:
        code = getattr(self.server, "status", 200) if self.path == "/healthz" else 404
        body = b'{"status":"ok"}' if code == 200 else b"{}"
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        """Keep the test output quiet."""


@pytest.fixture
def stub_server() -> Iterator[ThreadingHTTPServer]:
    """A loopback HTTP server standing in for the API, to run the real HEALTHCHECK command at."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _StubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def _probe(port: int) -> int:
    """Exit code of the HEALTHCHECK command, with a dead proxy configured that it must bypass."""
    argv = [sys.executable, *_healthcheck_argv()[1:]]
    dead_proxy = "http://127.0.0.1:9"
    env = {"PORT": str(port), "HTTP_PROXY": dead_proxy, "http_proxy": dead_proxy}
    return _run(argv, env=env).returncode


def test_healthcheck_command_passes_on_200_and_fails_otherwise(
    stub_server: ThreadingHTTPServer,
) -> None:
    """Run the Dockerfile's probe itself: healthy on 200, unhealthy on 503 or a closed port."""
    port = stub_server.server_address[1]
    assert _probe(port) == 0
    stub_server.status = 503  # type: ignore[attr-defined]
    assert _probe(port) != 0
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]
    assert _probe(closed_port) != 0


# --- .dockerignore -------------------------------------------------------------------------------


def _dockerignore_patterns() -> list[str]:
    lines = (line.strip() for line in DOCKERIGNORE.read_text().splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def test_dockerignore_keeps_what_the_dockerfile_copies() -> None:
    patterns = _dockerignore_patterns()
    for src in _context_sources():
        probes = [src] if "." in src else [src, f"{src}/__init__.py", f"{src}/schema.sql"]
        for probe in probes:
            assert not _ignored(probe, patterns), f".dockerignore drops {probe}, which COPY needs"


def test_dockerignore_drops_repo_clutter_and_dev_files() -> None:
    patterns = _dockerignore_patterns()
    for path in (
        ".git/HEAD",
        ".venv/bin/python",
        ".env",
        "tests/test_docker.py",
        "requirements-dev.txt",
        "docker-compose.yml",
        "faststock/__pycache__/config.cpython-311.pyc",
    ):
        assert _ignored(path, patterns), f"{path} would be sent to the Docker build context"


def test_copied_files_exist() -> None:
    """Every context path the Dockerfile copies, and the WSGI module the CMD names, exist."""
    for src in _context_sources():
        assert (ROOT / src).exists(), f"Dockerfile copies missing {src}"
    assert (ROOT / "faststock" / "wsgi.py").is_file()


# --- docker-compose.yml --------------------------------------------------------------------------


def test_compose_matches_compose_spec_schema() -> None:
    """check-jsonschema ships the compose-spec schema, so this works offline."""
    result = _run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)]
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "version" not in _compose(), "the Compose specification has no top-level version:"


def test_api_environment_is_exactly_what_the_app_reads() -> None:
    """No typo'd or stale variable is set, every Config field is, and together they validate."""
    from faststock.config import Config

    env = _environment(_service("api"))
    config_names = _config_env_names()
    unknown = set(env) - config_names - EXTRA_ENV
    assert not unknown, f"api sets variables the app never reads: {sorted(unknown)}"
    missing = config_names - set(env)
    assert not missing, f"api leaves Config variables unset: {sorted(missing)}"
    config = Config.from_env({k: v for k, v in env.items() if k in config_names})
    container_ports = {str(p).split("/")[0] for p in _service("api")["expose"]}
    assert str(config.port) in container_ports, (config.port, container_ports)
    assert config.host == "0.0.0.0", "a loopback bind inside the container cannot be reached"


def test_api_urls_point_at_the_compose_services() -> None:
    env = _environment(_service("api"))
    pg_env = _environment(_service("postgres"))
    db = urlsplit(env["DATABASE_URL"])
    assert db.scheme in ("postgresql", "postgres") and db.hostname == "postgres"
    assert (db.username, db.password, db.path.lstrip("/")) == (
        pg_env["POSTGRES_USER"],
        pg_env["POSTGRES_PASSWORD"],
        pg_env["POSTGRES_DB"],
    )
    redis = urlsplit(env["REDIS_URL"])
    assert redis.scheme == "redis" and redis.hostname == "redis"


def test_api_runs_gunicorn_with_config_and_wsgi_app() -> None:
    """The command compose runs for api: its own, or else the image's CMD."""
    api = _service("api")
    assert "entrypoint" not in api
    argv = _command(api) or _exec_form(_args(_final_stage(), "CMD")[-1])
    assert argv[0] == "gunicorn", argv
    assert argv[argv.index("-c") + 1] == "gunicorn.conf.py", argv
    assert argv[-1] == "faststock.wsgi:app", argv


def test_api_waits_for_healthy_backends_and_finished_migration() -> None:
    depends = _service("api")["depends_on"]
    assert depends["postgres"]["condition"] == "service_healthy"
    assert depends["redis"]["condition"] == "service_healthy"
    assert depends["migrate"]["condition"] == "service_completed_successfully"
    migrate = _service("migrate")
    assert migrate["depends_on"]["postgres"]["condition"] == "service_healthy"
    # seed clears the cache; with Redis not up yet it would warn, and the API serve stale entries
    assert migrate["depends_on"]["redis"]["condition"] == "service_healthy"
    assert migrate.get("restart") == "no"
    assert _service("api").get("build") == migrate.get("build"), "both must run the same image"


def _seconds(duration: str) -> float:
    """A Compose duration ("1m30s", "35s", "500ms") in seconds."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def test_api_stop_grace_period_covers_gunicorn_graceful_timeout() -> None:
    """Docker sends SIGKILL 10 s after SIGTERM unless told otherwise: too soon for in-flight
    requests, which gunicorn gives graceful_timeout seconds to finish."""
    found = re.search(r"^graceful_timeout = (\d+)", (ROOT / "gunicorn.conf.py").read_text(), re.M)
    assert found, "gunicorn.conf.py sets no graceful_timeout"
    grace = _service("api").get("stop_grace_period")
    assert grace is not None, "api has no stop_grace_period: Docker would wait 10 s"
    assert _seconds(str(grace)) > int(found.group(1)), grace


def _migrate_steps() -> list[list[str]]:
    """migrate's `sh -c "a && b"` steps as argv lists; each must be `flask --app faststock ...`."""
    argv = _command(_service("migrate"))
    assert argv[:2] == ["sh", "-c"] and len(argv) == 3, argv
    assert "||" not in argv[2] and ";" not in argv[2], "a failed step must fail the service"
    steps = [shlex.split(step) for step in argv[2].split("&&")]
    for step in steps:
        assert step[:3] == ["flask", "--app", "faststock"], step
    return [step[3:] for step in steps]


def test_migrate_runs_init_db_then_seed() -> None:
    names = [step[0] for step in _migrate_steps()]
    assert names == ["init-db", "seed"], names


def test_migrate_commands_exist_in_the_flask_cli(monkeypatch: pytest.MonkeyPatch) -> None:
    """Load the app the way `flask --app faststock` does in the container (no DB connection at
    creation) and parse each migrate step with the real click command, options included."""
    from flask.cli import ScriptInfo

    for name in _config_env_names() | EXTRA_ENV:
        monkeypatch.delenv(name, raising=False)
    for name, value in _environment(_service("migrate")).items():
        monkeypatch.setenv(name, value)
    monkeypatch.chdir(ROOT)  # the image's WORKDIR holds the faststock package
    app = ScriptInfo(app_import_path="faststock", set_debug_flag=False).load_app()

    commands = app.cli.commands
    assert "init-db" in commands and "seed" in commands, sorted(commands)
    seed_options = {opt for param in commands["seed"].params for opt in param.opts}
    assert {"--products", "--reset", "--if-empty"} <= seed_options, seed_options
    for name, *args in _migrate_steps():
        # make_context parses and type-checks the arguments without invoking the command.
        commands[name].make_context(name, list(args))


# --- several instances behind nginx --------------------------------------------------------------

NGINX_CONF = ROOT / "deploy" / "nginx.conf"


def _nginx_args(directive: str) -> list[str]:
    """The arguments of each `directive ...;` in deploy/nginx.conf, comments left out. (nginx -t
    of the file itself runs in tests/test_instances.py, where nginx is installed.)"""
    text = re.sub(r"#[^\n]*", "", NGINX_CONF.read_text())
    return [
        " ".join(m.group(1).split())
        for m in re.finditer(rf"(?m)^\s*{directive}\s+([^;{{}}]*);", text)
    ]


def test_api_publishes_no_host_port_so_it_scales() -> None:
    """`docker compose up --scale api=3`: a host port can be bound by one replica only, and a
    container name allows one container only; nginx is the way in."""
    api = _service("api")
    assert "ports" not in api, "a published port makes every replica after the first fail"
    assert "container_name" not in api
    assert [str(p) for p in api["expose"]] == [_environment(api)["PORT"]]


def test_nginx_serves_port_8000_and_proxies_to_every_api_replica() -> None:
    nginx = _service("nginx")
    assert [str(p) for p in nginx["ports"]] == ["8000:8000"]
    assert _nginx_args("listen") == ["8000"]
    port = _environment(_service("api"))["PORT"]
    servers = [args.split() for args in _nginx_args("server")]
    assert len(servers) == 1 and servers[0][0] == f"api:{port}", servers
    # Docker's DNS answers `api` with every replica; `resolve` asks it again while nginx runs.
    assert "resolve" in servers[0], servers
    assert _nginx_args("resolver")[0].split()[0] == "127.0.0.11"
    assert nginx["depends_on"]["api"]["condition"] == "service_healthy"


def test_nginx_image_knows_the_upstream_resolve_parameter() -> None:
    """Open-source nginx has `server ... resolve` since 1.27.3: an older image refuses the file."""
    name, _, tag = _service("nginx")["image"].partition(":")
    assert name == "nginx", name
    found = re.match(r"(\d+)\.(\d+)\.(\d+)", tag)
    assert found, f"pin a full nginx version, not {tag!r}"
    assert tuple(map(int, found.groups())) >= (1, 27, 3), tag


def test_nginx_reads_deploy_nginx_conf_read_only() -> None:
    volumes = [str(v) for v in _service("nginx")["volumes"]]
    assert volumes == ["./deploy/nginx.conf:/etc/nginx/nginx.conf:ro"], volumes
    assert _mounted_file("nginx", "/etc/nginx/nginx.conf") == NGINX_CONF


def test_nginx_health_check_probes_a_location_nginx_answers_itself() -> None:
    argv = _service("nginx")["healthcheck"]["test"]
    url = urlsplit(argv[-1])
    assert argv[0] == "CMD" and url.port == 8000, argv
    assert f"location = {url.path} " in NGINX_CONF.read_text(), url.path


# --- monitoring ----------------------------------------------------------------------------------


def _bind_mounts(service: str) -> dict[str, Path]:
    """Container path -> host path of a service's bind mounts (the short `./src:/dst:ro` form)."""
    mounts = {}
    for volume in _service(service).get("volumes", []):
        source, target, *_ = str(volume).split(":")
        if source.startswith((".", "/")):
            mounts[target] = (ROOT / source).resolve()
    return mounts


def _mounted_file(service: str, target: str) -> Path:
    """The repository file a service sees at `target`, mounted itself or inside a mounted folder."""
    for inside, host in _bind_mounts(service).items():
        if target == inside:
            return host
        if target.startswith(inside.rstrip("/") + "/"):
            return host / target[len(inside.rstrip("/")) + 1 :]
    raise AssertionError(f"{service} mounts nothing at {target}")


def _mounted_config(service: str, target: str) -> dict[str, Any]:
    return yaml.safe_load(_mounted_file(service, target).read_text())


PROMETHEUS_CONFIG = "/etc/prometheus/prometheus.yml"


def test_monitoring_reads_its_files_from_deploy_read_only() -> None:
    """Bind mounts of files kept in the repository under deploy/, instead of inline `configs:`:
    a mount whose source is missing makes Docker create an empty directory in its place."""
    assert "configs" not in _compose(), "the monitoring settings live in deploy/ now"
    for name in ("prometheus", "grafana"):
        volumes = [str(v) for v in _service(name).get("volumes", [])]
        assert volumes, f"{name} mounts nothing"
        for volume in volumes:
            source, mode = volume.split(":")[0], volume.split(":")[-1]
            assert source.startswith("./deploy/"), volume
            assert mode == "ro", f"{name} may write to the repository through {volume}"
        for inside, host in _bind_mounts(name).items():
            assert host.exists(), f"{name} mounts {host} at {inside}, which does not exist"
            assert host.is_relative_to(ROOT / "deploy"), host


def test_prometheus_scrapes_api_metrics_every_5s() -> None:
    config = _mounted_config("prometheus", PROMETHEUS_CONFIG)
    port = _environment(_service("api"))["PORT"]
    # By DNS: every replica of a scaled `api` service is a target of its own.
    jobs = [
        job
        for job in config["scrape_configs"]
        if any(
            sc.get("names") == ["api"] and sc.get("type") == "A" and str(sc.get("port")) == port
            for sc in job.get("dns_sd_configs", [])
        )
    ]
    assert jobs, config
    job = jobs[0]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job.get("scrape_interval", config.get("global", {}).get("scrape_interval")) == "5s"


def test_prometheus_container_sees_its_alert_rules() -> None:
    """rule_files are relative to the config file: each must be mounted beside it."""
    rule_files = _mounted_config("prometheus", PROMETHEUS_CONFIG).get("rule_files")
    assert rule_files, "Prometheus loads no alert rules"
    for name in rule_files:
        inside = name if name.startswith("/") else f"{PROMETHEUS_CONFIG.rsplit('/', 1)[0]}/{name}"
        assert _mounted_file("prometheus", inside).is_file(), inside
    assert _mounted_file("prometheus", "/etc/prometheus/alerts.yml") == (
        ROOT / "deploy" / "prometheus" / "alerts.yml"
    )


def test_grafana_provisions_prometheus_without_anonymous_access() -> None:
    target = "/etc/grafana/provisioning/datasources/prometheus.yml"
    sources = _mounted_config("grafana", target)["datasources"]
    assert any(
        s["type"] == "prometheus" and urlsplit(s["url"]).hostname == "prometheus" for s in sources
    ), sources
    # $__rate_interval is four times timeInterval: it must be the real scrape interval.
    scrape = _mounted_config("prometheus", PROMETHEUS_CONFIG)["global"]["scrape_interval"]
    assert {s.get("jsonData", {}).get("timeInterval") for s in sources} == {scrape}
    grafana = _service("grafana")
    assert _environment(grafana).get("GF_AUTH_ANONYMOUS_ENABLED") == "false"
    assert "GF_AUTH_ANONYMOUS_ORG_ROLE" not in _environment(grafana)
    assert "prometheus" in grafana["depends_on"]


def test_grafana_provisions_the_generated_dashboard() -> None:
    """The provider's folder is mounted and holds deploy/grafana/dashboards/faststock.json, whose
    panels query a datasource that is provisioned."""
    provider_file = "/etc/grafana/provisioning/dashboards/faststock.yml"
    providers = _mounted_config("grafana", provider_file)["providers"]
    assert [p["type"] for p in providers] == ["file"], providers
    folder = _mounted_file("grafana", providers[0]["options"]["path"])
    assert folder == ROOT / "deploy" / "grafana" / "dashboards"
    dashboard = json.loads((folder / "faststock.json").read_text())
    target = "/etc/grafana/provisioning/datasources/prometheus.yml"
    uids = {s["uid"] for s in _mounted_config("grafana", target)["datasources"]}
    panels = [p for p in dashboard["panels"] if p.get("type") != "row"]
    assert panels, "the dashboard has no panels"
    for panel in panels:
        assert panel["datasource"]["uid"] in uids, panel["title"]
    home = _environment(_service("grafana"))["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert _mounted_file("grafana", home) == folder / "faststock.json"


def test_compose_images_are_pinned() -> None:
    """A floating `latest` makes `docker compose up` change behaviour from one day to the next."""
    for name, service in _compose()["services"].items():
        image = service.get("image")
        if image is None:
            assert "build" in service, name
            continue
        tag = image.rsplit("/", 1)[-1].partition(":")[2]
        assert tag and tag != "latest", f"{name}: pin a tag for {image}"


# --- the development API key ---------------------------------------------------------------------


def _volume_at(service: str, target: str) -> tuple[str, bool]:
    """(named volume, read-only) a service mounts at `target`."""
    for entry in _service(service).get("volumes", []):
        source, _, rest = str(entry).partition(":")
        inside, _, mode = rest.partition(":")
        if inside == target:
            return source, mode == "ro"
    raise AssertionError(f"{service} mounts no volume at {target}")


def test_api_key_service_makes_a_key_the_api_accepts(tmp_path: Path) -> None:
    """Runs the one-shot's script (with its volume in a temporary folder) twice, as two `up`s
    would: one key, made once, printed each time, whose entry the api reads (API_KEYS_FILE
    inside the same volume, mounted read-only) and accepts."""
    from faststock.auth import Keys
    from faststock.config import Config

    api_env = _environment(_service("api"))
    keys_file = Path(api_env["API_KEYS_FILE"])
    volume, read_only = _volume_at("api", str(keys_file.parent))
    assert read_only and _volume_at("api-key", str(keys_file.parent)) == (volume, False)
    assert volume in _compose()["volumes"]
    assert _service("api")["depends_on"]["api-key"]["condition"] == "service_completed_successfully"
    assert api_env["ALLOW_ANONYMOUS_WRITES"] == "0"

    argv = _command(_service("api-key"))
    assert argv[:2] == ["sh", "-ec"], argv
    script = argv[2].replace("$$", "$").replace(str(keys_file.parent), str(tmp_path))
    env = {"PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin"}
    printed = [_run(["sh", "-ec", script], env=env) for _ in range(2)]
    for result in printed:
        assert result.returncode == 0, result.stdout + result.stderr
    assert printed[0].stdout == printed[1].stdout, "a second `up` made another key"
    key = re.search(r"Authorization: Bearer (\S+)", printed[0].stdout).group(1)
    config = Config(api_keys_file=str(tmp_path / keys_file.name))
    assert Keys(config.read_api_keys()).identify(f"Bearer {key}") == "dev"
    assert (tmp_path / keys_file.name).stat().st_mode & 0o777 == 0o644  # the api's user reads it
    assert (tmp_path / "dev-key").stat().st_mode & 0o077 == 0  # the key itself: root's only
