#!/usr/bin/env bash
# The Python client's step of the test command (tests/run.sh calls it after
# the cargo build): builds prana-bucket from proto/ into a venv under the
# target dir, then ruff, mypy --strict and pytest against the bucket binary
# of that target dir. Extra arguments go to pytest (-k ..., -x).
set -euo pipefail
here="$(cd "$(dirname "$0")/.." && pwd)"
repo="$(cd "$here/../.." && pwd)"
target="$(realpath -m "${CARGO_TARGET_DIR:-$repo/target}")"
venv="$target/python-venv"
python="${PYTHON:-python3}"

if ! "$venv/bin/python" -c 'import sys; assert sys.version_info >= (3, 10)' 2>/dev/null; then
  echo "== clients/python: making $venv"
  rm -rf "$venv"
  "$python" -m venv "$venv"
fi
# A regular (not editable) install: what a user gets, generated at build
# time from proto/. The build also leaves the generated modules in
# prana_bucket/_gen/ (git-ignored), where mypy reads their stubs.
"$venv/bin/pip" install -q --disable-pip-version-check "$here[test]"
# Built again every run, so the package matches proto/ as it is now.
"$venv/bin/pip" install -q --disable-pip-version-check --force-reinstall --no-deps "$here"
echo "== clients/python: prana-bucket built from proto/"

cd "$here"
"$venv/bin/ruff" check prana_bucket tests setup.py ../../examples/python
"$venv/bin/ruff" format --check prana_bucket tests setup.py ../../examples/python
# No incremental cache: an earlier run's cache of the google namespace
# package can hide google.rpc's stubs.
"$venv/bin/mypy" --no-incremental . ../../examples/python
# pytest (not python -m pytest): the tests import the installed package,
# not the source tree.
BUCKET_BIN="${BUCKET_BIN:-$target/debug/bucket}" \
  "$venv/bin/pytest" -q -p no:cacheprovider "$@"
