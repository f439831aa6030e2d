//! `tables`: what keeping the packets in SQLite tables costs at least,
//! with nothing of the bucket. Once a second, a second's packets go into a
//! table in one transaction, the way the fold brings the bucket's tables up
//! to date (WAL, `synchronous=FULL`, a PASSIVE checkpoint after each
//! commit), each row already in its final state and as small as a packet
//! can be stored (its id, user, time and one ~400-byte body). Three
//! tables, each with one more index than the last: the rows alone; with
//! the unique packet id (a retried Ingest must find its packet); and with
//! (user_id, seq) for UserPackets. The thread's CPU per row is the least
//! a design that serves UserPackets and deduplicates by id from SQLite
//! spends beside the protocol and the synced append.
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use rusqlite::{Connection, params};

use crate::disk::thread_cpu;
use crate::proc_stats;
use crate::users::UserSpread;

pub struct TablesPlan {
    pub dir: std::path::PathBuf,
    pub rate: u64,
    pub duration: Duration,
    pub users: u64,
}

const VARIANTS: [(&str, &str); 3] = [
    ("rows alone", ""),
    (
        "+ unique packet_id",
        "CREATE UNIQUE INDEX t_id ON t (packet_id);",
    ),
    (
        "+ (user_id, seq)",
        "CREATE UNIQUE INDEX t_id ON t (packet_id); CREATE INDEX t_user ON t (user_id, seq);",
    ),
];

pub fn run(plan: &TablesPlan) -> Result<()> {
    println!(
        "tables: {} rows a second for {} s in one transaction a second, {} users; CPU of the writing thread",
        plan.rate,
        plan.duration.as_secs(),
        plan.users
    );
    for (name, indexes) in VARIANTS {
        let dir = tempfile::tempdir_in(&plan.dir)
            .with_context(|| format!("a directory in {}", plan.dir.display()))?;
        let measured = one(plan, &dir.path().join("t.db"), indexes)?;
        println!(
            "{name:<20} {:>6.2} µs CPU per row ({:.2} user, {:.2} system), {:>6.0} B written per row, commit + checkpoint p50 {:.1} ms, max {:.1} ms",
            measured.cpu_us(),
            measured.user_us,
            measured.system_us,
            measured.bytes_per_row,
            measured.p50_ms,
            measured.max_ms,
        );
    }
    Ok(())
}

struct Measured {
    user_us: f64,
    system_us: f64,
    bytes_per_row: f64,
    p50_ms: f64,
    max_ms: f64,
}

impl Measured {
    fn cpu_us(&self) -> f64 {
        self.user_us + self.system_us
    }
}

fn one(plan: &TablesPlan, path: &std::path::Path, indexes: &str) -> Result<Measured> {
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0;",
    )?;
    conn.execute_batch(&format!(
        "CREATE TABLE t (seq INTEGER PRIMARY KEY, packet_id TEXT NOT NULL, \
         user_id TEXT NOT NULL, received_at TEXT NOT NULL, body TEXT NOT NULL); {indexes}"
    ))?;
    let body = format!("{{\"raw_signals\":\"{}\"}}", "x".repeat(380));
    let mut seq: i64 = 0;
    let users = UserSpread::new(plan.users);
    let write = |conn: &Connection, seq: &mut i64| -> Result<()> {
        let tx = conn.unchecked_transaction()?;
        {
            let mut insert = tx.prepare_cached(
                "INSERT INTO t (seq, packet_id, user_id, received_at, body) VALUES (?1, ?2, ?3, ?4, ?5)",
            )?;
            for _ in 0..plan.rate {
                *seq += 1;
                // Random (v4) ids: each lands on its own leaf of the index.
                insert.execute(params![
                    *seq,
                    uuid::Uuid::new_v4().hyphenated().to_string(),
                    users.user_id(*seq as u64),
                    "2026-12-04T15:00:00.000000Z",
                    body
                ])?;
            }
        }
        tx.commit()?;
        conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
        Ok(())
    };
    // Two seconds' rows first: the tables and indexes have leaves to land in.
    write(&conn, &mut seq)?;
    write(&conn, &mut seq)?;
    let (cpu0, bytes0) = (thread_cpu(), thread_write_bytes());
    let mut took = Vec::new();
    let seconds = plan.duration.as_secs().max(1);
    let start = Instant::now();
    for second in 0..seconds {
        let began = Instant::now();
        write(&conn, &mut seq)?;
        took.push(began.elapsed());
        let next = start + Duration::from_secs(second + 1);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
    }
    let (cpu, bytes1) = (thread_cpu() - cpu0, thread_write_bytes());
    let rows = (seconds * plan.rate) as f64;
    took.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    Ok(Measured {
        user_us: cpu.user * 1e6 / rows,
        system_us: cpu.system * 1e6 / rows,
        bytes_per_row: bytes1.saturating_sub(bytes0) as f64 / rows,
        p50_ms: ms(took[took.len() / 2]),
        max_ms: ms(*took.last().expect("at least one second")),
    })
}

/// Bytes this thread caused to be written.
fn thread_write_bytes() -> u64 {
    proc_stats::thread_io().map_or(0, |io| io.write_bytes)
}
