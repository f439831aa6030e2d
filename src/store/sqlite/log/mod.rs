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
//!   to the next segment's name: their space stays written, so a write
//!   there changes no file metadata) or deleted.
//! - On a disk (not tmpfs), a segment is written with zeros to its full
//!   size before its first block, so no block write changes file
//!   metadata.
//!
//! Blocks go to disk with direct I/O where the file system allows it (not
//! tmpfs): the write is exactly the block's sectors, where a buffered write
//! followed by a sync writes back the whole 4 KiB page of the log's tail at
//! every commit. Space is written before it is used, not only allocated:
//! on ext4 a synced write into allocated but never written space converts
//! its extent and writes that metadata too (back to back, 8 KiB writes took
//! ~50-80 µs of system time each instead of ~30; in the bucket at 5,000
//! packets/s the median fell ~0.1 ms: BENCHMARKS.md, twenty-third
//! session). A segment file thus needs its full size free before its first
//! block (a bucket does not start on a disk without it), and then never
//! runs out mid-segment. Filling one takes ~25-50 ms here: a new log's
//! first segment is filled before the log opens, and the next segment,
//! where no released file will be renamed to it, on a thread of its own
//! while the current one is written (the move to it waits for that thread,
//! which has long finished; no other process may open the log while it
//! runs). In memory (tmpfs: no extents to convert) a segment grows as
//! blocks are written.
pub mod block;

use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of zeros written at a time when a segment is filled.
const FILL_CHUNK: usize = 1 << 20;

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
    /// Whether segments are written with zeros before use (on a disk).
    on_disk: bool,
    /// The next segment's zeros, being written on a thread of their own
    /// (see [`RecordLog::prepare_next`]).
    preparing: Option<std::thread::JoinHandle<()>>,
}

struct Segment {
    index: u64,
    file: File,
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
            segment_size >= 4 * FILL_CHUNK as u64
                && segment_size.is_multiple_of(block::SECTOR as u64),
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
        let on_disk = !in_memory(dir)?;
        let current = open_segment(dir, index, segment_size, direct, on_disk)?;
        let mut log = RecordLog {
            dir: dir.to_owned(),
            segment_size,
            current,
            end: replayed.end,
            released: Arc::new(AtomicU64::new(from)),
            lock: Some(lock),
            buf: Vec::new(),
            direct,
            on_disk,
            preparing: None,
        };
        log.drop_released()?;
        log.prepare_next();
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
        // A thread still writing zeros must not outlive the lock: the next
        // owner may already write blocks in that file.
        self.settle_next();
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

    /// Starts writing segment `index`, reusing a released segment file
    /// where there is one.
    fn move_to(&mut self, index: u64) -> io::Result<()> {
        self.settle_next();
        let path = self.dir.join(name(index));
        if !path.exists()
            && let Some(old) = self.reusable()?
        {
            std::fs::rename(self.dir.join(name(old)), &path)?;
            sync_dir(&self.dir)?;
        }
        self.current = open_segment(
            &self.dir,
            index,
            self.segment_size,
            self.direct,
            self.on_disk,
        )?;
        self.drop_released()?;
        self.prepare_next();
        Ok(())
    }

    /// A released segment file, to be renamed to the next one's name.
    fn reusable(&self) -> io::Result<Option<u64>> {
        let free = self.released.load(Ordering::Acquire) / self.segment_size;
        Ok(segments(&self.dir)?.into_iter().find(|i| *i < free))
    }

    /// Writes the next segment's zeros on a thread of its own, so the move
    /// to it does not make the commits wait ~25-50 ms; not where a released
    /// file will be renamed to it, nor in memory. Where it cannot, the move
    /// writes them (and fails the append if that fails).
    fn prepare_next(&mut self) {
        let next = self.current.index + 1;
        // A file cut short by a crash while it was written ahead is not.
        let ready = std::fs::metadata(self.dir.join(name(next)))
            .is_ok_and(|file| file.len() >= self.segment_size);
        if !self.on_disk || ready || !matches!(self.reusable(), Ok(None)) {
            return;
        }
        let (dir, size, direct) = (self.dir.clone(), self.segment_size, self.direct);
        let spawned = std::thread::Builder::new()
            .name("bucket-log-ahead".into())
            .spawn(move || {
                if let Err(e) = open_segment(&dir, next, size, direct, true) {
                    tracing::warn!(segment = next, error = %e, "could not write the next log segment ahead; the writer will when it gets there");
                }
            });
        match spawned {
            Ok(thread) => self.preparing = Some(thread),
            Err(e) => tracing::warn!(error = %e, "no thread to write the next log segment ahead"),
        }
    }

    /// Waits for the next segment's zeros, if a thread is writing them.
    fn settle_next(&mut self) {
        if let Some(thread) = self.preparing.take() {
            let _ = thread.join();
        }
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

impl Drop for RecordLog {
    fn drop(&mut self) {
        self.settle_next(); // before the lock goes (see `close`)
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

/// Opens segment `index`; on a disk, first writes zeros over
/// whatever part of its `size` bytes the file does not have yet: a new
/// file, or one whose filling a crash cut short.
fn open_segment(
    dir: &Path,
    index: u64,
    size: u64,
    direct: bool,
    on_disk: bool,
) -> io::Result<Segment> {
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
    if on_disk {
        fill(&file, file.metadata()?.len(), size)?;
    }
    Ok(Segment { index, file })
}

/// Whether `dir` is on a file system kept in memory (tmpfs, ramfs), where
/// space has no extents to convert and zeros would only take memory.
fn in_memory(dir: &Path) -> io::Result<bool> {
    const TMPFS_MAGIC: i64 = 0x0102_1994;
    const RAMFS_MAGIC: i64 = 0x8584_58f6;
    let path = std::ffi::CString::new(dir.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "a NUL in the log's path"))?;
    // SAFETY: statfs writes into the zeroed struct we hand it.
    let mut stat: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(path.as_ptr(), &mut stat) } != 0 {
        return Err(io::Error::last_os_error());
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs by target
    let kind = stat.f_type as i64;
    Ok(kind == TMPFS_MAGIC || kind == RAMFS_MAGIC)
}

/// Writes zeros from `from` (rounded up to [`ALIGN`], as direct I/O
/// needs; a shorter tail fills as blocks are written) to `to`. The file
/// is opened O_DSYNC: each write is on disk, size included, when it
/// returns.
fn fill(file: &File, from: u64, to: u64) -> io::Result<()> {
    let mut at = from.next_multiple_of(ALIGN as u64);
    if at >= to {
        return Ok(());
    }
    let mut zeros = vec![0u8; FILL_CHUNK + ALIGN];
    let zeros = aligned(&mut zeros, FILL_CHUNK);
    while at < to {
        let len = usize::try_from(to - at).map_or(FILL_CHUNK, |left| left.min(FILL_CHUNK));
        file.write_all_at(&zeros[..len], at)?;
        at += len as u64;
    }
    Ok(())
}

/// Every block from `from` on, and where they end.
fn replay(dir: &Path, segment_size: u64, from: u64) -> io::Result<Replayed> {
    let mut index = from / segment_size;
    let mut last = read_blocks(dir, segment_size, index, from)?;
    let mut payloads = std::mem::take(&mut last.payloads);
    loop {
        // The writer starts the next segment when a block does not fit; if
        // that one begins with its first block, go on there.
        let mut next = read_blocks(dir, segment_size, index + 1, (index + 1) * segment_size)?;
        if !next.payloads.is_empty() {
            index += 1;
            payloads.append(&mut next.payloads);
            last = next;
            continue;
        }
        if last.more && last.why != block::NotABlock::NoMagic {
            tracing::info!(position = last.end, why = %last.why, "the record log ends with an unfinished write; it was never acknowledged");
        }
        return Ok(Replayed {
            payloads,
            end: last.end,
        });
    }
}

/// What [`read_blocks`] found in one segment.
struct Blocks {
    payloads: Vec<Vec<u8>>,
    /// Where they end.
    end: u64,
    /// Why reading stopped there.
    why: block::NotABlock,
    /// Whether the file has bytes there (a torn write, zeros, a reused
    /// file's past) rather than ending.
    more: bool,
}

/// Bytes a start reads of a segment at a time.
const READ_CHUNK: usize = 1 << 20;

/// The blocks of segment `index` from position `from` on, read a chunk at a
/// time only as far as they go: a segment file is written full size before
/// use, and its zeros (or a reused file's past) need not be read. Nothing
/// if the file does not exist.
fn read_blocks(dir: &Path, segment_size: u64, index: u64, from: u64) -> io::Result<Blocks> {
    let mut found = Blocks {
        payloads: Vec::new(),
        end: from,
        why: block::NotABlock::Short,
        more: false,
    };
    let file = match File::open(dir.join(name(index))) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(found),
        Err(e) => return Err(e),
    };
    // `bytes` holds the file from position `from` on.
    let offset = from - index * segment_size;
    let mut bytes = Vec::new();
    loop {
        let had = bytes.len();
        bytes.resize(had + READ_CHUNK, 0);
        let read = read_at_most(&file, &mut bytes[had..], offset + had as u64)?;
        bytes.truncate(had + read);
        let (payloads, end, why) = scan(&bytes, from, found.end);
        found
            .payloads
            .extend(payloads.into_iter().map(<[u8]>::to_vec));
        (found.end, found.why) = (end, why);
        // Short: the block goes on past what was read, if the file does.
        if read < READ_CHUNK || why != block::NotABlock::Short {
            found.more = end - from < bytes.len() as u64;
            return Ok(found);
        }
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

/// Fills `buf` from `offset` on, short only at the end of the file.
fn read_at_most(file: &File, buf: &mut [u8], offset: u64) -> io::Result<usize> {
    let mut read = 0;
    while read < buf.len() {
        match file.read_at(&mut buf[read..], offset + read as u64) {
            Ok(0) => break,
            Ok(n) => read += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(read)
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
        drop(log);
        // Segment 4 was written ahead while 3 was written.
        let expect_ahead = |mut expected: Vec<u64>| {
            if in_memory(dir.path()).unwrap() {
                expected.pop(); // tmpfs: nothing is written ahead
            }
            assert_eq!(segments(dir.path()).unwrap(), expected);
        };
        expect_ahead(vec![0, 1, 2, 3, 4]);
        // Read from the middle, across segments.
        let (mut log, replayed) = RecordLog::open(dir.path(), SEGMENT, ends[9]).unwrap();
        assert_eq!(replayed.payloads, written[10..]);
        // Folded up to the third segment: the first two are free. The move
        // to segment 4 (there already) deletes one and keeps the other
        // spare, and nothing is written ahead for 5: the spare is renamed
        // to it at the move, after which 6 is written ahead.
        log.releaser().release(2 * SEGMENT);
        for i in 40..60 {
            log.append(&payload(i, 300 << 10)).unwrap();
        }
        let moved = segments(dir.path()).unwrap();
        assert_eq!(moved, [1, 2, 3, 4], "nothing written ahead for 5");
        for i in 60..70 {
            log.append(&payload(i, 300 << 10)).unwrap();
        }
        drop(log);
        expect_ahead(vec![2, 3, 4, 5, 6]);
        let (_, replayed) = RecordLog::open(dir.path(), SEGMENT, ends[30]).unwrap();
        let expected: Vec<Vec<u8>> = (31..70).map(|i| payload(i, 300 << 10)).collect();
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

    /// Bytes of `path` that are holes or allocated but never written
    /// (FIEMAP's unwritten extents); None where the file system does not
    /// map extents.
    fn not_written(path: &Path) -> Option<u64> {
        const FS_IOC_FIEMAP: libc::c_ulong = 0xC020_660B;
        const FIEMAP_EXTENT_UNWRITTEN: u32 = 0x800;
        const EXTENTS: usize = 512;
        #[repr(C)]
        #[derive(Clone, Copy, Default)]
        struct Extent {
            logical: u64,
            physical: u64,
            length: u64,
            reserved64: [u64; 2],
            flags: u32,
            reserved: [u32; 3],
        }
        #[repr(C)]
        struct Map {
            start: u64,
            length: u64,
            flags: u32,
            mapped: u32,
            count: u32,
            reserved: u32,
            extents: [Extent; EXTENTS],
        }
        let file = File::open(path).unwrap();
        let len = file.metadata().unwrap().len();
        let mut map = Box::new(Map {
            start: 0,
            length: len,
            flags: 1, // FIEMAP_FLAG_SYNC
            mapped: 0,
            count: EXTENTS as u32,
            reserved: 0,
            extents: [Extent::default(); EXTENTS],
        });
        // SAFETY: FS_IOC_FIEMAP fills at most `count` extents of `map`.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_FIEMAP, &mut *map as *mut Map) };
        if rc != 0 {
            return None;
        }
        assert!(
            (map.mapped as usize) < EXTENTS,
            "more extents than asked for"
        );
        let written: u64 = map.extents[..map.mapped as usize]
            .iter()
            .filter(|e| e.flags & FIEMAP_EXTENT_UNWRITTEN == 0)
            .map(|e| e.length.min(len.saturating_sub(e.logical)))
            .sum();
        Some(len - written)
    }

    /// Segment `index` is its full size and written through, where the
    /// file system can tell.
    fn assert_filled(dir: &Path, index: u64) {
        if in_memory(dir).unwrap() {
            return; // tmpfs: nothing to fill (see the header)
        }
        let path = dir.join(name(index));
        assert_eq!(std::fs::metadata(&path).unwrap().len(), SEGMENT);
        if let Some(left) = not_written(&path) {
            assert_eq!(left, 0, "segment {index}: bytes only allocated");
        }
    }

    #[test]
    fn every_segment_is_written_in_full_before_its_first_block() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_filled(dir.path(), 0);
        let written: Vec<Vec<u8>> = (0..20).map(|i| payload(i, 300 << 10)).collect();
        for p in &written {
            log.append(p).unwrap();
        }
        assert_filled(dir.path(), 1);
        drop(log);
        // and the one after it, written ahead while 1 was written
        if !in_memory(dir.path()).unwrap() {
            assert_eq!(segments(dir.path()).unwrap(), [0, 1, 2]);
            assert_filled(dir.path(), 2);
        }
        let (_, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads, written);
    }

    #[test]
    fn a_segment_whose_filling_a_crash_cut_short_is_filled_on_open() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        let written: Vec<Vec<u8>> = (0..8).map(|i| payload(i, 5000)).collect();
        for p in &written {
            log.append(p).unwrap();
        }
        drop(log);
        // The blocks, then the zeros' first MiB only: then the crash.
        let path = dir.path().join(name(0));
        OpenOptions::new()
            .write(true)
            .open(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let (mut log, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads, written);
        assert_filled(dir.path(), 0);
        log.append(b"after").unwrap();
        drop(log);
        let (_, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads.len(), 9);
        assert_eq!(replayed.payloads[8], b"after");
    }

    #[test]
    fn a_next_segment_cut_short_while_written_ahead_is_written_again_on_open() {
        let dir = tempfile::tempdir().unwrap();
        if in_memory(dir.path()).unwrap() {
            return; // tmpfs: nothing is written ahead
        }
        let (mut log, _) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        log.append(b"first").unwrap();
        drop(log);
        // The crash came while segment 1's zeros were being written.
        OpenOptions::new()
            .write(true)
            .open(dir.path().join(name(1)))
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let (log, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads, [b"first"]);
        drop(log);
        assert_filled(dir.path(), 1);
    }

    #[test]
    fn a_torn_first_block_of_the_next_segment_ends_the_log_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let (mut log, _) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        // 13 blocks of 300 KiB fill segment 0; the 14th starts segment 1.
        let mut ends = Vec::new();
        for i in 0..14 {
            ends.push(log.append(&payload(i, 300 << 10)).unwrap());
        }
        drop(log);
        // Only its first sectors reached the disk.
        let file = OpenOptions::new()
            .write(true)
            .open(dir.path().join(name(1)))
            .unwrap();
        file.write_at(&vec![0u8; 200 << 10], 4096).unwrap();
        drop(file);
        let (mut log, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads.len(), 13);
        assert_eq!(replayed.end, ends[12]);
        // The next block goes on after the last whole one.
        log.append(b"again").unwrap();
        drop(log);
        let (_, replayed) = RecordLog::open(dir.path(), SEGMENT, 0).unwrap();
        assert_eq!(replayed.payloads.len(), 14);
        assert_eq!(replayed.payloads[13], b"again");
    }
}
