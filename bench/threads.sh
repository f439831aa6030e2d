#!/bin/bash
# Per-thread cost of the bucket under one e2e load: each thread's CPU,
# write_bytes and write syscalls (/proc/PID/task/TID/{stat,io}) over 6 s of
# the run, per delivered packet. BENCHMARKS.md, fifth session.
#
#   bench/threads.sh target/release/bucket --rate 5000 --duration 8 --marks unary
set -euo pipefail
BIN=$(realpath "$1"); shift
cd "$(dirname "$0")/.."
D=$(mktemp -d); OUT=$(mktemp)
DATABASE_URL=sqlite://$D/bucket.db BUCKET_LISTEN=127.0.0.1:3951 "$BIN" > /dev/null 2>&1 & PID=$!
trap 'kill $PID 2>/dev/null; rm -rf "$D" "$OUT"' EXIT
sleep 1.5
snap() {
  for t in /proc/$PID/task/*; do
    echo "$(tr ' ' _ < "$t/comm") $(awk '{print $14+$15}' "$t/stat") \
      $(awk '/^write_bytes/ {print $2}' "$t/io") $(awk '/^syscw/ {print $2}' "$t/io")"
  done | awk '{c[$1]+=$2; b[$1]+=$3; w[$1]+=$4} END {for (k in c) print k, c[k], b[k], w[k]}' | sort
}
./target/release/bucket-bench e2e --url http://127.0.0.1:3951 --pid $PID "$@" > "$OUT" 2>&1 &
E=$!; sleep 2; A=$(snap); sleep 6; Z=$(snap); wait $E
N=$(grep -oP 'delivered \K[0-9]+' "$OUT" | head -1)
echo "delivered/s $N"
join <(echo "$A") <(echo "$Z") | awk -v n="$N" -v hz="$(getconf CLK_TCK)" '{printf "%-18s CPU %6.1f us  writes %7.1f B  %5.2f syscalls per packet\n", $1, ($5-$2)*1e6/hz/(6*n), ($6-$3)/(6*n), ($7-$4)/(6*n)}'
grep -E 'server CPU|server writes' "$OUT"
