-- Every PRANA packet, with its delivery state. The row is the truth; the
-- queue only indexes which pending packets to hand out next.
CREATE TABLE packets (
    seq                BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY, -- arrival order; page token
    packet_id          UUID NOT NULL UNIQUE,
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
        CHECK (status IN ('pending', 'leased', 'processed', 'failed', 'dead_letter')),
    delivery_attempts  INTEGER NOT NULL DEFAULT 0,
    lease_owner        TEXT,
    lease_expires_at   BIGINT,                   -- unix milliseconds
    processed_at       TIMESTAMPTZ,
    processed_by_karma BOOLEAN NOT NULL DEFAULT FALSE,
    karma_actions      JSONB NOT NULL DEFAULT '[]',
    processing_error   TEXT
);

-- UserPackets: newest first, optionally one status.
CREATE INDEX packets_user_seq ON packets (user_id, seq);
CREATE INDEX packets_user_status_seq ON packets (user_id, status, seq);
-- Queue rebuild (pending, oldest first) and Status counts.
CREATE INDEX packets_status_seq ON packets (status, seq);
-- The lease sweeper and stream release look at leased rows only.
CREATE INDEX packets_lease_expiry ON packets (lease_expires_at) WHERE status = 'leased';
CREATE INDEX packets_lease_owner ON packets (lease_owner) WHERE status = 'leased';
