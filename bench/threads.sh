#!/bin/bash
# Per-thread cost of the bucket under one e2e load: each thread's CPU (user
# and system), write_bytes and write syscalls
# (/proc/PID/task/TID/{stat,io}) over 6 s of the run, per delivered packet. BENCHMARKS.md, fifth session. With
# `durable-floor` for BIN, the same of `bucket-bench floor --durable`
# (fourteenth session).
#
#   bench/threads.sh target/release/bucket --rate 5000 --duration 8 --marks unary
#   bench/threads.sh durable-floor --rate 5000 --duration 8 --marks stream
set -euo pipefail
cd "$(dirname "$0")/.."
D=$(mktemp -d -p target); OUT=$(mktemp)
if [ "$1" = durable-floor ]; then
  ./target/release/bucket-bench floor --listen 127.0.0.1:3951 --durable "$D" > /dev/null 2>&1 & PID=$!
else
  DATABASE_URL=sqlite://$D/bucket.db BUCKET_LISTEN=127.0.0.1:3951 "$(realpath "$1")" > /dev/null 2>&1 & PID=$!
fi
shift
trap 'kill $PID 2>/dev/null; rm -rf "$D" "$OUT"' EXIT
sleep 1.5
snap() {
  for t in /proc/$PID/task/*; do
    echo "$(tr ' ' _ < "$t/comm") $(awk '{print $14, $15}' "$t/stat") \
      $(awk '/^write_bytes/ {print $2}' "$t/io") $(awk '/^syscw/ {print $2}' "$t/io")"
  done | awk '{u[$1]+=$2; s[$1]+=$3; b[$1]+=$4; w[$1]+=$5} END {for (k in u) print k, u[k], s[k], b[k], w[k]}' | sort
}
./target/release/bucket-bench e2e --url http://127.0.0.1:3951 --pid $PID "$@" > "$OUT" 2>&1 &
E=$!; sleep 2; A=$(snap); sleep 6; Z=$(snap); wait $E
N=$(grep -oP 'delivered \K[0-9]+' "$OUT" | head -1)
echo "delivered/s $N"
join <(echo "$A") <(echo "$Z") | awk -v n="$N" -v hz="$(getconf CLK_TCK)" '{us = 1e6 / hz / (6 * n)
  printf "%-18s CPU %6.1f us (user %5.1f, system %5.1f)  writes %7.1f B  %5.2f syscalls per packet\n",
    $1, ($6 + $7 - $2 - $3) * us, ($6 - $2) * us, ($7 - $3) * us, ($8 - $4) / (6 * n), ($9 - $5) / (6 * n)}'
grep -E 'server CPU|server writes' "$OUT"
