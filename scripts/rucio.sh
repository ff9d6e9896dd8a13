#!/usr/bin/env bash
# A real Rucio 41.5.1 server for the tests: the PyPI package `rucio` (its Flask REST app)
# served by gunicorn on plain http, on a PostgreSQL 15 cluster of Debian's `postgresql`
# package, all under a cache outside the clone (RUCIO_BASE, default /var/tmp/dcflow-rucio).
# No Rucio daemons: the catalog calls (accounts, RSEs, scopes, DIDs, replicas) need none.
#   scripts/rucio.sh build   install once (~50 s; a second call does nothing)
#   scripts/rucio.sh start   PostgreSQL + Rucio; prints `export DCFLOW_RUCIO=...` lines
#   scripts/rucio.sh stop
#   scripts/rucio.sh env     the export lines
# The account is `root`, signed in as userpass `ddmlab` / `secret`. RUCIO_PORT (18080) and
# RUCIO_PG_PORT (15432) are read by every command.
# For X.509 sign-in, a second gunicorn serves the same app over https on RUCIO_X509_PORT
# (18443), asking for a client certificate (RFC 3820 proxies allowed) and handing its subject
# to Rucio as SSL_CLIENT_S_DN, in mod_ssl's legacy form (/C=../O=../CN=..), as Apache does
# in front of a production Rucio. Its test CA, host and user certificates are made once with
# openssl under $BASE/x509.
set -euo pipefail
BASE=${RUCIO_BASE:-/var/tmp/dcflow-rucio}
PG_PORT=${RUCIO_PG_PORT:-15432}
RUCIO_PORT=${RUCIO_PORT:-18080}
VERSION=41.5.1
VENV=$BASE/venv
PGDATA=$BASE/pg/data
URL=http://127.0.0.1:$RUCIO_PORT
X509_PORT=${RUCIO_X509_PORT:-18443}
X509=$BASE/x509
export RUCIO_CONFIG=$BASE/etc/rucio.cfg

die() { echo "rucio.sh: $*" >&2; exit 1; }
pg_bin() { ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -1; }
# PostgreSQL refuses to run as root: its tools run as Debian's 'postgres' user then.
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
pg_running() { [ -d "$PGDATA" ] && as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" status >/dev/null 2>&1; }
pg_start() {
  as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -l "$BASE/pg/postgresql.log" -w -t 60 \
    -o "-c listen_addresses=127.0.0.1 -p $PG_PORT -k $BASE/pg" start >/dev/null
}
pg_stop() { as_pg "$(pg_bin)/pg_ctl" -D "$PGDATA" -m fast -w stop >/dev/null; }

build() {
  mkdir -p "$BASE/etc" "$BASE/log" "$BASE/run"
  if [ -z "$(pg_bin)" ] || ! id postgres >/dev/null 2>&1 || ! python3 -c 'import ensurepip' 2>/dev/null; then
    if [ "$(id -u)" = 0 ]; then SUDO=; else SUDO=sudo; fi
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get -o DPkg::Lock::Timeout=600 install -y -qq postgresql python3-venv >/dev/null
  fi
  if [ ! -f "$BASE/.venv-ok" ]; then
    rm -rf "$VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "rucio[postgresql]==$VERSION" "gunicorn==27.0.1"
    touch "$BASE/.venv-ok"
  fi
  local pkg prefix db
  pkg=$("$VENV/bin/python" -c 'import os, rucio; print(os.path.dirname(rucio.__file__))')
  prefix=$("$VENV/bin/python" -c 'import sys; print(sys.prefix)')
  # psycopg 3 (the `postgresql` extra): postgresql+psycopg.
  db="postgresql+psycopg://rucio:rucio@127.0.0.1:$PG_PORT/rucio"
  cat > "$BASE/etc/rucio.cfg" <<EOF
[common]
logdir = $BASE/log
loglevel = INFO
mailtemplatedir = $prefix/rucio/etc/mail_templates
[database]
default = $db
schema = rucio
pool_recycle = 3600
echo = 0
pool_reset_on_return = rollback
[bootstrap]
# Plain text: 41.5.1's create_root_account() salts and hashes it (the shipped template's
# hash would be hashed again).
userpass_identity = ddmlab
userpass_pwd = secret
userpass_email = root@localhost
[alembic]
cfg = $BASE/etc/alembic.ini
[policy]
permission = generic
schema = generic
lfn2pfn_algorithm_default = hash
[monitor]
enable_metrics = False
EOF
  # The template's script_location is relative; build_database() stamps through it.
  cat > "$BASE/etc/alembic.ini" <<EOF
[alembic]
sqlalchemy.url = $db
version_table_schema = rucio
script_location = $pkg/db/sqla/migrate_repo/
[loggers]
keys = root
[handlers]
keys = console
[formatters]
keys = generic
[logger_root]
level = WARN
handlers = console
[handler_console]
class = StreamHandler
args = (sys.stderr,)
formatter = generic
[formatter_generic]
format = %(levelname)-5.5s [%(name)s] %(message)s
EOF
  if [ ! -f "$PGDATA/PG_VERSION" ]; then
    rm -rf "$PGDATA"; mkdir -p "$BASE/pg"
    [ "$(id -u)" = 0 ] && chown postgres:postgres "$BASE/pg"
    as_pg "$(pg_bin)/initdb" -D "$PGDATA" -A trust -U postgres -E UTF8 --locale=C.UTF-8 >"$BASE/pg/initdb.log"
  fi
  if [ ! -f "$BASE/.schema-ok" ]; then
    local started=0
    pg_running || { pg_start; started=1; }
    local psql=("$(pg_bin)/psql" -q -h 127.0.0.1 -p "$PG_PORT" -U postgres -v ON_ERROR_STOP=1)
    PGOPTIONS='-c client_min_messages=warning' "${psql[@]}" -c 'DROP DATABASE IF EXISTS rucio' \
      -c 'DROP ROLE IF EXISTS rucio' -c "CREATE ROLE rucio LOGIN PASSWORD 'rucio'" \
      -c 'CREATE DATABASE rucio OWNER rucio'
    "$VENV/bin/python" - <<'PY' > "$BASE/log/bootstrap.log" 2>&1 || { cat "$BASE/log/bootstrap.log" >&2; exit 1; }
from rucio.db.sqla.util import build_database, create_base_vo, create_root_account
build_database()
create_base_vo()
create_root_account()
PY
    touch "$BASE/.schema-ok"
    [ "$started" = 1 ] && pg_stop
  fi
  echo "rucio.sh: Rucio $VERSION installed under $BASE" >&2
}

print_env() {
  cat <<ENV
export DCFLOW_RUCIO=$URL
export DCFLOW_RUCIO_ACCOUNT=root
export DCFLOW_RUCIO_USERNAME=ddmlab
export DCFLOW_RUCIO_PASSWORD=secret
export DCFLOW_RUCIO_LOG=$BASE/log/server.log
export DCFLOW_RUCIO_X509=https://localhost:$X509_PORT
export DCFLOW_RUCIO_X509_CAPATH=$X509/capath
export DCFLOW_RUCIO_X509_USERCERT=$X509/usercert.pem
export DCFLOW_RUCIO_X509_USERKEY=$X509/userkey.pem
ENV
}

# A CA, a host certificate for localhost and a user certificate, once.
x509_pki() {
  [ -f "$X509/usercert.pem" ] && return 0
  rm -rf "$X509"; mkdir -p "$X509/capath"
  (
    cd "$X509"
    openssl req -x509 -newkey rsa:2048 -nodes -keyout ca.key -out ca.pem -days 3650 \
      -subj "/C=XX/O=dcflow test/CN=dcflow test Rucio CA" >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -keyout host.key -out host.csr \
      -subj "/C=XX/O=dcflow test/CN=localhost" >/dev/null 2>&1
    printf 'subjectAltName=DNS:localhost,IP:127.0.0.1\n' > host.ext
    openssl x509 -req -in host.csr -CA ca.pem -CAkey ca.key -set_serial 2 -days 3650 \
      -extfile host.ext -out host.pem >/dev/null 2>&1
    openssl req -newkey rsa:2048 -nodes -keyout userkey.pem -out user.csr \
      -subj "/C=XX/O=dcflow test/OU=users/CN=dcflow rucio tester" >/dev/null 2>&1
    printf 'keyUsage=critical,digitalSignature,keyEncipherment,keyCertSign\nbasicConstraints=critical,CA:false\n' > user.ext
    openssl x509 -req -in user.csr -CA ca.pem -CAkey ca.key -set_serial 3 -days 3650 \
      -extfile user.ext -out usercert.pem >/dev/null 2>&1
    chmod 600 userkey.pem host.key ca.key
    cp ca.pem "capath/$(openssl x509 -noout -hash -in ca.pem).0"
  )
  cat > "$X509/front.py" <<'PY'
"""Rucio's app behind TLS: the client certificate's subject as SSL_CLIENT_S_DN (mod_ssl's
legacy /C=../CN=.. form), the way Apache hands it to Rucio in production."""
import ssl

from rucio.web.rest.flaskapi.v1.main import application as rucio

SHORT = {"countryName": "C", "stateOrProvinceName": "ST", "localityName": "L",
         "organizationName": "O", "organizationalUnitName": "OU", "commonName": "CN",
         "domainComponent": "DC", "emailAddress": "emailAddress"}


def application(environ, start_response):
    sock = environ.get("gunicorn.socket")
    cert = sock.getpeercert() if isinstance(sock, ssl.SSLSocket) else None
    environ.pop("SSL_CLIENT_S_DN", None)
    if cert:
        environ["SSL_CLIENT_S_DN"] = "".join(
            f"/{SHORT.get(k, k)}={v}" for rdn in cert["subject"] for k, v in rdn)
    return rucio(environ, start_response)


def ssl_context(conf, default_ssl_context_factory):
    ctx = default_ssl_context_factory()
    ctx.verify_flags |= ssl.VERIFY_ALLOW_PROXY_CERTS
    return ctx
PY
}

start() {
  build
  pg_running || pg_start
  local pid=$BASE/run/gunicorn.pid
  if ! { [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null; }; then
    # --no-control-socket: gunicorn 27 otherwise opens ~/.gunicorn/gunicorn.ctl.
    "$VENV/bin/gunicorn" --daemon --chdir "$BASE" --bind "127.0.0.1:$RUCIO_PORT" \
      --workers "${RUCIO_WORKERS:-2}" --timeout 120 --no-control-socket --pid "$pid" \
      --access-logfile "$BASE/log/access.log" --error-logfile "$BASE/log/server.log" \
      rucio.web.rest.flaskapi.v1.main:application
  fi
  x509_pki
  local xpid=$BASE/run/gunicorn-x509.pid
  if ! { [ -f "$xpid" ] && kill -0 "$(cat "$xpid")" 2>/dev/null; }; then
    "$VENV/bin/gunicorn" --daemon --chdir "$X509" --bind "127.0.0.1:$X509_PORT" \
      --workers 1 --timeout 120 --no-control-socket --pid "$xpid" \
      --certfile "$X509/host.pem" --keyfile "$X509/host.key" --ca-certs "$X509/ca.pem" \
      --cert-reqs 2 --config "$X509/front.py" \
      --access-logfile "$BASE/log/access-x509.log" --error-logfile "$BASE/log/server-x509.log" \
      front:application
  fi
  local i
  for i in $(seq 300); do
    if curl -sf "$URL/ping" >/dev/null 2>&1; then
      echo "rucio.sh: Rucio $(curl -s "$URL/ping") at $URL" >&2
      print_env
      return 0
    fi
    sleep 0.2
  done
  die "Rucio did not answer at $URL; see $BASE/log/server.log"
}

# Only gunicorn (a Rucio outage, as the tests make one); PostgreSQL keeps running.
stop_server() {
  local pid p
  for pid in "$BASE/run/gunicorn.pid" "$BASE/run/gunicorn-x509.pid"; do
    if [ -f "$pid" ] && kill -0 "$(cat "$pid")" 2>/dev/null; then
      p=$(cat "$pid"); kill -TERM "$p"
      for _ in $(seq 150); do kill -0 "$p" 2>/dev/null || break; sleep 0.2; done
      kill -0 "$p" 2>/dev/null && kill -KILL "$p"
    fi
    rm -f "$pid"
  done
}

stop() {
  stop_server
  if pg_running; then pg_stop; fi
}

case "${1:-}" in
  build) build ;;
  start) start ;;
  stop) stop ;;
  stop-server) stop_server ;;
  env) print_env ;;
  *) die "usage: scripts/rucio.sh build|start|stop|stop-server|env" ;;
esac
