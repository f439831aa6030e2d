-- The record log (src/store/sqlite/log) takes every acknowledged write;
-- the tables are brought up to date from it about once a second, in one
-- transaction per fold.
--
-- fold_meta: how far into the log the tables are (a position in it), and
-- the seq the next packet gets.
CREATE TABLE fold_meta (
    id         INTEGER PRIMARY KEY CHECK (id = 1),
    folded_lsn INTEGER NOT NULL,
    next_seq   INTEGER NOT NULL
);
INSERT INTO fold_meta (id, folded_lsn, next_seq)
    SELECT 1, 0, COALESCE(MAX(seq), 0) + 1 FROM packets;

-- A user's packets, newest first, without an index on (user_id, seq): that
-- index took a random leaf page per packet (users' packets interleave), the
-- largest part of what a commit wrote. Instead each fold adds one row per
-- user it saw, keyed by the fold's first seq, so this table only grows at
-- its end; a row lists the user's seqs of that fold and points at the
-- user's previous row; user_heads names each user's newest row (a small
-- table: one row per user).
CREATE TABLE user_folds (
    fold     INTEGER NOT NULL,   -- the fold's first seq; every seq listed is at least this
    user_id  TEXT NOT NULL,
    prev     INTEGER,            -- the user's previous row (its fold), if any
    last_seq INTEGER NOT NULL,   -- the largest seq listed (retention)
    seqs     TEXT NOT NULL,      -- JSON list of seqs
    PRIMARY KEY (fold, user_id)
) WITHOUT ROWID;
CREATE TABLE user_heads (
    user_id TEXT PRIMARY KEY,
    fold    INTEGER NOT NULL
) WITHOUT ROWID;

-- The packets already stored, as rows of 4,096 seqs per user.
INSERT INTO user_folds (fold, user_id, prev, last_seq, seqs)
    SELECT first, user_id, LAG(first) OVER (PARTITION BY user_id ORDER BY first), last, seqs
    FROM (SELECT user_id, MIN(seq) AS first, MAX(seq) AS last, json_group_array(seq) AS seqs
          FROM (SELECT user_id, seq FROM packets ORDER BY seq)
          GROUP BY user_id, seq / 4096);
INSERT INTO user_heads (user_id, fold)
    SELECT user_id, MAX(fold) FROM user_folds GROUP BY user_id;

DROP INDEX packets_user_seq;
-- received_at grows with seq (one writer stamps both): retention and the
-- reconciler find a time's first seq by a binary search over seq instead.
DROP INDEX packets_received;
