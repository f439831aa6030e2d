-- A fold counts the packets it inserts itself, one UPDATE per status per
-- fold (src/store/sqlite/fold.rs, `count_new`), instead of a trigger
-- program per inserted row. A row written over itself again (a fold that
-- committed, its overlay entry not yet gone) is an UPDATE, still counted
-- by packets_counted_update; marks folded after their insert, Redrive,
-- Replay and retention keep their triggers too.
DROP TRIGGER packets_counted_insert;
