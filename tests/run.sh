#!/usr/bin/env bash
# The one test command: every test, including the PostgreSQL and Redis
# suites against real servers. Where those servers are not running it
# installs them (apt-get) and starts them. Usage: bash tests/run.sh [filter…]
set -euo pipefail
cd "$(dirname "$0")/.."

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
apt_updated=""
need_pkg() { # need_pkg COMMAND PACKAGE…: install PACKAGEs unless COMMAND exists
  local cmd=$1; shift
  command -v "$cmd" >/dev/null 2>&1 && return 0
  ls /usr/lib/postgresql/*/bin/"$cmd" >/dev/null 2>&1 && return 0
  if [ -z "$apt_updated" ]; then
    echo "== apt-get update"; $SUDO apt-get update -qq; apt_updated=1
  fi
  echo "== installing $*"
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "$@" >/dev/null
}

# --- PostgreSQL on 127.0.0.1:5432 --------------------------------------------
PG_URL=${BUCKET_TEST_POSTGRES_URL:-postgres://postgres@127.0.0.1:5432/postgres}
pg_ok() { psql "$1" -Atqc 'select 1' >/dev/null 2>&1; }
need_pkg psql postgresql postgresql-client
need_pkg initdb postgresql
if ! pg_isready -q -h 127.0.0.1 -p 5432; then
  echo "== starting PostgreSQL"
  version=$(ls /etc/postgresql 2>/dev/null | sort -V | tail -n1)
  if [ -z "$version" ]; then
    version=$(ls /usr/lib/postgresql | sort -V | tail -n1)
    $SUDO pg_createcluster "$version" main >/dev/null
  fi
  $SUDO pg_ctlcluster --skip-systemctl-redirect "$version" main start
  for _ in $(seq 1 30); do pg_isready -q -h 127.0.0.1 -p 5432 && break; sleep 1; done
fi
if ! pg_ok "$PG_URL"; then
  # A fresh Debian cluster wants a password over TCP: give postgres one.
  echo "== setting a password for the postgres role (tests only)"
  $SUDO -u postgres psql -qc "ALTER USER postgres PASSWORD 'postgres'" >/dev/null 2>&1 \
    || su postgres -c "psql -qc \"ALTER USER postgres PASSWORD 'postgres'\"" >/dev/null
  PG_URL=postgres://postgres:postgres@127.0.0.1:5432/postgres
fi
pg_ok "$PG_URL" || { echo "PostgreSQL is not reachable at $PG_URL" >&2; exit 1; }
export BUCKET_TEST_POSTGRES_URL=$PG_URL
# Databases left by an interrupted run.
for db in $(psql "$PG_URL" -Atqc "select datname from pg_database where datname like 'bucket_test_%'"); do
  psql "$PG_URL" -qc "DROP DATABASE IF EXISTS $db WITH (FORCE)" >/dev/null || true
done

# --- Redis on 127.0.0.1:6379 (tests also start their own redis-server) -------
need_pkg redis-server redis-server
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "== starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no \
    --logfile /tmp/bucket-test-redis.log
  for _ in $(seq 1 30); do redis-cli -p 6379 ping >/dev/null 2>&1 && break; sleep 0.2; done
fi
export BUCKET_TEST_REDIS_URL=${BUCKET_TEST_REDIS_URL:-redis://127.0.0.1:6379}

# --- the benchmark's smoke test: nats-server (target nats), a TTF font (plot) --
[ -x /usr/sbin/nats-server ] || need_pkg nats-server nats-server
# need_pkg checks for a command; a font is a file, so the file test decides
# and the "command" given to need_pkg never exists.
[ -f /usr/share/fonts/truetype/dejavu/DejaVuSans.ttf ] || need_pkg fonts-dejavu-core fonts-dejavu-core

# --- the browser test's tools, and the contract lint ---------------------------
[ -x /usr/bin/chromium ] || need_pkg chromium chromium
need_pkg node nodejs
need_pkg npm npm
# `npm ci` rejects this lock (npm 11 omits other platforms' optional buf
# binaries from it); `install --no-save` still resolves from the lock.
# The browser client package (clients/ts): generated from proto/ with buf,
# type-checked and built with tsc; the browser example depends on it.
(cd clients/ts && npm install --no-save --no-audit --no-fund --loglevel=error && npm run --silent build)
echo "== clients/ts: built and type-checked"
(cd examples/browser && npm install --no-save --no-audit --no-fund --loglevel=error && npm run --silent build)
# buf lint (STANDARD, see buf.yaml) on proto/: the contract stays clean.
(cd examples/browser && npx --no-install buf lint ../..)
echo "== buf lint: ok"
# buf breaking (FILE rules): the contract against the last committed one.
# With uncommitted changes to proto/ that is HEAD; on a clean checkout (CI)
# it is the commit before, so a commit that breaks the contract fails.
if git diff --quiet HEAD -- proto 2>/dev/null; then against=HEAD~1; else against=HEAD; fi
if git rev-parse --verify --quiet "$against" >/dev/null; then
  (cd examples/browser && npx --no-install buf breaking ../.. --against "../../.git#ref=$against")
  echo "== buf breaking against $against: ok"
fi

# --- schemathesis: tests/api/openapi.rs runs it against GET /openapi.json ----
# Pinned, in a venv of its own under the target dir (installed once).
SCHEMATHESIS_VERSION=4.32.5
st_venv="$(realpath -m "${CARGO_TARGET_DIR:-target}")/schemathesis-venv"
if ! "$st_venv/bin/schemathesis" --version 2>/dev/null | grep -qF "$SCHEMATHESIS_VERSION"; then
  need_pkg python3 python3
  echo "== installing schemathesis $SCHEMATHESIS_VERSION"
  rm -rf "$st_venv"
  if ! python3 -m venv "$st_venv" >/dev/null 2>&1; then
    # Debian's own python3 makes venvs only with python3-venv (ensurepip);
    # need_pkg checks a command, and none is named python3-venv-absent.
    rm -rf "$st_venv"
    need_pkg python3-venv-absent python3-venv
    python3 -m venv "$st_venv"
  fi
  "$st_venv/bin/pip" install -q --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi
export BUCKET_TEST_SCHEMATHESIS="$st_venv/bin/schemathesis"
echo "== schemathesis: $("$BUCKET_TEST_SCHEMATHESIS" --version)"

# --- the tests ---------------------------------------------------------------
cargo fmt --check
# The consumer test runs examples/karma_consumer as a real process, and the
# benchmark's smoke test runs the bucket binary from the same target dir.
cargo build --workspace --bins --examples
# The Python client (clients/python): built from proto/ into a venv under the
# target dir; ruff, mypy --strict and pytest against the bucket just built.
need_pkg python3 python3
python3 -c 'import ensurepip' 2>/dev/null || need_pkg python3-venv-absent python3-venv
bash clients/python/tests/run.sh
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --all-targets --no-fail-fast "$@"
else
  cargo test --workspace --all-targets --no-fail-fast -- "$@"
fi
