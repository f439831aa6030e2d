//! The record log: where an acknowledged write is durable before SQLite's
//! tables have it.
//!
//! Invariants:
//! - A commit group is one block ([`block`]) written with one `pwrite` and
//!   on disk (O_DSYNC) before the call returns; nothing is acknowledged
//!   before that. Blocks follow each other in log positions (LSNs) and are
//!   never written again once written: the next block starts on the next
//!   sector.
//! - The log is a row of segment files of `segment_size` bytes; segment `i`
//!   holds positions `[i * segment_size, (i + 1) * segment_size)`. A block
//!   that does not fit in what is left of a segment starts the next one.
//! - Reading from a position stops at the first thing that is not a block
//!   of that position (a torn write, zeros, what an earlier use of a
//!   recycled file left): that is the end of the log, and writing goes on
//!   from there. Only the last write can be torn, since each write waits
//!   for the one before to be on disk.
//! - Positions below what [`RecordLog::release`] was given are folded into
//!   SQLite's tables for good; whole segments below it are reused (renamed
//!   to the next segment's name: their space stays allocated, so a write
//!   there changes no file metadata) or deleted.
//!
//! Blocks go to disk with direct I/O where the file system allows it (not
//! tmpfs): the write is exactly the block's sectors, where a buffered write
//! followed by a sync writes back the whole 4 KiB page of the log's tail at
//! every commit. Space is allocated ahead a MiB at a time, so most writes
//! change no metadata either.
pub mod block;

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// How far ahead of the write position space is allocated.
const ALLOCATE_AHEAD: u64 = 1 << 20;

/// Buffers handed to direct I/O start at this alignment.
const ALIGN: usize = 4096;

pub struct RecordLog {
    dir: PathBuf,
    segment_size: u64,
    /// The segment being written.
    current: Segment,
    /// Where the next block goes.
    end: u64,
    /// Positions below this are folded into the tables.
    released: Arc<AtomicU64>,
    /// Held (flock) while this log is open: one process writes a log.
    /// None once closed.
    lock: Option<File>,
    /// The write buffer, over-allocated so an aligned slice fits.
    buf: Vec<u8>,
    direct: bool,
}

struct Segment {
    index: u64,
    file: File,
    /// Bytes of the file with space allocated.
    allocated: u64,
}

/// What [`RecordLog::open`] found after the position it was given.
pub struct Replayed {
    /// Every block's payload, in order.
    pub payloads: Vec<Vec<u8>>,
    /// Where the log ended (the next block's position).
    pub end: u64,
}

fn name(index: u64) -> String {
    format!("{index:020}.seg")
}

fn index_of(file_name: &str) -> Option<u64> {
    let digits = file_name.strip_suffix(".seg")?;
    (digits.len() == 20 && digits.bytes().all(|b| b.is_ascii_digit()))
        .then(|| digits.parse().ok())
        .flatten()
}

/// The segment files in `dir`, by index.
fn segments(dir: &Path) -> io::Result<Vec<u64>> {
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        if let Some(index) = entry?.file_name().to_str().and_then(index_of) {
            found.push(index);
        }
    }
    found.sort_unstable();
    Ok(found)
}

/// Makes a directory entry change (a new or renamed file) durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// The directory holding `dir`'s entry. A relative name of one component
/// (`bucket.db-records`, the default database's log) has the empty path
/// as its parent, which no call can open: it is the working directory.
fn parent_of(dir: &Path) -> PathBuf {
    match dir.parent() {
        Some(parent) if !parent.as_os_str().is_empty() => parent.to_owned(),
        _ => PathBuf::from("."),
    }
}

impl RecordLog {
    /// Opens (or creates) the log in `dir` and reads every block from
    /// position `from` on; writing resumes where they end.
    pub fn open(dir: &Path, segment_size: u64, from: u64) -> io::Result<(RecordLog, Replayed)> {
        assert!(
            segment_size >= 4 * ALLOCATE_AHEAD && segment_size.is_multiple_of(block::SECTOR as u64),
            "segment size"
        );
        if !dir.exists() {
            std::fs::create_dir_all(dir)?;
            sync_dir(&parent_of(dir))?;
        }
        let lock = lock(dir)?;
        let replayed = replay(dir, segment_size, from)?;
        let index = replayed.end / segment_size;
        let direct = probe_direct(dir);
        let current = open_segment(dir, index, direct)?;
        let log = RecordLog {
            dir: dir.to_owned(),
            segment_size,
            current,
            end: replayed.end,
            released: Arc::new(AtomicU64::new(from)),
            lock: Some(lock),
            buf: Vec::new(),
            direct,
        };
        log.drop_released()?;
        Ok((log, replayed))
    }

    /// Where the next block goes.
    pub fn end(&self) -> u64 {
        self.end
    }

    /// Whether blocks bypass the page cache (false on file systems without
    /// direct I/O, such as tmpfs; each write is still synced).
    pub fn direct(&self) -> bool {
        self.direct
    }

    /// Lets go of the log: appends fail from now on, and another process
    /// may open it.
    pub fn close(&mut self) {
        self.lock = None;
    }

    /// A handle to say what is folded, from another thread.
    pub fn releaser(&self) -> Releaser {
        Releaser(self.released.clone())
    }

    /// Writes one block and returns once it is on disk; answers the
    /// position after it. On an error nothing counts as written, and the
    /// next append writes at the same position.
    pub fn append(&mut self, payload: &[u8]) -> io::Result<u64> {
        if self.lock.is_none() {
            return Err(io::Error::other("the record log is closed"));
        }
        let size = block::size(payload.len()) as u64;
        if size > self.segment_size {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "a commit group of {} bytes is larger than a log segment",
                    payload.len()
                ),
            ));
        }
        let mut at = self.end;
        if at % self.segment_size + size > self.segment_size {
            at = (at / self.segment_size + 1) * self.segment_size;
        }
        let index = at / self.segment_size;
        if index != self.current.index {
            self.move_to(index)?;
        }
        let offset = at - index * self.segment_size;
        if offset + size > self.current.allocated {
            self.allocate(offset + size)?;
        }
        let buf = aligned(&mut self.buf, size as usize);
        block::encode(at, payload, buf);
        let written = self.current.file.write_at(buf, offset)?;
        if written as u64 != size {
            return Err(io::Error::new(
                io::ErrorKind::WriteZero,
                format!("the log took {written} of {size} bytes"),
            ));
        }
        self.end = at + size;
        Ok(self.end)
    }

    /// Space for the current segment up to at least `upto` bytes.
    fn allocate(&mut self, upto: u64) -> io::Result<()> {
        let want = (upto + ALLOCATE_AHEAD).min(self.segment_size);
        let from = self.current.allocated;
        // SAFETY: fallocate on a file descriptor we own, with in-range values.
        let rc = unsafe {
            libc::fallocate(
                self.current.file.as_raw_fd(),
                0,
                from as libc::off_t,
                (want - from) as libc::off_t,
            )
        };
        if rc != 0 {
            let e = io::Error::last_os_error();
            // A file system without fallocate grows the file as it writes.
            if e.raw_os_error() != Some(libc::EOPNOTSUPP) {
                return Err(e);
            }
        }
        self.current.allocated = want;
        Ok(())
    }

    /// Starts writing segment `index`, reusing a released segment file
    /// where there is one.
    fn move_to(&mut self, index: u64) -> io::Result<()> {
        let path = self.dir.join(name(index));
        if !path.exists() {
            let free = self.released.load(Ordering::Acquire) / self.segment_size;
            if let Some(old) = segments(&self.dir)?.into_iter().find(|i| *i < free) {
                std::fs::rename(self.dir.join(name(old)), &path)?;
                sync_dir(&self.dir)?;
            }
        }
        self.current = open_segment(&self.dir, index, self.direct)?;
        self.drop_released()
    }

    /// Deletes released segment files but one, kept for reuse.
    fn drop_released(&self) -> io::Result<()> {
        let free = self.released.load(Ordering::Acquire) / self.segment_size;
        let old: Vec<u64> = segments(&self.dir)?
            .into_iter()
            .filter(|i| *i < free && *i != self.current.index)
            .collect();
        if old.len() > 1 {
            for index in &old[..old.len() - 1] {
                std::fs::remove_file(self.dir.join(name(*index)))?;
            }
            sync_dir(&self.dir)?;
        }
        Ok(())
    }
}

/// Tells the log what is folded into the tables (see [`RecordLog::releaser`]).
#[derive(Clone)]
pub struct Releaser(Arc<AtomicU64>);

impl Releaser {
    /// Positions below `upto` are folded for good.
    pub fn release(&self, upto: u64) {
        self.0.fetch_max(upto, Ordering::AcqRel);
    }
}

/// Takes the log's lock file: two processes appending to one log would
/// write over each other's blocks.
fn lock(dir: &Path) -> io::Result<File> {
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .open(dir.join("LOCK"))?;
    // SAFETY: flock on a file descriptor we own.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = io::Error::last_os_error();
        return Err(if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            io::Error::other(format!(
                "{} is in use by another process (one bucket per SQLite database)",
                dir.display()
            ))
        } else {
            e
        });
    }
    Ok(file)
}

/// `len` bytes of `buf` starting on an [`ALIGN`] boundary.
fn aligned(buf: &mut Vec<u8>, len: usize) -> &mut [u8] {
    if buf.len() < len + ALIGN {
        buf.resize(len + ALIGN, 0);
    }
    let start = buf.as_ptr().align_offset(ALIGN);
    &mut buf[start..start + len]
}

/// Whether files in `dir` take direct I/O.
fn probe_direct(dir: &Path) -> bool {
    let probe = dir.join(".direct-probe");
    let opened = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .custom_flags(libc::O_DIRECT)
        .open(&probe);
    let _ = std::fs::remove_file(&probe);
    opened.is_ok()
}

fn open_segment(dir: &Path, index: u64, direct: bool) -> io::Result<Segment> {
    let path = dir.join(name(index));
    let created = !path.exists();
    let flags = libc::O_DSYNC | if direct { libc::O_DIRECT } else { 0 };
    let file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .custom_flags(flags)
        .open(&path)?;
    if created {
        sync_dir(dir)?;
    }
    let allocated = file.metadata()?.len();
    Ok(Segment {
        index,
        file,
        allocated,
    })
}

/// Every block from `from` on, and where they end.
fn replay(dir: &Path, segment_size: u64, from: u64) -> io::Result<Replayed> {
    let mut payloads = Vec::new();
    let mut pos = from;
    let mut index = pos / segment_size;
    let mut bytes = read_segment(dir, index)?;
    loop {
        let base = index * segment_size;
        let (found, end, why) = scan(&bytes, base, pos);
        payloads.extend(found.into_iter().map(<[u8]>::to_vec));
        pos = end;
        // The writer starts the next segment when a block does not fit; if
        // that one begins with its first block, go on there.
        let next = read_segment(dir, index + 1)?;
        let start = base + segment_size;
        if block::decode(&next, start).is_ok() {
            index += 1;
            pos = start;
            bytes = next;
            continue;
        }
        if pos - base < bytes.len() as u64 && why != block::NotABlock::NoMagic {
            tracing::info!(position = pos, why = %why, "the record log ends with an unfinished write; it was never acknowledged");
        }
        return Ok(Replayed { payloads, end: pos });
    }
}

/// The blocks in one segment's `bytes` (its first position is `base`) from
/// position `from` on: their payloads, where they end, and why reading
/// stopped there. Pure, so the fuzz target drives it with arbitrary bytes.
pub fn scan(bytes: &[u8], base: u64, from: u64) -> (Vec<&[u8]>, u64, block::NotABlock) {
    let mut payloads = Vec::new();
    let mut pos = from;
    loop {
        let here = usize::try_from(pos - base)
            .ok()
            .and_then(|offset| bytes.get(offset..))
            .unwrap_or_default();
        match block::decode(here, pos) {
            Ok((payload, size)) => {
                payloads.push(payload);
                pos += size as u64;
            }
            Err(why) => return (payloads, pos, why),
        }
    }
}

/// A segment file's bytes (none if it does not exist).
fn read_segment(dir: &Path, index: u64) -> io::Result<Vec<u8>> {
    match File::open(dir.join(name(index))) {
        Ok(mut file) => {
            let mut bytes = Vec::new();
            file.read_to_end(&mut bytes)?;
            Ok(bytes)
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SEGMENT: u64 = 4 << 20;

    fn payload(i: usize, len: usize) -> Vec<u8> {
        (0..len).map(|j| (i * 31 + j) as u8).collect()
    }

    #[test]
    fn a_log_named_without_a_folder_syncs_the_working_directory() {
        assert_eq!(parent_of(Path::new("bucket.db-records")), Path::new("."));
        assert_eq!(parent_of(Path::new("data/b-records")), Path::new("data"));
        assert_eq!(parent_of(Path::new("/b-records")), Path::new("/"));
    }

    #[test]
    fn what_was_appended_is_read_back_after_reopening() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert!(replayed.payloads.is_empty());
        let written: Vec<Vec<u8>> = (0..50).map(|i| payload(i, i * 37)).collect();
        for p in &written {
            log.append(p).unwrap();
        }
        let end = log.end();
        drop(log);
        let (log, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads, written);
        assert_eq!((replayed.end, log.end()), (end, end));
    }

    #[test]
    fn blocks_cross_into_the_next_segment_and_released_files_are_reused() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        // 300 KiB blocks: 13 fit in a 4 MiB segment, then the next starts.
        let written: Vec<Vec<u8>> = (0..40).map(|i| payload(i, 300 << 10)).collect();
        let mut ends = Vec::new();
        for p in &written {
            ends.push(log.append(p).unwrap());
        }
        assert_eq!(segments(dir.path()).unwrap(), [0, 1, 2, 3]);
        drop(log);
        // Read from the middle, across segments.
        let (mut log, replayed) = RecordLog::open(dir.path(), SEGMENT, ends[9]).unwrap();
        assert_eq!(replayed.payloads, written[10..]);
        // Folded up to the third segment: the first two are free; moving
        // to segment 4 renames one of them, and the other stays spare.
        log.releaser().release(2 * SEGMENT);
        for i in 40..60 {
            log.append(&payload(i, 300 << 10)).unwrap();
        }
        assert_eq!(segments(dir.path()).unwrap(), [1, 2, 3, 4]);
        drop(log);
        let (_, replayed) = RecordLog::open(dir.path(), SEGMENT, ends[30]).unwrap();
        let expected: Vec<Vec<u8>> = (31..60).map(|i| payload(i, 300 << 10)).collect();
        assert_eq!(
            replayed.payloads, expected,
            "nothing of the reused file's past read"
        );
    }

    #[test]
    fn a_second_opener_is_refused_while_the_first_holds_the_log() {
        let dir = tempfile::tempdir().unwrap();
        let (first, _) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        let refused = RecordLog::open(dir.path(), SEGMENT, 0)
            .err()
            .expect("refused");
        assert!(refused.to_string().contains("in use"), "{refused}");
        drop(first);
        RecordLog::open(dir.path(), SEGMENT, 0).expect("free again");
    }

    #[test]
    fn a_torn_last_write_ends_the_log_and_is_written_over() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        for i in 0..5 {
            log.append(&payload(i, 3000)).unwrap();
        }
        let before = log.end();
        log.append(&payload(5, 3000)).unwrap();
        drop(log);
        // The last write reached the disk only in part.
        let path = dir.path().join(name(0));
        let file = OpenOptions::new().write(true).open(&path).unwrap();
        file.write_at(&[0u8; 1024], before + 2048).unwrap();
        drop(file);
        let (mut log, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads.len(), 5);
        assert_eq!(replayed.end, before);
        log.append(b"after").unwrap();
        drop(log);
        let (_, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads.len(), 6);
        assert_eq!(replayed.payloads[5], b"after");
    }
}
