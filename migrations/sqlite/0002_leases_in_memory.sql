-- Leases moved out of the database (into the dispatcher's memory and the
-- Redis consumer group): a row leased by an older version is pending again,
-- and the lease columns and their indexes go.
UPDATE packets SET status = 'pending' WHERE status = 'leased';
DROP INDEX packets_lease_expiry;
DROP INDEX packets_lease_owner;
ALTER TABLE packets DROP COLUMN lease_owner;
ALTER TABLE packets DROP COLUMN lease_expires_at;

-- Only pending rows are read in arrival order (the backlog, the queue
-- rebuild). A partial index costs one delete when a packet gets its outcome,
-- instead of a delete and an insert for every change of status.
DROP INDEX packets_status_seq;
CREATE INDEX packets_pending_seq ON packets (seq) WHERE status = 'pending';
