-- The user chains (0006) keyed by a number per user instead of its
-- user_id text. user_heads is rewritten almost whole by every fold (nearly
-- every packet is its user's only one in a fold): with user_id keys it
-- was ~260 of the ~1,550 bytes written per packet at 5,000/s over 10,000
-- users (BENCHMARKS.md, fifth session). With a number it is a rowid table
-- of ~10-byte rows, and user_folds rows shrink by the id's length too.
-- A user's number is written once, when the user is first folded.
CREATE TABLE users (
    num     INTEGER PRIMARY KEY,
    user_id TEXT NOT NULL UNIQUE
);
INSERT INTO users (user_id) SELECT user_id FROM user_heads ORDER BY user_id;
-- A head is removed only once none of its user's rows is left (retention),
-- so every user with rows has a head; these are for safety alone.
INSERT OR IGNORE INTO users (user_id) SELECT DISTINCT user_id FROM user_folds;

CREATE TABLE user_chain (
    fold     INTEGER NOT NULL,   -- the fold's first seq; every seq listed is at least this
    num      INTEGER NOT NULL,   -- users.num
    prev     INTEGER,            -- the user's previous row (its fold), if any
    last_seq INTEGER NOT NULL,   -- the largest seq listed (retention)
    seqs     TEXT NOT NULL,      -- JSON list of seqs
    PRIMARY KEY (fold, num)
) WITHOUT ROWID;
INSERT INTO user_chain (fold, num, prev, last_seq, seqs)
    SELECT f.fold, u.num, f.prev, f.last_seq, f.seqs
    FROM user_folds f JOIN users u ON u.user_id = f.user_id
    ORDER BY f.fold, u.num;
DROP TABLE user_folds;
ALTER TABLE user_chain RENAME TO user_folds;

CREATE TABLE user_tips (
    num  INTEGER PRIMARY KEY,    -- users.num
    fold INTEGER NOT NULL        -- the user's newest user_folds row
);
INSERT INTO user_tips (num, fold)
    SELECT u.num, h.fold FROM user_heads h JOIN users u ON u.user_id = h.user_id;
DROP TABLE user_heads;
ALTER TABLE user_tips RENAME TO user_heads;
