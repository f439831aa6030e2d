//! `floor --durable DIR`: the floor with the bucket's obligations and
//! nothing else of the bucket, to measure what they cost at least together
//! (issue 15: the floor by component, measured as one process).
//!
//! An Ingest's packet and a request's marks are each one length-prefixed
//! record (the packet as its protobuf, a mark as its lease token); a
//! writer thread takes what waits after a fixed wait for company, writes it
//! as one block with one `pwrite` (O_DSYNC, direct I/O where the file
//! system takes it, into space written with zeros ahead, as the record
//! log's segments are), and only then are the
//! callers answered and the packets offered. Once a second a table thread
//! writes the second's packets into SQLite in one transaction (WAL,
//! `synchronous=FULL`, a PASSIVE checkpoint after), each in its final
//! state where its mark came in time and updated by id where it came
//! later, with the unique packet id and (user_id, seq) indexes UserPackets
//! and a retried Ingest need. No leases run out, no log is replayed or
//! released, no counts, no dedup on ingest: a bucket built this way (a
//! synced record log, SQLite tables) spends at least what it spends.
use std::collections::HashSet;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::mpsc as sync_mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use bucket::proto::bucket::v1 as pb;
use prost::Message;
use rusqlite::{Connection, params};
use tokio::sync::oneshot;

const ALIGN: usize = 4096;
const ALLOCATE_AHEAD: u64 = 32 << 20;

/// The durable half: the record log's writer and the tables' thread.
pub struct Durable {
    jobs: sync_mpsc::Sender<Job>,
}

struct Job {
    record: Vec<u8>,
    written: Written,
    synced: oneshot::Sender<()>,
}

/// What the tables learn once a job's record is on disk.
enum Written {
    Packet(Box<pb::Packet>),
    Marks(Vec<String>),
}

/// What the tables do not hold yet.
#[derive(Default)]
struct Unfolded {
    packets: Vec<pb::Packet>,
    marked: HashSet<String>,
}

impl Durable {
    /// Opens the log and the database in `dir` (made if missing) and
    /// starts both threads; `wait` is the writer's wait for company.
    pub fn start(dir: &Path, wait: Duration) -> Result<Self> {
        std::fs::create_dir_all(dir).with_context(|| format!("making {}", dir.display()))?;
        let (log, direct) = open_log(&dir.join("floor.log"))?;
        let tables = open_tables(&dir.join("floor.db"))?;
        eprintln!(
            "floor: durable in {} (log {}, wait {} µs)",
            dir.display(),
            if direct { "O_DSYNC, direct" } else { "O_DSYNC" },
            wait.as_micros()
        );
        let (jobs, waiting) = sync_mpsc::channel();
        let unfolded = Arc::new(Mutex::new(Unfolded::default()));
        let (written, to_fold) = (unfolded.clone(), unfolded);
        std::thread::Builder::new()
            .name("floor-writer".into())
            .spawn(move || write_groups(&log, &waiting, wait, &written))?;
        std::thread::Builder::new()
            .name("floor-tables".into())
            .spawn(move || fold_every_second(&tables, &to_fold))?;
        Ok(Self { jobs })
    }

    /// Returns once the packet's record is on disk.
    pub async fn ingested(&self, packet: &pb::Packet) {
        let record = packet.encode_to_vec();
        let synced = self.submit(record, Written::Packet(Box::new(packet.clone())));
        synced.await.expect("the writer answers every job");
    }

    /// Resolves once the marks' record is on disk (at once for none).
    pub fn marks(&self, tokens: Vec<String>) -> oneshot::Receiver<()> {
        if tokens.is_empty() {
            let (synced, on_disk) = oneshot::channel();
            let _ = synced.send(());
            return on_disk;
        }
        self.submit(tokens.join("\n").into_bytes(), Written::Marks(tokens))
    }

    fn submit(&self, record: Vec<u8>, written: Written) -> oneshot::Receiver<()> {
        let (synced, on_disk) = oneshot::channel();
        let job = Job {
            record,
            written,
            synced,
        };
        self.jobs
            .send(job)
            .expect("the writer thread runs for as long as the process");
        on_disk
    }
}

fn open_log(path: &Path) -> Result<(File, bool)> {
    let (file, direct) = crate::disk::open_synced(path)?;
    // Written, not only allocated: a synced write into allocated space
    // converts its extent on ext4 and writes that metadata too.
    crate::disk::write_zeros(&file, ALLOCATE_AHEAD)?;
    Ok((file, direct))
}

/// The writer thread: one synced block per group, then every caller in it
/// is answered. Wraps to the start of the log at its end (nothing replays it).
fn write_groups(
    log: &File,
    jobs: &sync_mpsc::Receiver<Job>,
    wait: Duration,
    unfolded: &Mutex<Unfolded>,
) {
    let mut buf: Vec<u8> = Vec::new();
    let mut offset = 0u64;
    let mut group = Vec::new();
    while let Ok(first) = jobs.recv() {
        std::thread::sleep(wait);
        group.push(first);
        group.extend(jobs.try_iter());
        let records: usize = group.iter().map(|j| 4 + j.record.len()).sum();
        let block = records.div_ceil(ALIGN) * ALIGN;
        buf.clear();
        buf.resize(block + ALIGN, 0);
        let start = buf.as_ptr().align_offset(ALIGN);
        let mut at = start;
        for job in &group {
            let len = job.record.len() as u32;
            buf[at..at + 4].copy_from_slice(&len.to_le_bytes());
            buf[at + 4..at + 4 + job.record.len()].copy_from_slice(&job.record);
            at += 4 + job.record.len();
        }
        if offset + block as u64 > ALLOCATE_AHEAD {
            offset = 0;
        }
        log.write_at(&buf[start..start + block], offset)
            .expect("the floor's log takes its writes");
        offset += block as u64;
        let mut tables = unfolded.lock().expect("unfolded lock");
        for job in group.drain(..) {
            match job.written {
                Written::Packet(packet) => tables.packets.push(*packet),
                Written::Marks(tokens) => tables.marked.extend(tokens),
            }
            let _ = job.synced.send(());
        }
    }
}

fn open_tables(path: &Path) -> Result<Connection> {
    let conn = Connection::open(path)?;
    conn.execute_batch(
        "PRAGMA journal_mode = WAL; PRAGMA synchronous = FULL; PRAGMA wal_autocheckpoint = 0;
         CREATE TABLE IF NOT EXISTS t (seq INTEGER PRIMARY KEY, packet_id TEXT NOT NULL,
           user_id TEXT NOT NULL, received_at INTEGER NOT NULL, processed INTEGER NOT NULL,
           body BLOB NOT NULL);
         CREATE UNIQUE INDEX IF NOT EXISTS t_id ON t (packet_id);
         CREATE INDEX IF NOT EXISTS t_user ON t (user_id, seq);",
    )?;
    Ok(conn)
}

/// The table thread: once a second, what came in that second.
fn fold_every_second(conn: &Connection, unfolded: &Mutex<Unfolded>) {
    let start = Instant::now();
    for second in 1.. {
        let next = start + Duration::from_secs(second);
        std::thread::sleep(next.saturating_duration_since(Instant::now()));
        let Unfolded {
            packets,
            mut marked,
        } = std::mem::take(&mut *unfolded.lock().expect("unfolded lock"));
        fold(conn, &packets, &mut marked).expect("the floor's tables take their writes");
    }
}

fn fold(conn: &Connection, packets: &[pb::Packet], marked: &mut HashSet<String>) -> Result<()> {
    let tx = conn.unchecked_transaction()?;
    {
        let mut insert = tx.prepare_cached(
            "INSERT INTO t (packet_id, user_id, received_at, processed, body) \
             VALUES (?1, ?2, ?3, ?4, ?5)",
        )?;
        for p in packets {
            let processed = marked.remove(&p.packet_id);
            let received = p
                .received_at
                .map_or(0, |t| t.seconds * 1_000_000 + i64::from(t.nanos / 1000));
            insert.execute(params![
                p.packet_id,
                p.user_id,
                received,
                processed,
                p.encode_to_vec()
            ])?;
        }
        let mut update = tx.prepare_cached("UPDATE t SET processed = 1 WHERE packet_id = ?1")?;
        for id in marked.iter() {
            update.execute([id])?;
        }
    }
    tx.commit()?;
    conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |_| Ok(()))?;
    Ok(())
}
