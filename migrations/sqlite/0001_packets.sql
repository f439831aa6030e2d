-- Every PRANA packet, with its delivery state. The row is the truth; the
-- queue only indexes which pending packets to hand out next.
CREATE TABLE packets (
    seq                INTEGER PRIMARY KEY,      -- arrival order; page token
    packet_id          TEXT NOT NULL UNIQUE,     -- UUID, hyphenated
    user_id            TEXT NOT NULL,
    employee_id        TEXT,
    session_id         TEXT,
    lesson_id          TEXT,
    system_type        TEXT,
    role               TEXT,
    client_timestamp   TEXT NOT NULL,
    cognitive_state    TEXT NOT NULL,
    state              TEXT,
    active_seconds     REAL NOT NULL,
    idle_seconds       REAL NOT NULL,
    away_seconds       REAL NOT NULL,
    focus_score        REAL,
    integrity_score    REAL NOT NULL,
    raw_signals        TEXT NOT NULL,            -- JSON object
    received_at        TEXT NOT NULL,
    status             TEXT NOT NULL DEFAULT 'pending'
        CHECK (status IN ('pending', 'leased', 'processed', 'failed', 'dead_letter')),
    delivery_attempts  INTEGER NOT NULL DEFAULT 0,
    lease_owner        TEXT,
    lease_expires_at   INTEGER,                  -- unix milliseconds
    processed_at       TEXT,
    processed_by_karma BOOLEAN NOT NULL DEFAULT FALSE,
    karma_actions      TEXT NOT NULL DEFAULT '[]', -- JSON list
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
