#!/bin/bash
# PostgreSQL's own cost of the least a durable queue must ask of it: each
# packet inserted (one row, ~400 bytes of body) and later marked (one
# UPDATE by primary key), both committed, in groups of G rows per
# transaction at R packets a second, from one connection. No bucket, no
# Redis: what PostgreSQL spends per packet (CPU of all its processes, WAL
# bytes and records) is the floor under the bucket's PostgreSQL store.
# Two tables: `floor_pk` (primary key only) and `floor_ix` (the indexes the
# bucket's reads need: packet_id unique, (user_id, seq), received_at, and
# the pending rows by seq). BENCHMARKS.md, eighth session.
#
#   bench/pg_floor.sh [postgres://postgres@127.0.0.1:5432/postgres] [R] [G] [seconds]
set -euo pipefail
URL=${1:-postgres://postgres@127.0.0.1:5432/postgres}
RATE=${2:-5000}
GROUP=${3:-20}
SECS=${4:-10}
TPS=$((RATE / GROUP))
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"; psql -q "$URL" -c "DROP TABLE IF EXISTS floor_pk, floor_ix" 2>/dev/null' EXIT

psql -q -v ON_ERROR_STOP=1 "$URL" <<'SQL'
DROP TABLE IF EXISTS floor_pk, floor_ix;
CREATE TABLE floor_pk (
    seq BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    packet_id UUID NOT NULL, user_id TEXT NOT NULL,
    received_at TIMESTAMPTZ NOT NULL DEFAULT now(),
    body BYTEA NOT NULL, status SMALLINT NOT NULL DEFAULT 0);
CREATE TABLE floor_ix (LIKE floor_pk INCLUDING ALL);
CREATE UNIQUE INDEX ON floor_ix (packet_id);
CREATE INDEX ON floor_ix (user_id, seq);
CREATE INDEX ON floor_ix (received_at);
CREATE INDEX ON floor_ix (seq) WHERE status = 0;
SQL

# All of PostgreSQL's processes (the WAL writer, the checkpointer, the
# background writer) and, through the postmaster's children's times, the
# backends that ended (pgbench's connection ends with its run).
cpu() {
  { for p in $(pgrep -x postgres); do awk '{print $14 + $15}' "/proc/$p/stat" 2>/dev/null; done
    awk '{print $16 + $17}' "/proc/$(pgrep -xo postgres)/stat"; } | awk '{s += $1} END {print s}'
}
wal() { psql -tAq "$URL" -c "SELECT wal_bytes || ' ' || wal_records FROM pg_stat_wal"; }

for table in floor_pk floor_ix; do
  cat > "$DIR/$table.sql" <<SQL
INSERT INTO $table (packet_id, user_id, body) SELECT gen_random_uuid(), 'u' || (random() * 10000)::int, decode(repeat('ab', 400), 'hex') FROM generate_series(1, $GROUP);
SELECT currval(pg_get_serial_sequence('$table', 'seq')) - $GROUP + 1 AS s \gset
UPDATE $table SET status = 1 WHERE seq BETWEEN :s AND :s + $GROUP - 1;
SQL
  # Warm: the first seconds create the relation's pages.
  pgbench -n -c 1 -T 2 -R "$TPS" -f "$DIR/$table.sql" "$URL" > /dev/null 2>&1
  read -r wb0 wr0 < <(wal); c0=$(cpu)
  out=$(pgbench -n -c 1 -T "$SECS" -R "$TPS" -f "$DIR/$table.sql" "$URL" 2>&1)
  c1=$(cpu); read -r wb1 wr1 < <(wal)
  tx=$(echo "$out" | awk '/number of transactions actually processed/ {split($6, a, "/"); print a[1]}')
  lat=$(echo "$out" | awk '/latency average/ {print $4}')
  n=$((tx * GROUP))
  awk -v t="$table" -v n="$n" -v c="$((c1 - c0))" -v hz="$(getconf CLK_TCK)" -v wb="$((wb1 - wb0))" -v wr="$((wr1 - wr0))" -v lat="$lat" \
    'BEGIN {printf "%-9s %7d packets  PostgreSQL CPU %6.1f us  WAL %6.0f B  %5.1f records per packet  (%s ms a transaction)\n", t, n, c * 1e6 / hz / n, wb / n, wr / n, lat}'
done
