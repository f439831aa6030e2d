//! `disk`: what the disk itself costs a design that syncs before it
//! answers. Appends of one block each, written the way the record log
//! commits a group (one `pwrite` with O_DSYNC, direct I/O where the file
//! system takes it, into space written with zeros ahead, as the log's
//! segments are; the appends wrap at its end), at a fixed
//! rate: their latency (the tail every such commit inherits) and the CPU
//! the writing thread spends per append (the kernel's share of a commit).
//! Nothing of the bucket runs.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use hdrhistogram::Histogram;

use crate::report::Percentiles;

pub struct DiskPlan {
    /// A directory on the file system under test; the file is made and
    /// removed there.
    pub dir: PathBuf,
    pub rate: f64,
    pub duration: Duration,
    /// Bytes per append (a multiple of 512 for direct I/O).
    pub bytes: usize,
}

/// Space written with zeros before the appends, as a record log segment
/// is: on ext4 a synced write into space only allocated converts its
/// extent and writes that metadata too.
const WRITTEN_AHEAD: u64 = 32 << 20;
const ALIGN: usize = 4096;

/// Writes zeros over the first `len` bytes of `file` (a MiB at a time,
/// from an aligned buffer, as direct I/O needs).
pub fn write_zeros(file: &File, len: u64) -> Result<()> {
    const CHUNK: usize = 1 << 20;
    let zeros = vec![0u8; CHUNK + ALIGN];
    let start = zeros.as_ptr().align_offset(ALIGN);
    let zeros = &zeros[start..start + CHUNK];
    let mut at = 0;
    while at < len {
        let n = usize::try_from(len - at).map_or(CHUNK, |left| left.min(CHUNK));
        file.write_all_at(&zeros[..n], at)
            .context("writing zeros ahead")?;
        at += n as u64;
    }
    Ok(())
}

pub fn run(plan: &DiskPlan) -> Result<()> {
    if plan.bytes == 0 || !plan.bytes.is_multiple_of(512) {
        bail!("--bytes must be a positive multiple of 512");
    }
    let dir = tempfile::tempdir_in(&plan.dir)
        .with_context(|| format!("a directory in {}", plan.dir.display()))?;
    let (file, direct) = open_synced(&dir.path().join("appends"))?;
    let mut buf = vec![0u8; plan.bytes + ALIGN];
    let start = buf.as_ptr().align_offset(ALIGN);
    let block = &mut buf[start..start + plan.bytes];
    block.fill(0xa5);

    let mut latency = Histogram::<u64>::new(3)?;
    let mut worst_second = (0u64, 0usize);
    let mut this_second = Histogram::<u64>::new(3)?;
    let (mut over_10ms, mut over_50ms) = (0u64, 0u64);
    write_zeros(&file, WRITTEN_AHEAD)?;
    let mut offset = 0u64;
    let every = Duration::from_secs_f64(1.0 / plan.rate);
    let cpu_before = thread_cpu();
    let began = Instant::now();
    let mut next = began;
    let mut second = 0;
    while began.elapsed() < plan.duration {
        if offset + plan.bytes as u64 > WRITTEN_AHEAD {
            offset = 0;
        }
        let t = Instant::now();
        file.write_at(block, offset)?;
        let us = t.elapsed().as_micros() as u64;
        latency.record(us.max(1))?;
        over_10ms += u64::from(us > 10_000);
        over_50ms += u64::from(us > 50_000);
        let now_second = began.elapsed().as_secs() as usize;
        if now_second != second {
            let p99 = this_second.value_at_quantile(0.99);
            if p99 > worst_second.0 {
                worst_second = (p99, second);
            }
            this_second.reset();
            second = now_second;
        }
        this_second.record(us.max(1))?;
        offset += plan.bytes as u64;
        // A fixed schedule: after a stall the next appends go at once.
        next += every;
        if let Some(wait) = next.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    let cpu = thread_cpu() - cpu_before;
    let elapsed = began.elapsed().as_secs_f64();
    let p = Percentiles::of(&latency).context("no appends were made")?;
    println!(
        "== disk           {} ({})",
        dir.path().display(),
        io_kind(direct)
    );
    println!(
        "appends          {} of {} B at {:.0}/s over {:.1} s",
        p.count,
        plan.bytes,
        p.count as f64 / elapsed,
        elapsed
    );
    println!("append latency   {}", p.human());
    println!(
        "stalls           {over_10ms} appends over 10 ms, {over_50ms} over 50 ms; worst second {}–{} s: p99 {:.2} ms",
        worst_second.1,
        worst_second.1 + 1,
        worst_second.0 as f64 / 1000.0
    );
    println!(
        "CPU              {:.1} µs per append on the writing thread (user {:.1}, system {:.1}; sleeps between appends included)",
        (cpu.user + cpu.system) * 1e6 / p.count as f64,
        cpu.user * 1e6 / p.count as f64,
        cpu.system * 1e6 / p.count as f64,
    );
    Ok(())
}

/// A new file (truncated if there was one) whose writes return once on
/// disk: O_DSYNC, with direct I/O where the file system takes it (the
/// second value says whether it did), as the record log opens its segments.
pub fn open_synced(path: &Path) -> Result<(File, bool)> {
    let open = |flags| {
        OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .custom_flags(flags)
            .open(path)
    };
    Ok(match open(libc::O_DSYNC | libc::O_DIRECT) {
        Ok(file) => (file, true),
        Err(_) => (open(libc::O_DSYNC)?, false),
    })
}

fn io_kind(direct: bool) -> &'static str {
    match direct {
        true => "O_DSYNC, direct I/O",
        false => "O_DSYNC, buffered: the file system refused direct I/O",
    }
}

#[derive(Clone, Copy)]
pub struct ThreadCpu {
    pub user: f64,
    pub system: f64,
}

impl std::ops::Sub for ThreadCpu {
    type Output = ThreadCpu;
    fn sub(self, before: ThreadCpu) -> ThreadCpu {
        ThreadCpu {
            user: self.user - before.user,
            system: self.system - before.system,
        }
    }
}

/// This thread's CPU time so far, in seconds.
pub fn thread_cpu() -> ThreadCpu {
    // SAFETY: getrusage fills the struct it is given.
    let usage = unsafe {
        let mut usage: libc::rusage = std::mem::zeroed();
        libc::getrusage(libc::RUSAGE_THREAD, &mut usage);
        usage
    };
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    ThreadCpu {
        user: seconds(usage.ru_utime),
        system: seconds(usage.ru_stime),
    }
}
