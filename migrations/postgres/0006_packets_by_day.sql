-- Packets partitioned by day (UTC) on received_at, so retention drops a
-- whole day's partition instead of deleting its rows one by one.
--
-- Design: a partitioned table's unique keys must include the partition key,
-- so packets can no longer hold packet_id UNIQUE by itself. Uniqueness moves
-- to a small unpartitioned table, packet_ids (packet_id PRIMARY KEY,
-- received_at, seq), written by the same INSERT statement as the packet (a
-- data-modifying CTE: one statement, one round trip, one commit), so a
-- retried id is never stored twice, even on another day. Whatever addresses
-- a packet by id (marks, lease ends, the queue's look-ups of pending ids,
-- the receipt of a retry) goes through packet_ids and so carries (seq,
-- received_at): PostgreSQL prunes to the one partition and uses its primary
-- key.
--
-- Counts are kept per day and status (the triggers of 0004, now grouped by
-- day too), so dropping a day takes its counts away exactly, with no scan:
-- a DROP fires no row or statement triggers.
--
-- Partitions are created by the bucket, a few days ahead, at startup and
-- every minute (src/store/partitions.rs); packets_default takes any row no
-- day partition covers (a node's clock far off), so an insert never fails.
--
-- This copies the table once, in one transaction, with it locked: on a
-- large database, plan the upgrade's downtime as for a copy of the table.

ALTER TABLE packets RENAME TO packets_unpartitioned;
DROP TRIGGER packets_counted_insert ON packets_unpartitioned;
DROP TRIGGER packets_counted_update ON packets_unpartitioned;
DROP TRIGGER packets_counted_delete ON packets_unpartitioned;
DROP FUNCTION packets_count_insert();
DROP FUNCTION packets_count_update();
DROP FUNCTION packets_count_delete();
DROP TABLE packet_counts;

-- The identity column cannot carry over (before PostgreSQL 17 a partitioned
-- table's identity is not used by inserts routed to partitions): a plain
-- sequence, continued from the old one so no seq is ever handed out twice
-- (seq is a page token and the queue's order).
CREATE SEQUENCE packet_seq;
DO $$
DECLARE
    last BIGINT;
    called BOOLEAN;
BEGIN
    EXECUTE format('SELECT last_value, is_called FROM %s',
                   pg_get_serial_sequence('packets_unpartitioned', 'seq'))
        INTO last, called;
    PERFORM setval('packet_seq', last, called);
END $$;

CREATE TABLE packets (
    seq                BIGINT NOT NULL DEFAULT nextval('packet_seq'),
    packet_id          UUID NOT NULL,
    user_id            TEXT NOT NULL,
    employee_id        TEXT,
    session_id         TEXT,
    lesson_id          TEXT,
    system_type        TEXT,
    role               TEXT,
    client_timestamp   TIMESTAMPTZ NOT NULL,
    cognitive_state    TEXT NOT NULL,
    state              TEXT,
    active_seconds     DOUBLE PRECISION NOT NULL,
    idle_seconds       DOUBLE PRECISION NOT NULL,
    away_seconds       DOUBLE PRECISION NOT NULL,
    focus_score        DOUBLE PRECISION,
    integrity_score    DOUBLE PRECISION NOT NULL,
    raw_signals        JSONB NOT NULL,
    received_at        TIMESTAMPTZ NOT NULL,
    status             TEXT NOT NULL DEFAULT 'pending'
        CONSTRAINT packets_status_known CHECK (status IN ('pending', 'leased', 'processed', 'failed', 'dead_letter')),
    delivery_attempts  INTEGER NOT NULL DEFAULT 0,
    processed_at       TIMESTAMPTZ,
    processed_by_karma BOOLEAN NOT NULL DEFAULT FALSE,
    karma_actions      JSONB NOT NULL DEFAULT '[]',
    processing_error   TEXT,
    history            JSONB NOT NULL DEFAULT '[]',
    CONSTRAINT packets_seq_received PRIMARY KEY (seq, received_at)
) PARTITION BY RANGE (received_at);
ALTER SEQUENCE packet_seq OWNED BY packets.seq;

-- Rows whose day has no partition. The bucket creates days ahead, so only a
-- clock far off puts rows here. They are counted and delivered like any
-- other; retention deletes their finished rows in batches (they have no day
-- to drop), and when the bucket creates the partition of a day that has
-- rows here, it moves them into it first (CREATE would fail otherwise).
CREATE TABLE packets_default PARTITION OF packets DEFAULT;

-- A partition for every day the existing rows cover.
DO $$
DECLARE
    d DATE;
BEGIN
    FOR d IN SELECT DISTINCT (received_at AT TIME ZONE 'UTC')::date FROM packets_unpartitioned
    LOOP
        EXECUTE format('CREATE TABLE %I PARTITION OF packets FOR VALUES FROM (%L) TO (%L)',
                       'packets_p' || to_char(d, 'YYYYMMDD'),
                       d::text || ' 00:00:00+00', (d + 1)::text || ' 00:00:00+00');
    END LOOP;
END $$;

INSERT INTO packets (seq, packet_id, user_id, employee_id, session_id, lesson_id, system_type,
                     role, client_timestamp, cognitive_state, state, active_seconds, idle_seconds,
                     away_seconds, focus_score, integrity_score, raw_signals, received_at, status,
                     delivery_attempts, processed_at, processed_by_karma, karma_actions,
                     processing_error, history)
    SELECT seq, packet_id, user_id, employee_id, session_id, lesson_id, system_type,
           role, client_timestamp, cognitive_state, state, active_seconds, idle_seconds,
           away_seconds, focus_score, integrity_score, raw_signals, received_at, status,
           delivery_attempts, processed_at, processed_by_karma, karma_actions,
           processing_error, history
    FROM packets_unpartitioned;

-- One row per stored packet id: the id's uniqueness and where its packet is.
-- Rows of a dropped day stay until retention forgets them in batches after
-- the drop (an unpartitioned table cannot drop a day at once); until then a
-- retry of such an id is answered as the stored duplicate it was.
CREATE TABLE packet_ids (
    packet_id   UUID PRIMARY KEY,
    received_at TIMESTAMPTZ NOT NULL,
    seq         BIGINT NOT NULL
);
INSERT INTO packet_ids (packet_id, received_at, seq)
    SELECT packet_id, received_at, seq FROM packets_unpartitioned;
CREATE INDEX packet_ids_received ON packet_ids (received_at);

DROP TABLE packets_unpartitioned;

-- The indexes of 0001-0004, on every partition (built once, after the load),
-- but for packet_id's: packet_ids holds the ids, and every look-up by id goes
-- through it to (seq, received_at), the primary key (an index on
-- (packet_id, received_at) here cost ~65 bytes a packet and a few % of
-- the bulk-load rate, and no query used it).
CREATE INDEX packets_user_seq ON packets (user_id, seq);
CREATE INDEX packets_pending_seq ON packets (seq) WHERE status = 'pending';
CREATE INDEX packets_user_failed ON packets (user_id, seq) WHERE status = 'failed';
CREATE INDEX packets_user_dead_letter ON packets (user_id, seq) WHERE status = 'dead_letter';
CREATE INDEX packets_received ON packets (received_at);

-- Packets per UTC day and status. Status reads the sums (a few rows a day).
CREATE TABLE packet_counts (
    day    DATE NOT NULL,
    status TEXT NOT NULL,
    n      BIGINT NOT NULL,
    PRIMARY KEY (day, status)
);
INSERT INTO packet_counts (day, status, n)
    SELECT (received_at AT TIME ZONE 'UTC')::date, status, COUNT(*) FROM packets GROUP BY 1, 2;

-- Statement-level, as in 0004: one counter upsert per (day, status) a
-- statement touches, in key order so two writers never wait on each other
-- in a cycle. Statements on the parent fire them whatever partition the rows
-- are in; statements naming a partition (the bucket's moves out of
-- packets_default) do not, which is right: a move changes no count.
CREATE FUNCTION packets_count_insert() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO packet_counts AS c (day, status, n)
        SELECT (received_at AT TIME ZONE 'UTC')::date, status, COUNT(*)
        FROM new_rows GROUP BY 1, 2 ORDER BY 1, 2
    ON CONFLICT (day, status) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END $$;

CREATE FUNCTION packets_count_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO packet_counts AS c (day, status, n)
        SELECT day, status, SUM(n) FROM (
            SELECT (received_at AT TIME ZONE 'UTC')::date AS day, status, -1 AS n FROM old_rows
            UNION ALL
            SELECT (received_at AT TIME ZONE 'UTC')::date, status, 1 FROM new_rows
        ) changes GROUP BY 1, 2 HAVING SUM(n) <> 0 ORDER BY 1, 2
    ON CONFLICT (day, status) DO UPDATE SET n = c.n + EXCLUDED.n;
    RETURN NULL;
END $$;

CREATE FUNCTION packets_count_delete() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    UPDATE packet_counts c SET n = c.n - d.n
    FROM (
        SELECT (received_at AT TIME ZONE 'UTC')::date AS day, status, COUNT(*) AS n
        FROM old_rows GROUP BY 1, 2 ORDER BY 1, 2
    ) d
    WHERE c.day = d.day AND c.status = d.status;
    RETURN NULL;
END $$;

CREATE TRIGGER packets_counted_insert AFTER INSERT ON packets
    REFERENCING NEW TABLE AS new_rows FOR EACH STATEMENT EXECUTE FUNCTION packets_count_insert();
CREATE TRIGGER packets_counted_update AFTER UPDATE ON packets
    REFERENCING OLD TABLE AS old_rows NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION packets_count_update();
CREATE TRIGGER packets_counted_delete AFTER DELETE ON packets
    REFERENCING OLD TABLE AS old_rows FOR EACH STATEMENT EXECUTE FUNCTION packets_count_delete();
