#!/bin/bash
# The instructions the server spends on the same load, per build: each BIN
# runs under `valgrind --tool=callgrind` (which counts instructions, not
# time, so the machine's noise does not move it) while bucket-bench sends
# RATE packets a second (default 300) for DURATION seconds (default 20)
# with acks on the stream; prints the whole process's instruction count of
# each run and per packet, the builds alternated ROUNDS times (default 3).
# A run still moves by about 1 % (timers, how the groups fall): compare
# means. BENCHMARKS.md, nineteenth session.
#
#   cargo build --release -p bucket -p bucket-bench --bins
#   bash bench/instructions.sh /tmp/before /tmp/after
#   ROUNDS=5 MARKS=unary bash bench/instructions.sh /tmp/before /tmp/after
set -euo pipefail
cd "$(dirname "$0")/.."
B=./target/release/bucket-bench
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT
for _ in $(seq "${ROUNDS:-3}"); do
  for bin in "$@"; do
    printf '#!/bin/sh\nexec valgrind --tool=callgrind --callgrind-out-file=%s/out %s "$@"\n' \
      "$W" "$(realpath "$bin")" > "$W/server"
    chmod +x "$W/server"
    rm -f "$W/out"
    $B e2e --target sqlite --server-bin "$W/server" --rate "${RATE:-300}" \
      --duration "${DURATION:-20}" --marks "${MARKS:-stream}" > "$W/e2e" 2>&1
    delivered=$(grep -oP 'delivered \K[0-9]+' "$W/e2e" | head -1)
    total=$(awk '/^totals:/ {print $2}' "$W/out")
    echo "$bin delivered ${delivered}/s instructions $total," \
      "$((total / (delivered * ${DURATION:-20}))) a packet"
  done
done
