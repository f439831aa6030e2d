#!/bin/bash
# What a mark would cost PostgreSQL as a HOT update. A mark changes
# `status`, which the pending, failed and dead-letter partial indexes name
# in their predicates, so today no mark is HOT. Two schemas side by side:
# `hot_a` as migrations 0006-0007 leave `packets` (a day partition with
# fillfactor 50, packet_ids, packet_count_deltas, the partial indexes),
# `hot_b` without the partial indexes and with the pending packets in a
# table of their own, written by the INSERT and emptied by the MARK in the
# same statement. The bucket's INSERT (groups of 33) and MARK (groups of
# 64, by id) shapes, each statement its own commit, from one session: its
# backend's CPU (ticks of 10 ms, /proc/PID/stat, so run it on the database's
# machine) and the WAL it wrote. BENCHMARKS.md, eighteenth session.
#
#   bench/pg_hot.sh [postgres://postgres@127.0.0.1:5432/test] [insert groups]
set -euo pipefail
URL=${1:-postgres://postgres@127.0.0.1:5432/test}
COUNT=${2:-700}
DIR=$(mktemp -d)
trap 'rm -rf "$DIR"; psql -q "$URL" -c "DROP SCHEMA IF EXISTS hot_a, hot_b CASCADE" 2>/dev/null' EXIT

schema() {
  psql -q -v ON_ERROR_STOP=1 "$URL" <<SQL
DROP SCHEMA IF EXISTS $1 CASCADE;
CREATE SCHEMA $1;
CREATE SEQUENCE $1.packet_seq;
CREATE TABLE $1.packets (
    seq BIGINT NOT NULL DEFAULT nextval('$1.packet_seq'), packet_id UUID NOT NULL,
    user_id TEXT NOT NULL, employee_id TEXT, session_id TEXT, lesson_id TEXT,
    system_type TEXT, role TEXT, client_timestamp TIMESTAMPTZ NOT NULL,
    cognitive_state TEXT NOT NULL, state TEXT, active_seconds DOUBLE PRECISION NOT NULL,
    idle_seconds DOUBLE PRECISION NOT NULL, away_seconds DOUBLE PRECISION NOT NULL,
    focus_score DOUBLE PRECISION, integrity_score DOUBLE PRECISION NOT NULL,
    raw_signals JSONB NOT NULL, received_at TIMESTAMPTZ NOT NULL,
    status TEXT NOT NULL DEFAULT 'pending', delivery_attempts INTEGER NOT NULL DEFAULT 0,
    processed_at TIMESTAMPTZ, processed_by_karma BOOLEAN NOT NULL DEFAULT FALSE,
    karma_actions JSONB NOT NULL DEFAULT '[]', processing_error TEXT,
    history JSONB NOT NULL DEFAULT '[]',
    PRIMARY KEY (received_at, seq)) PARTITION BY RANGE (received_at);
CREATE TABLE $1.packets_p PARTITION OF $1.packets
    FOR VALUES FROM ('2000-01-01') TO ('2100-01-01') WITH (fillfactor = 50);
CREATE TABLE $1.packet_ids (packet_id UUID PRIMARY KEY, received_at TIMESTAMPTZ NOT NULL,
    seq BIGINT NOT NULL);
CREATE INDEX ON $1.packet_ids (received_at);
CREATE TABLE $1.packet_count_deltas (day DATE NOT NULL, status TEXT NOT NULL, n BIGINT NOT NULL);
CREATE INDEX ON $1.packets (user_id, seq);
$2
SQL
}
schema hot_a "CREATE INDEX ON hot_a.packets (seq) WHERE status = 'pending';
CREATE INDEX ON hot_a.packets (user_id, seq) WHERE status = 'failed';
CREATE INDEX ON hot_a.packets (user_id, seq) WHERE status = 'dead_letter';"
schema hot_b "CREATE TABLE hot_b.pending (received_at TIMESTAMPTZ NOT NULL, seq BIGINT PRIMARY KEY);"

# The INSERT, with the pending row too in hot_b.
insert() {
  local extra=""
  [ "$1" = hot_b ] && extra=", pend AS (INSERT INTO hot_b.pending (received_at, seq) SELECT now(), seq FROM claimed)"
  echo "WITH u AS (SELECT nextval('$1.packet_seq') AS seq, gen_random_uuid() AS packet_id,
 'user-' || (random() * 10000)::int AS user_id, 'emp' AS employee_id, 'session_456' AS session_id,
 'lesson_789' AS lesson_id, 'gurukul' AS system_type, 'student' AS role, now() AS client_timestamp,
 'ON_TASK' AS cognitive_state, NULL::text AS state, 4.5::float8 AS active_seconds,
 0.3::float8 AS idle_seconds, 0.2::float8 AS away_seconds, 85.0::float8 AS focus_score,
 0.85::float8 AS integrity_score, '{\"dwell_time_ms\": 1200, \"mouse_velocity\": 0.5}'::jsonb AS raw_signals
 FROM generate_series(1, 33)),
claimed AS (INSERT INTO $1.packet_ids (packet_id, received_at, seq) SELECT packet_id, now(), seq
 FROM u ON CONFLICT (packet_id) DO NOTHING RETURNING seq),
counted AS (INSERT INTO $1.packet_count_deltas (day, status, n)
 SELECT (now() AT TIME ZONE 'UTC')::date, 'pending', COUNT(*) FROM claimed HAVING COUNT(*) > 0)$extra
INSERT INTO $1.packets (seq, packet_id, user_id, employee_id, session_id, lesson_id, system_type,
 role, client_timestamp, cognitive_state, state, active_seconds, idle_seconds, away_seconds,
 focus_score, integrity_score, raw_signals, received_at)
 SELECT u.*, now() FROM u JOIN claimed USING (seq);"
}

# The MARK of one group of ids (psql writes one per 64 stored packets),
# with the pending row deleted too in hot_b.
marks() {
  local extra=""
  [ "$1" = hot_b ] && extra=", unpend AS (DELETE FROM hot_b.pending q USING changed c WHERE q.seq = c.seq)"
  psql -qtA "$URL" -c "SELECT format(\$f\$WITH changed AS (UPDATE $1.packets p SET status = 'processed',
 processed_by_karma = true, processed_at = now(), karma_actions = '[{\"action\": \"nudge\"}]',
 processing_error = NULL, delivery_attempts = CASE WHEN p.status = 'pending'
 THEN p.delivery_attempts + 1 ELSE p.delivery_attempts END
 FROM (SELECT i.seq, i.received_at, o.status AS was FROM UNNEST(%L::uuid[]) AS m(id)
 JOIN $1.packet_ids i ON i.packet_id = m.id CROSS JOIN LATERAL (SELECT o.status FROM $1.packets o
 WHERE o.seq = i.seq AND o.received_at = i.received_at LIMIT 1) o) m
 WHERE p.seq = m.seq AND p.received_at = m.received_at AND p.status <> 'processed'
 AND p.status = m.was RETURNING p.received_at, p.seq, m.was, p.status AS now)$extra,
counted AS (INSERT INTO $1.packet_count_deltas (day, status, n)
 SELECT (c.received_at AT TIME ZONE 'UTC')::date, d.status, SUM(d.n) FROM changed c
 CROSS JOIN LATERAL (VALUES (c.was, -1), (c.now, 1)) AS d(status, n)
 WHERE d.status IS NOT NULL AND c.was IS DISTINCT FROM c.now GROUP BY 1, 2 HAVING SUM(d.n) <> 0)
SELECT count(*) FROM changed;\$f\$, array_agg(packet_id ORDER BY seq))
 FROM $1.packet_ids GROUP BY (seq - 1) / 64 ORDER BY (seq - 1) / 64"
}

# Runs FILE's statements in one session: its backend's CPU ticks and WAL bytes.
measure() {
  {
    echo "SELECT pg_backend_pid() AS pid, pg_current_wal_insert_lsn() AS l0 \\gset"
    echo "\\setenv PID :pid"
    echo "\\! awk '{print \$14 + \$15}' /proc/\$PID/stat > $DIR/cpu0"
    cat "$1"
    echo "\\! awk '{print \$14 + \$15}' /proc/\$PID/stat > $DIR/cpu1"
    echo "SELECT 'wal ' || (pg_current_wal_insert_lsn() - :'l0');"
  } | psql -qtA -v ON_ERROR_STOP=1 "$URL" | grep '^wal ' | cut -d' ' -f2 > "$DIR/wal"
  echo "$(($(cat "$DIR/cpu1") - $(cat "$DIR/cpu0"))) ticks, $(cat "$DIR/wal") B of WAL"
}

for s in hot_a hot_b; do
  for _ in $(seq "$COUNT"); do insert $s; done > "$DIR/insert_$s.sql"
done
for s in hot_a hot_b; do echo "$s INSERT: $(measure "$DIR/insert_$s.sql")"; done
for s in hot_a hot_b; do marks $s > "$DIR/mark_$s.sql"; done
for s in hot_a hot_b; do echo "$s MARK: $(measure "$DIR/mark_$s.sql")"; done
for s in hot_a hot_b; do
  psql -qtA "$URL" -c "SELECT '$s packets ' || count(*) FROM $s.packet_ids" \
    -c "SELECT '$s HOT ' || n_tup_hot_upd || ' of ' || n_tup_upd || ' updates' \
        FROM pg_stat_user_tables WHERE schemaname = '$s' AND relname = 'packets_p'"
done
