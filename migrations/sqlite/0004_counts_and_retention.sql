-- Packets per status, kept by triggers as rows change, so Status and
-- /metrics read five rows instead of counting the table on every call.
CREATE TABLE packet_counts (
    status TEXT PRIMARY KEY,
    n      INTEGER NOT NULL
);
INSERT INTO packet_counts (status, n)
    SELECT s.status, (SELECT COUNT(*) FROM packets WHERE packets.status = s.status)
    FROM (SELECT 'pending' AS status UNION ALL SELECT 'leased' UNION ALL
          SELECT 'processed' UNION ALL SELECT 'failed' UNION ALL SELECT 'dead_letter') AS s;

CREATE TRIGGER packets_counted_insert AFTER INSERT ON packets BEGIN
    UPDATE packet_counts SET n = n + 1 WHERE status = NEW.status;
END;
CREATE TRIGGER packets_counted_update AFTER UPDATE OF status ON packets
WHEN OLD.status <> NEW.status BEGIN
    UPDATE packet_counts SET n = n - 1 WHERE status = OLD.status;
    UPDATE packet_counts SET n = n + 1 WHERE status = NEW.status;
END;
CREATE TRIGGER packets_counted_delete AFTER DELETE ON packets BEGIN
    UPDATE packet_counts SET n = n - 1 WHERE status = OLD.status;
END;

-- Retention deletes the oldest finished packets first; the queue
-- reconciler looks at recent ones. received_at only grows, so this index
-- costs one page at its end per commit.
CREATE INDEX packets_received ON packets (received_at);
