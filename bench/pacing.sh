#!/bin/bash
# What the wait for company costs and buys: at each wait in WAITS (µs,
# default "4000 3000 2000 1000"), the durable floor (`floor --durable
# --wait-us W`: the writer sleeps W after a group's first write) and the
# bucket BIN with its commits paced at W (`BUCKET_COMMIT_LINGER_US=W`: fixed,
# no sooner than W after the last commit started); then the bucket's own
# default and NATS JetStream, in one sitting, ROUNDS times (default 2). Each
# line: server CPU per packet and ingest→delivery p50 and p99 at 5,000/s with
# acks on the stream. A shorter wait means more commits a second, each with
# its fsync and wake-ups: the CPU rises as the tail falls. BENCHMARKS.md,
# twentieth session.
#
#   cargo build --release -p bucket -p bucket-bench --bins
#   bash bench/pacing.sh target/release/bucket
#   WAITS="4000 2000" ROUNDS=4 bash bench/pacing.sh target/release/bucket
set -uo pipefail
BIN=$(realpath "$1")
cd "$(dirname "$0")/.."
B=./target/release/bucket-bench
E="--rate 5000 --duration 8 --marks stream"
line() {
  local out
  out=$(cat)
  printf '%-22s CPU %3s µs  p50 %6s ms  p99 %6s ms\n' "$1" \
    "$(grep -oP 'server CPU.*cores, \K[0-9]+' <<< "$out")" \
    "$(grep -oP 'ingest→delivery +p50 \K[0-9.]+' <<< "$out")" \
    "$(grep -oP 'ingest→delivery.*p99 \K[0-9.]+' <<< "$out")"
}
for _ in $(seq "${ROUNDS:-2}"); do
  for w in ${WAITS:-4000 3000 2000 1000}; do
    D=$(mktemp -d -p target)
    $B floor --listen 127.0.0.1:3962 --durable "$D" --wait-us "$w" > /dev/null 2>&1 & FP=$!
    sleep 1
    $B e2e --url http://127.0.0.1:3962 --pid $FP $E 2>&1 | line "durable floor, $w"
    kill $FP; wait $FP 2>/dev/null; rm -rf "$D"
    $B e2e --target sqlite --server-bin "$BIN" --server-env BUCKET_COMMIT_LINGER_US="$w" $E 2>&1 |
      line "bucket, $w"
  done
  $B e2e --target sqlite --server-bin "$BIN" $E 2>&1 | line "bucket, default"
  $B e2e --target nats $E 2>&1 | line "NATS"
done
