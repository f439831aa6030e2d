//! Each user's chain of folds, which UserPackets walks (migrations
//! 0006-0007): one `user_folds` row per user per fold, keyed by the fold's
//! first seq so the table only grows at its end, pointing at the user's
//! previous row; `user_heads` names the newest. Both name a user by its
//! number (`users`, given at the user's first fold).
//!
//! Invariant: [`Numbers`] knows a user's number only as a committed
//! transaction left it: numbers given in a fold are learnt after its
//! commit (a fold rolled back gives none), and retention, which may take
//! numbers back (and SQLite may give a taken-back number again), makes it
//! forget them all.
use std::collections::{BTreeMap, HashMap};

use crate::store::{StoreError, rows};

/// Users past which [`Numbers`] starts over, so a spread of users far
/// wider than the active ones cannot grow the fold thread without bound
/// (~70 bytes each; 10,000 active users are ~0.7 MiB).
const KNOWN_AT_MOST: usize = 1 << 15;

/// User numbers the fold has read or given, so that a fold names each user
/// by its number without looking the user's id up in `users` (three
/// look-ups per user per fold before, when the chains were a quarter of
/// the fold's CPU; 0.6-1 µs per packet less kept, BENCHMARKS.md).
#[derive(Default)]
pub struct Numbers {
    known: HashMap<String, i64>,
    /// Read or given by the fold under way, not committed yet.
    staged: Vec<(String, i64)>,
}

impl Numbers {
    /// The fold's transaction committed: what it read or gave is known.
    pub fn committed(&mut self) {
        if self.known.len() + self.staged.len() > KNOWN_AT_MOST {
            self.known.clear();
        }
        self.known.extend(self.staged.drain(..));
    }

    /// Retention took numbers back.
    pub fn forget_all(&mut self) {
        self.known.clear();
        self.staged.clear();
    }

    #[cfg(test)]
    pub fn len(&self) -> usize {
        self.known.len()
    }
}

/// Adds this fold's new packets (user and seq, in seq order) to each
/// user's chain.
pub fn link(
    tx: &rusqlite::Transaction<'_>,
    new: &[(&str, i64)],
    numbers: &mut Numbers,
) -> Result<(), StoreError> {
    // What a fold that failed had read is dropped with it.
    numbers.staged.clear();
    let Some(fold) = new.first().map(|(_, seq)| *seq) else {
        return Ok(());
    };
    let mut by_user: BTreeMap<&str, Vec<i64>> = BTreeMap::new();
    for (user, seq) in new {
        by_user.entry(user).or_default().push(*seq);
    }
    let unknown: Vec<&str> = by_user
        .keys()
        .copied()
        .filter(|user| !numbers.known.contains_key(*user))
        .collect();
    number(tx, &unknown, &mut numbers.staged)?;
    let staged: HashMap<&str, i64> = numbers
        .staged
        .iter()
        .map(|(user, num)| (user.as_str(), *num))
        .collect();
    let mut users: Vec<(i64, i64, String)> = by_user
        .into_iter()
        .map(|(user, seqs)| {
            let num = numbers
                .known
                .get(user)
                .or_else(|| staged.get(user))
                .copied()
                .ok_or_else(|| {
                    StoreError::Internal(format!("user {user:?} got no number").into())
                })?;
            let last = *seqs.last().expect("at least one");
            let seqs = serde_json::to_string(&seqs).expect("numbers encode");
            Ok((num, last, seqs))
        })
        .collect::<Result<_, StoreError>>()?;
    // In number order, a fold's rows are appended in key order.
    users.sort_unstable_by_key(|(num, _, _)| *num);
    // Several users per statement (each user once, so no row of a chunk
    // reads a head another row of it moves); the links read the heads
    // before the heads move on.
    for chunk in rows::chunks(&users) {
        let mut link = tx.prepare_cached(link_sql(chunk.len()))?;
        link.raw_bind_parameter(1, fold)?;
        for (i, (num, last, seqs)) in chunk.iter().enumerate() {
            link.raw_bind_parameter(2 + 3 * i, num)?;
            link.raw_bind_parameter(3 + 3 * i, last)?;
            link.raw_bind_parameter(4 + 3 * i, seqs)?;
        }
        link.raw_execute()?;
        let mut advance = tx.prepare_cached(advance_sql(chunk.len()))?;
        advance.raw_bind_parameter(1, fold)?;
        for (i, (num, _, _)) in chunk.iter().enumerate() {
            advance.raw_bind_parameter(2 + i, num)?;
        }
        advance.raw_execute()?;
    }
    Ok(())
}

/// Gives `users` their numbers where they have none, and stages what each
/// one's number is.
fn number(
    tx: &rusqlite::Transaction<'_>,
    users: &[&str],
    staged: &mut Vec<(String, i64)>,
) -> Result<(), StoreError> {
    for chunk in rows::chunks(users) {
        let mut give = tx.prepare_cached(number_sql(chunk.len()))?;
        let mut read = tx.prepare_cached(read_sql(chunk.len()))?;
        for (i, user) in chunk.iter().enumerate() {
            give.raw_bind_parameter(1 + i, user)?;
            read.raw_bind_parameter(1 + i, user)?;
        }
        give.raw_execute()?;
        let mut found = read.raw_query();
        while let Some(row) = found.next()? {
            staged.push((row.get(0)?, row.get(1)?));
        }
    }
    Ok(())
}

/// `each(i)` for `i` in `0..n`, comma-separated: a statement's rows of
/// placeholders.
fn list(n: usize, each: impl Fn(usize) -> String) -> String {
    (0..n).map(each).collect::<Vec<_>>().join(", ")
}

/// Gives each of `n` users not numbered yet its number.
fn number_sql(n: usize) -> &'static str {
    rows::shaped!(n, |n| {
        format!(
            "INSERT OR IGNORE INTO users (user_id) VALUES {}",
            list(n, |i| format!("(?{})", 1 + i))
        )
    })
}

/// The numbers of `n` users.
fn read_sql(n: usize) -> &'static str {
    rows::shaped!(n, |n| {
        format!(
            "SELECT user_id, num FROM users WHERE user_id IN ({})",
            list(n, |i| format!("?{}", 1 + i))
        )
    })
}

/// Links `n` users' rows of fold `?1` (by number) to each one's previous
/// head (none when the head is this very fold: a fold replayed over
/// itself).
fn link_sql(n: usize) -> &'static str {
    rows::shaped!(n, |n| {
        let rows = list(n, |i| {
            format!("(?{}, ?{}, ?{})", 2 + 3 * i, 3 + 3 * i, 4 + 3 * i)
        });
        format!(
            "INSERT OR IGNORE INTO user_folds (fold, num, prev, last_seq, seqs) \
             SELECT ?1, v.column1, (SELECT h.fold FROM user_heads h \
             WHERE h.num = v.column1 AND h.fold <> ?1), v.column2, v.column3 \
             FROM (VALUES {rows}) AS v"
        )
    })
}

/// Moves `n` users' heads (by number) to fold `?1`.
fn advance_sql(n: usize) -> &'static str {
    rows::shaped!(n, |n| {
        format!(
            "INSERT INTO user_heads (num, fold) VALUES {} \
             ON CONFLICT (num) DO UPDATE SET fold = excluded.fold",
            list(n, |i| format!("(?{}, ?1)", 2 + i))
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A database with every SQLite migration applied.
    fn tables() -> rusqlite::Connection {
        let conn = rusqlite::Connection::open_in_memory().unwrap();
        super::super::migrate_for_tests(&conn);
        conn
    }

    /// Links `new` in one transaction, committed.
    fn fold(conn: &rusqlite::Connection, numbers: &mut Numbers, new: &[(&str, i64)]) {
        let tx = conn.unchecked_transaction().unwrap();
        link(&tx, new, numbers).unwrap();
        tx.commit().unwrap();
        numbers.committed();
    }

    fn num(conn: &rusqlite::Connection, user: &str) -> i64 {
        conn.query_row("SELECT num FROM users WHERE user_id = ?1", [user], |r| {
            r.get(0)
        })
        .unwrap()
    }

    /// Every `user_folds` row as (fold, user_id, prev, last_seq, seqs),
    /// the user named through `users`.
    fn chain_rows(conn: &rusqlite::Connection) -> Vec<(i64, String, Option<i64>, i64, String)> {
        let mut rows = conn
            .prepare(
                "SELECT f.fold, u.user_id, f.prev, f.last_seq, f.seqs FROM user_folds f \
                 JOIN users u ON u.num = f.num ORDER BY f.fold, u.user_id",
            )
            .unwrap();
        rows.query_map([], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap()
    }

    fn heads(conn: &rusqlite::Connection) -> Vec<(String, i64)> {
        let mut rows = conn
            .prepare(
                "SELECT u.user_id, h.fold FROM user_heads h JOIN users u ON u.num = h.num \
                 ORDER BY u.user_id",
            )
            .unwrap();
        rows.query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    }

    fn row(
        fold: i64,
        user: &str,
        prev: Option<i64>,
        last: i64,
        seqs: &str,
    ) -> (i64, String, Option<i64>, i64, String) {
        (fold, user.into(), prev, last, seqs.into())
    }

    #[test]
    fn a_user_keeps_one_number_and_a_chain_across_folds() {
        let conn = tables();
        let mut numbers = Numbers::default();
        fold(&conn, &mut numbers, &[("a", 1), ("b", 2), ("a", 3)]);
        fold(&conn, &mut numbers, &[("a", 10)]);
        assert_eq!(numbers.len(), 2);
        assert_eq!(
            chain_rows(&conn),
            [
                row(1, "a", None, 3, "[1,3]"),
                row(1, "b", None, 2, "[2]"),
                row(10, "a", Some(1), 10, "[10]"),
            ]
        );
        assert_eq!(heads(&conn), [("a".into(), 10), ("b".into(), 1)]);
        // A fold written again (replayed over itself) links nothing twice.
        fold(&conn, &mut numbers, &[("a", 10)]);
        assert_eq!(chain_rows(&conn).len(), 3);
        assert_eq!(heads(&conn), [("a".into(), 10), ("b".into(), 1)]);
    }

    #[test]
    fn a_number_read_in_a_rolled_back_fold_is_not_kept() {
        let conn = tables();
        let mut numbers = Numbers::default();
        fold(&conn, &mut numbers, &[("a", 1)]);
        {
            let tx = conn.unchecked_transaction().unwrap();
            link(&tx, &[("c", 2)], &mut numbers).unwrap();
            // Dropped: rolled back, as a fold that fails after linking.
        }
        // `d` now gets the number `c` had in the rolled-back fold.
        fold(&conn, &mut numbers, &[("d", 3)]);
        fold(&conn, &mut numbers, &[("c", 4)]);
        assert_ne!(num(&conn, "c"), num(&conn, "d"));
        assert_eq!(
            chain_rows(&conn),
            [
                row(1, "a", None, 1, "[1]"),
                row(3, "d", None, 3, "[3]"),
                row(4, "c", None, 4, "[4]"),
            ]
        );
    }

    #[test]
    fn numbers_taken_back_are_forgotten() {
        let conn = tables();
        let mut numbers = Numbers::default();
        fold(&conn, &mut numbers, &[("a", 1), ("b", 2)]);
        let b = num(&conn, "b");
        // Retention takes everything of `b` back, its number with it.
        conn.execute_batch(&format!(
            "DELETE FROM user_folds WHERE num = {b}; DELETE FROM user_heads WHERE num = {b}; \
             DELETE FROM users WHERE num = {b};"
        ))
        .unwrap();
        numbers.forget_all();
        // `e` gets the number `b` had; `b` must not land under it.
        fold(&conn, &mut numbers, &[("e", 3)]);
        assert_eq!(num(&conn, "e"), b);
        fold(&conn, &mut numbers, &[("b", 4)]);
        assert_eq!(
            chain_rows(&conn),
            [
                row(1, "a", None, 1, "[1]"),
                row(3, "e", None, 3, "[3]"),
                row(4, "b", None, 4, "[4]"),
            ]
        );
        assert_eq!(
            heads(&conn),
            [("a".into(), 1), ("b".into(), 4), ("e".into(), 3)]
        );
    }
}
