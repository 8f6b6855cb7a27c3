# shellcheck shell=bash
# Shared by scripts/up, scripts/test, scripts/bench and scripts/servers: installs what the project
# needs and starts/stops throwaway PostgreSQL and Redis servers. Source it; it defines functions only.

FS_ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
FS_VENV="${FS_VENV:-$FS_ROOT/.venv}"
FS_RUN="${FS_RUN:-$FS_ROOT/.run}"

fs_log() { printf '[faststock] %s\n' "$*" >&2; }
fs_die() { fs_log "error: $*"; exit 1; }

fs_sudo() {
  if [ "$(id -u)" = 0 ]; then "$@"
  elif command -v sudo >/dev/null 2>&1; then sudo "$@"
  else fs_die "need root or sudo to run: $*"; fi
}

fs_apt_install() {
  command -v apt-get >/dev/null 2>&1 || return 1
  fs_log "installing $* with apt-get"
  if [ -z "${FS_APT_UPDATED:-}" ]; then
    fs_sudo env DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 || return 1
    FS_APT_UPDATED=1
  fi
  fs_sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@" >&2
}

fs_brew_install() {
  command -v brew >/dev/null 2>&1 || return 1
  fs_log "installing $* with Homebrew"
  brew install "$@" >&2
}

# fs_stamp_has FILE LINE...: FILE exists and has each LINE as one of its lines.
fs_stamp_has() {
  local file=$1 line
  shift
  for line in "$@"; do grep -qxF -- "$line" "$file" 2>/dev/null || return 1; done
}

# fs_ensure_venv [dev]: .venv with requirements.txt (and requirements-dev.txt for "dev"). The stamp
# lists each requirements file installed and its checksum, and a call installs only when a file it
# needs is not listed as it is now: a dev install (requirements-dev.txt includes requirements.txt)
# also satisfies scripts/up, so switching between scripts/up, scripts/test and scripts/bench
# installs nothing. Installs are serialised by a lock, for two scripts started at once.
fs_ensure_venv() {
  local names=(requirements.txt) want=() stamp="$FS_VENV/.faststock-installed" py name
  [ "${1:-}" = dev ] && names+=(requirements-dev.txt)
  py=${PYTHON:-$(command -v python3)} ||
    fs_die "python3 (3.11 or newer) is needed"
  "$py" -c 'import sys; sys.exit(sys.version_info < (3, 11))' || fs_die "$py is older than Python 3.11"
  if [ ! -x "$FS_VENV/bin/python" ]; then
    fs_log "creating $FS_VENV"
    "$py" -m venv "$FS_VENV" || {
      fs_apt_install python3-venv && "$py" -m venv "$FS_VENV"
    } || fs_die "could not create a virtualenv with $py"
  fi
  for name in "${names[@]}"; do want+=("$name $(cksum <"$FS_ROOT/$name")"); done
  if ! fs_stamp_has "$stamp" "${want[@]}"; then
    exec 8>"$FS_VENV/.faststock-lock"
    "$py" -c 'import fcntl; fcntl.flock(8, fcntl.LOCK_EX)'
    if ! fs_stamp_has "$stamp" "${want[@]}"; then # unless another script installed it while we waited
      fs_log "installing Python packages into $FS_VENV"
      "$FS_VENV/bin/python" -m pip install -q --disable-pip-version-check --upgrade pip >&2
      local args=()
      for name in "${names[@]}"; do args+=(-r "$FS_ROOT/$name"); done
      "$FS_VENV/bin/python" -m pip install -q --disable-pip-version-check "${args[@]}" >&2 ||
        fs_die "pip install failed"
      printf '%s\n' "${want[@]}" >"$stamp"
    fi
    exec 8>&-
  fi
  export PATH="$FS_VENV/bin:$PATH"
}

fs_find_pg_bin() {
  local d
  if command -v pg_ctl >/dev/null 2>&1 && command -v initdb >/dev/null 2>&1; then
    d=$(dirname "$(readlink -f "$(command -v pg_ctl)")")
    [ -x "$d/initdb" ] && [ -x "$d/psql" ] && { echo "$d"; return 0; }
  fi
  # shellcheck disable=SC2012 # the only names here are /usr/lib/postgresql/NN/bin
  for d in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r) \
    /opt/homebrew/opt/postgresql@*/bin /usr/local/opt/postgresql@*/bin; do
    [ -x "$d/pg_ctl" ] && [ -x "$d/initdb" ] && { echo "$d"; return 0; }
  done
  return 1
}

# fs_ensure_pg: sets FS_PG_BIN to a directory holding initdb and pg_ctl, installing them if needed.
fs_ensure_pg() {
  FS_PG_BIN=$(fs_find_pg_bin) || {
    fs_apt_install postgresql postgresql-contrib || fs_brew_install postgresql@16 ||
      fs_die "PostgreSQL is missing and neither apt-get nor brew could install it"
    FS_PG_BIN=$(fs_find_pg_bin) || fs_die "PostgreSQL installed but initdb/pg_ctl not found"
  }
  export FS_PG_BIN
}

# fs_ensure_redis: sets FS_REDIS_SERVER, installing Redis if needed.
fs_ensure_redis() {
  FS_REDIS_SERVER=$(command -v redis-server) || {
    fs_apt_install redis-server || fs_brew_install redis ||
      fs_die "redis-server is missing and neither apt-get nor brew could install it"
    FS_REDIS_SERVER=$(command -v redis-server) || fs_die "redis-server installed but not on PATH"
  }
  export FS_REDIS_SERVER
}

# fs_ensure_prometheus: sets FS_PROMETHEUS and FS_PROMTOOL, installing them if needed (the test
# suite checks deploy/prometheus and runs a Prometheus of its own). Debian's package would start
# its own Prometheus: see fs_install_without_starting.
fs_ensure_prometheus() {
  if ! command -v prometheus >/dev/null 2>&1 || ! command -v promtool >/dev/null 2>&1; then
    fs_install_without_starting prometheus prometheus prometheus
  fi
  FS_PROMETHEUS=$(command -v prometheus) || fs_die "prometheus installed but not on PATH"
  FS_PROMTOOL=$(command -v promtool) || fs_die "promtool installed but not on PATH"
  export FS_PROMETHEUS FS_PROMTOOL
}

# fs_find_sbin NAME: the path of a server binary, on PATH or where Debian puts pgbouncer and
# nginx, in /usr/sbin, off a user's PATH (FS_SBIN: that directory, for the tests).
fs_find_sbin() {
  local name=$1 sbin=${FS_SBIN:-/usr/sbin}
  command -v "$name" 2>/dev/null && return 0
  [ -x "$sbin/$name" ] && { echo "$sbin/$name"; return 0; }
  return 1
}

# fs_ensure_pgbouncer: sets FS_PGBOUNCER, installing PgBouncer if needed (tests/test_pgbouncer.py
# runs the API through one of its own). Debian's package would start a pgbouncer service on port
# 6432: see fs_install_without_starting.
fs_ensure_pgbouncer() {
  if ! FS_PGBOUNCER=$(fs_find_sbin pgbouncer); then
    fs_install_without_starting pgbouncer pgbouncer pgbouncer
    FS_PGBOUNCER=$(fs_find_sbin pgbouncer) || fs_die "pgbouncer installed but not found"
  fi
  export FS_PGBOUNCER
}

# fs_install_without_starting SERVICE APT_PACKAGE BREW_PACKAGE: install a package whose Debian
# postinst would start SERVICE, without letting it: recommends skipped, a policy-rc.d refusing
# every service start in place during the install unless the machine has one of its own
# (FS_POLICY_RC_D: its path, for the tests), and the service stopped and disabled if it started
# anyway. fs_ensure_prometheus, fs_ensure_pgbouncer and fs_ensure_nginx install through it.
fs_install_without_starting() {
  local service=$1 apt_package=$2 brew_package=$3
  local policy=${FS_POLICY_RC_D:-/usr/sbin/policy-rc.d} added='' installed=''
  # Ours is marked, so that one left behind by an interrupted install is still removed.
  if command -v apt-get >/dev/null 2>&1 && { [ ! -e "$policy" ] || grep -q faststock "$policy"; }; then
    printf '#!/bin/sh\n# faststock: no service starts during an install\nexit 101\n' |
      fs_sudo tee "$policy" >/dev/null && fs_sudo chmod 755 "$policy" && added=1
  fi
  if fs_apt_install "$apt_package"; then installed=1; fi
  if [ -n "$added" ]; then fs_sudo rm -f "$policy"; fi
  if [ -z "$installed" ]; then
    fs_brew_install "$brew_package" ||
      fs_die "$apt_package is missing and neither apt-get nor brew could install it"
  fi
  if command -v systemctl >/dev/null 2>&1 && systemctl is-active --quiet "$service" 2>/dev/null; then
    fs_log "stopping the $service service the package started"
    fs_sudo systemctl disable --now "$service" >/dev/null 2>&1 || true
  elif [ -x "/etc/init.d/$service" ] && "/etc/init.d/$service" status >/dev/null 2>&1; then
    fs_log "stopping the $service service the package started"
    fs_sudo "/etc/init.d/$service" stop >/dev/null 2>&1 || true
  fi
}

# fs_ensure_nginx: sets FS_NGINX, installing nginx if needed (tests/test_instances.py runs one
# in front of two gunicorn instances, on a loopback port with every file under its tmp dir).
# Debian's package would start an nginx on port 80: see fs_install_without_starting.
fs_ensure_nginx() {
  if ! FS_NGINX=$(fs_find_sbin nginx); then
    fs_install_without_starting nginx nginx nginx
    FS_NGINX=$(fs_find_sbin nginx) || fs_die "nginx installed but not found"
  fi
  export FS_NGINX
}

fs_free_port() {
  python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'
}

# fs_bind_error HOST PORT: fails, printing why, unless HOST:PORT can be bound now. SO_REUSEADDR
# as gunicorn sets it, so that a closed connection lingering in TIME_WAIT does not count.
fs_bind_error() {
  python3 - "$1" "$2" <<'PY'
import socket, sys
try:
    host, port = sys.argv[1], int(sys.argv[2])
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(address)
except OSError as exc:
    print(exc.strerror or exc)
    sys.exit(1)
PY
}

# fs_lock FILE: take an exclusive lock on FILE, held until this shell exits, or fail at once if
# another process holds it. It lives on file descriptor 9, which the servers started here close,
# so that a server outliving its script never holds the lock.
fs_lock() {
  exec 9>"$1"
  python3 -c 'import fcntl; fcntl.flock(9, fcntl.LOCK_EX | fcntl.LOCK_NB)' 2>/dev/null
}

# PostgreSQL refuses to run as root; as root we run it as an unprivileged account.
fs_pg_user() {
  [ "$(id -u)" = 0 ] || { id -un; return 0; }
  if id postgres >/dev/null 2>&1; then echo postgres; return 0; fi
  id faststock >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin faststock
  echo faststock
}

fs_as_pg_user() {
  if [ "$(id -u)" = 0 ]; then runuser -u "$(fs_pg_user)" -- "$@"; else "$@"; fi
}

# The data directory for a server kept in DIR: DIR/data, unless the unprivileged account cannot reach
# DIR (a checkout under /root, say); then a private directory under /tmp, recorded in DIR/datadir.
fs_pg_datadir() {
  local dir=$1 user
  if [ -f "$dir/datadir" ]; then cat "$dir/datadir"; return 0; fi
  mkdir -p "$dir"
  if [ "$(id -u)" != 0 ]; then echo "$dir/data"; return 0; fi
  user=$(fs_pg_user)
  mkdir -p "$dir/data" && chown "$user" "$dir/data" && chmod 700 "$dir/data"
  if runuser -u "$user" -- test -w "$dir/data"; then
    echo "$dir/data"
  else
    rmdir "$dir/data"
    local tmp
    tmp=$(mktemp -d "${TMPDIR:-/tmp}/faststock-pg.XXXXXX") && chown "$user" "$tmp"
    echo "$tmp" >"$dir/datadir"
    echo "$tmp"
  fi
}

# fs_pg_start DIR PORT: a throwaway cluster in DIR listening on 127.0.0.1:PORT with a "faststock"
# superuser and database (trust auth: it only listens on loopback). No replica is ever made of it,
# so WAL is minimal (a COPY into a table truncated in the same transaction, as `seed --reset`
# does, writes none) and kept small: without limits a few million-row seeds leave ~0.5 GB of WAL.
# FS_PG_FAST=1 turns off fsync; FS_PG_OPTS adds server options (the suite loads
# pg_stat_statements to count queries).
fs_pg_start() {
  local dir=$1 port=$2 data opts
  [ -n "${FS_PG_BIN:-}" ] || fs_ensure_pg
  data=$(fs_pg_datadir "$dir")
  if [ ! -f "$data/PG_VERSION" ]; then
    fs_as_pg_user "$FS_PG_BIN/initdb" -D "$data" -U faststock --auth=trust -E UTF8 --no-locale \
      >"$dir/initdb.log" 2>&1 || { cat "$dir/initdb.log" >&2; fs_die "initdb failed"; }
  fi
  opts="-c listen_addresses=127.0.0.1 -c port=$port -c unix_socket_directories='' -c max_connections=300"
  opts="$opts -c wal_level=minimal -c max_wal_senders=0 -c max_wal_size=128MB -c min_wal_size=32MB"
  if [ "${FS_PG_FAST:-0}" = 1 ]; then
    opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  opts="$opts ${FS_PG_OPTS:-}"
  fs_as_pg_user "$FS_PG_BIN/pg_ctl" -D "$data" -o "$opts" -l "$data/server.log" -w -t 60 start >/dev/null 9>&- ||
    { tail -n 20 "$data/server.log" >&2; fs_die "PostgreSQL did not start"; }
  echo "$port" >"$dir/port"
  "$FS_PG_BIN/psql" -h 127.0.0.1 -p "$port" -U faststock -d postgres -tAq \
    -c "SELECT 1 FROM pg_database WHERE datname = 'faststock'" | grep -q 1 ||
    "$FS_PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U faststock faststock
}

fs_pg_stop() {
  local dir=$1 data
  [ -d "$dir" ] || return 0
  [ -n "${FS_PG_BIN:-}" ] || FS_PG_BIN=$(fs_find_pg_bin) || return 0
  data=$(fs_pg_datadir "$dir")
  [ -f "$data/postmaster.pid" ] || return 0
  fs_as_pg_user "$FS_PG_BIN/pg_ctl" -D "$data" -m fast -w -t 60 stop >/dev/null 2>&1 || true
}

# fs_pg_destroy DIR: stop the server and remove its files, wherever they live.
fs_pg_destroy() {
  local dir=$1
  fs_pg_stop "$dir"
  [ -f "$dir/datadir" ] && rm -rf "$(cat "$dir/datadir")"
  rm -rf "$dir"
}

# fs_pg_basebackup DIR PRIMARY_PORT: make DIR's data directory a streaming replica of the server on
# 127.0.0.1:PRIMARY_PORT (pg_basebackup -R: a copy plus standby.signal and primary_conninfo), for
# tests/test_replicas.py; `fs_pg_start DIR PORT` then starts it as a hot standby. The primary must
# run with wal_level=replica and max_wal_senders > 0 (FS_PG_OPTS), which fs_pg_start's own
# defaults turn off; the replica needs the same FS_PG_OPTS (a standby refuses to start with a
# smaller max_wal_senders than its primary's).
fs_pg_basebackup() {
  local dir=$1 primary=$2 data
  [ -n "${FS_PG_BIN:-}" ] || fs_ensure_pg
  data=$(fs_pg_datadir "$dir")
  [ -f "$data/PG_VERSION" ] && return 0
  fs_as_pg_user "$FS_PG_BIN/pg_basebackup" -h 127.0.0.1 -p "$primary" -U faststock -D "$data" \
    -R -X stream -c fast >"$dir/basebackup.log" 2>&1 9>&- ||
    { cat "$dir/basebackup.log" >&2; fs_die "pg_basebackup from port $primary failed"; }
  rm -f "$data/server.log" # the primary's log came with the copy
}

# fs_redis_start DIR PORT [OPTION...]: a throwaway, non-persistent Redis on 127.0.0.1:PORT. The
# options go to redis-server as they are (`--replicaof 127.0.0.1 6379` makes a replica).
fs_redis_start() {
  local dir=$1 port=$2
  shift 2
  [ -n "${FS_REDIS_SERVER:-}" ] || fs_ensure_redis
  mkdir -p "$dir"
  "$FS_REDIS_SERVER" --port "$port" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
    --pidfile "$dir/redis.pid" --logfile "$dir/redis.log" --dir "$dir" --maxclients 10000 "$@" 9>&- ||
    fs_die "redis-server did not start"
  echo "$port" >"$dir/port"
  fs_redis_wait "$port"
}

# fs_sentinel_start DIR PORT MASTER_PORT NAME [QUORUM]: a Redis Sentinel on 127.0.0.1:PORT watching
# the master on 127.0.0.1:MASTER_PORT under NAME (quorum 2 unless given); stop it with
# fs_redis_stop DIR. FS_SENTINEL_DOWN_MS and FS_SENTINEL_FAILOVER_MS set down-after-milliseconds
# and failover-timeout (Sentinel's own defaults, 30 s and 3 min, otherwise). It is redis-server in
# Sentinel mode: Debian's redis-sentinel package adds only a link to that same binary and a
# system service, so nothing more is installed.
fs_sentinel_start() {
  local dir=$1 port=$2 master=$3 name=$4 quorum=${5:-2}
  [ -n "${FS_REDIS_SERVER:-}" ] || fs_ensure_redis
  mkdir -p "$dir"
  {
    echo "port $port"
    echo "bind 127.0.0.1"
    echo "dir \"$dir\""
    echo "sentinel monitor $name 127.0.0.1 $master $quorum"
    if [ -n "${FS_SENTINEL_DOWN_MS:-}" ]; then
      echo "sentinel down-after-milliseconds $name $FS_SENTINEL_DOWN_MS"
    fi
    if [ -n "${FS_SENTINEL_FAILOVER_MS:-}" ]; then
      echo "sentinel failover-timeout $name $FS_SENTINEL_FAILOVER_MS"
    fi
  } >"$dir/sentinel.conf" # Sentinel rewrites it as it learns: a file of its own
  "$FS_REDIS_SERVER" "$dir/sentinel.conf" --sentinel --daemonize yes --pidfile "$dir/redis.pid" \
    --logfile "$dir/redis.log" 9>&- || fs_die "redis-server --sentinel did not start"
  echo "$port" >"$dir/port"
  fs_redis_wait "$port"
}

# fs_redis_wait PORT: until the Redis (or Sentinel) on 127.0.0.1:PORT answers PING.
fs_redis_wait() {
  local port=$1
  for _ in $(seq 1 200); do
    if python3 - "$port" <<'PY' 2>/dev/null; then return 0; fi
import socket, sys
s = socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=1)
s.sendall(b"PING\r\n")
sys.exit(0 if s.recv(16).startswith(b"+PONG") else 1)
PY
    sleep 0.05
  done
  fs_die "Redis on port $port did not answer"
}

# fs_alive PID: running, not merely a zombie waiting for a parent that does not reap it.
# The state is the field after the last ")" of /proc/PID/stat: the name before it may contain
# spaces ("gunicorn: master"). Without /proc (macOS), kill -0 is the best there is.
fs_alive() {
  local stat
  [ -d /proc/self ] || { kill -0 "$1" 2>/dev/null; return; }
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  [ "${stat%% *}" != Z ]
}

fs_redis_stop() {
  local dir=$1 pid
  [ -f "$dir/redis.pid" ] || return 0
  pid=$(cat "$dir/redis.pid")
  kill -CONT "$pid" 2>/dev/null || true
  kill -TERM "$pid" 2>/dev/null || { rm -f "$dir/redis.pid"; return 0; }
  for _ in $(seq 1 200); do
    fs_alive "$pid" || break
    sleep 0.05
  done
  kill -KILL "$pid" 2>/dev/null || true
  rm -f "$dir/redis.pid"
}
