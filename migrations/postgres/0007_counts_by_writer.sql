-- Packet counts kept by the bucket's own statements instead of triggers,
-- and room on each page for a packet's mark.
--
-- The statement-level triggers of 0006 cost every insert and mark a
-- transition table (each row copied twice for an update), a PL/pgSQL call
-- and an upsert of the same few counter rows (today's pending and
-- processed): every writer's statement waited on that row for the other
-- writers' commits (their fsyncs included). Now each statement that changes
-- a packet's status or day adds its group's changes, as rows of
-- packet_count_deltas, in the same statement (a data-modifying CTE: one
-- round trip, one commit). Rows are only ever appended there, so no writer
-- waits on another; the bucket folds them into packet_counts every second.
-- The counts are packet_counts plus packet_count_deltas, exact at any
-- moment. Only the bucket's statements count: an UPDATE typed by hand that
-- changes a status or received_at must add its delta the same way, and
-- every bucket node must run this version (an older one writes no deltas).
DROP TRIGGER packets_counted_insert ON packets;
DROP TRIGGER packets_counted_update ON packets;
DROP TRIGGER packets_counted_delete ON packets;
DROP FUNCTION packets_count_insert();
DROP FUNCTION packets_count_update();
DROP FUNCTION packets_count_delete();

-- No index: nothing reads it but whole (Status, the fold, a day's drop).
CREATE TABLE packet_count_deltas (
    day    DATE NOT NULL,
    status TEXT NOT NULL,
    n      BIGINT NOT NULL
);

-- A mark rewrites its row (status is in the partial indexes' predicates, so
-- never a HOT update); when the new version fits on the row's own page, its
-- WAL record holds only the changed bytes, and the indexes' bottom-up
-- deletion finds both versions on one page. Half of each page is left for
-- that: measured 630 -> 380 B of WAL per mark, with the same table size once
-- the packets are marked (the old versions' room is reused). Pending
-- packets take twice the pages until then. New day partitions get this
-- from the bucket (src/store/partitions.rs); rows already stored keep
-- their pages.
DO $$
DECLARE
    part REGCLASS;
BEGIN
    FOR part IN SELECT inhrelid::regclass FROM pg_inherits WHERE inhparent = 'packets'::regclass
    LOOP
        EXECUTE format('ALTER TABLE %s SET (fillfactor = 50)', part);
    END LOOP;
END $$;

-- The primary key leads with received_at, so it also serves what the
-- received_at index served (retention's oldest first and a day's newest,
-- the reconciler's first seq since a time), and that index goes: one index
-- entry less on every insert and every mark (measured: 918 -> 850 B of WAL
-- per insert, 375 -> 298 per mark). Look-ups by (seq, received_at), the
-- way everything reaches a packet by id, use it as before. This builds the
-- key's index once over the stored packets, with the table locked.
ALTER TABLE packets DROP CONSTRAINT packets_seq_received,
    ADD CONSTRAINT packets_received_seq PRIMARY KEY (received_at, seq);
DROP INDEX packets_received;
