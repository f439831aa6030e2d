#!/bin/bash
# Issue 15's table in one sitting: the bucket binary BIN on SQLite beside
# NATS JetStream (alternated, unary marks and acks on the stream, twice),
# the floor (the protocol alone, then with the bucket's obligations:
# `floor --durable`), sustained delivery, and PostgreSQL + Redis. Prints
# each run's throughput, ingest→delivery latency, CPU, writes and memory
# lines. BENCHMARKS.md, tenth and fourteenth sessions.
#
# PAIRS=N alternates N times instead of twice (the machine's noise is
# ±10-15 % from run to run; compare medians).
#
# The p99 floor: the durable floor at waits of 1.5, 2.5 and 3.5 ms beside
# NATS (acks on the stream), and, with NATS_SYNC_BIN=/path/to/nats-server
# (2.10 or later: Debian's 2.9 cannot sync each message), JetStream with
# `sync_interval: always`, the peer under the bucket's obligation
# (BENCHMARKS.md, twenty-third session).
#
#   cargo build --release -p bucket -p bucket-bench --bins
#   bash bench/issue15.sh target/release/bucket
#   PAIRS=6 bash bench/issue15.sh target/release/bucket
set -uo pipefail
BIN=$(realpath "$1")
cd "$(dirname "$0")/.."
B=./target/release/bucket-bench
S="--outstanding 512 --connections 4 --streams 4 --max-in-flight 64 --duration 8"
lines() {
  grep -E "throughput|ingest→delivery|server CPU|server writes|server memory|store CPU|PostgreSQL WAL" |
    sed 's/  */ /g'
}
for _ in $(seq "${PAIRS:-2}"); do
  for m in unary stream; do
    echo "## bucket, --marks $m"
    $B e2e --target sqlite --server-bin "$BIN" --rate 5000 --duration 8 --marks $m 2>&1 | lines
    echo "## NATS, --marks $m"
    $B e2e --target nats --rate 5000 --duration 8 --marks $m 2>&1 | lines
  done
done
for m in unary stream; do
  $B floor --listen 127.0.0.1:3960 > /dev/null 2>&1 & FP=$!
  sleep 1
  echo "## floor, --marks $m"
  $B e2e --url http://127.0.0.1:3960 --pid $FP --rate 5000 --duration 8 --marks $m 2>&1 | lines
  kill $FP; wait $FP 2>/dev/null
  D=$(mktemp -d -p target)
  $B floor --listen 127.0.0.1:3961 --durable "$D" > /dev/null 2>&1 & FP=$!
  sleep 1
  echo "## durable floor, --marks $m"
  $B e2e --url http://127.0.0.1:3961 --pid $FP --rate 5000 --duration 8 --marks $m 2>&1 | lines
  kill $FP; wait $FP 2>/dev/null; rm -rf "$D"
done
for w in 1500 2500 3500; do
  D=$(mktemp -d -p target)
  $B floor --listen 127.0.0.1:3961 --durable "$D" --wait-us $w > /dev/null 2>&1 & FP=$!
  sleep 1
  echo "## durable floor, wait $w µs, --marks stream"
  $B e2e --url http://127.0.0.1:3961 --pid $FP --rate 5000 --duration 8 --marks stream 2>&1 | lines
  kill $FP; wait $FP 2>/dev/null; rm -rf "$D"
  echo "## NATS, --marks stream"
  $B e2e --target nats --rate 5000 --duration 8 --marks stream 2>&1 | lines
done
if [ -n "${NATS_SYNC_BIN:-}" ]; then
  for m in unary stream; do
    D=$(mktemp -d -p target)
    printf 'listen: 127.0.0.1:4333\njetstream {\n store_dir: "%s/js"\n sync_interval: always\n}\n' \
      "$(realpath "$D")" > "$D/nats.conf"
    "$NATS_SYNC_BIN" -c "$D/nats.conf" > "$D/log" 2>&1 & NP=$!
    sleep 1
    echo "## NATS, sync_interval: always, --marks $m"
    $B e2e --nats-url nats://127.0.0.1:4333 --pid $NP --rate 5000 --duration 8 --marks $m 2>&1 | lines
    kill $NP; wait $NP 2>/dev/null; rm -rf "$D"
  done
fi
for _ in 1 2; do
  echo "## bucket, sustained, --marks stream"
  $B e2e --target sqlite --server-bin "$BIN" $S --marks stream 2>&1 | lines
  echo "## NATS, sustained"
  $B e2e --target nats $S --marks unary 2>&1 | lines
done
for m in unary stream; do
  echo "## PostgreSQL + Redis, --marks $m"
  $B e2e --target redis --server-bin "$BIN" --rate 5000 --duration 8 --marks $m 2>&1 | lines
done
