//! CPU, disk writes and memory of the processes under test, from /proc.
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Duration;

use tokio::task::JoinHandle;

/// Clock ticks per second, the unit of /proc/PID/stat's times.
fn clk_tck() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if ticks > 0 { ticks as f64 } else { 100.0 }
}

/// utime + stime of a process (fields 14 and 15 of /proc/PID/stat), in seconds.
pub fn cpu_seconds(pid: u32) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) is in parentheses and may hold spaces:
    // count fields from after its closing one, where field 3 starts.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(14 - 3)?.parse().ok()?;
    let stime: f64 = fields.get(15 - 3)?.parse().ok()?;
    Some((utime + stime) / clk_tck())
}

/// What a process caused to be written, from /proc/PID/io, summed over its
/// threads (exited ones included).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct IoCounters {
    /// Bytes sent (or dirtied in the page cache, to be sent) to the storage
    /// layer: what reaches the disk, not what went through write().
    pub write_bytes: u64,
    /// write(), pwrite(), writev() … calls of any kind: files and sockets
    /// alike, so the answers a server sends count here too.
    pub syscw: u64,
}

impl IoCounters {
    fn add(self, other: Self) -> Self {
        Self {
            write_bytes: self.write_bytes + other.write_bytes,
            syscw: self.syscw + other.syscw,
        }
    }
}

/// /proc/PID/io (needs the right to trace the process: our own, or root).
pub fn io(pid: u32) -> Option<IoCounters> {
    io_at(&format!("/proc/{pid}/io"))
}

/// The calling thread's own counters (/proc/thread-self/io).
pub fn thread_io() -> Option<IoCounters> {
    io_at("/proc/thread-self/io")
}

fn io_at(path: &str) -> Option<IoCounters> {
    let text = std::fs::read_to_string(path).ok()?;
    let field = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.trim().parse().ok())
    };
    Some(IoCounters {
        write_bytes: field("write_bytes:")?,
        syscw: field("syscw:")?,
    })
}

/// CPU and writes of a group of processes at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct ProcSample {
    pub cpu_s: f64,
    /// None when no process of the group let its io be read.
    pub io: Option<IoCounters>,
}

/// The sum over `pids`; None when none of them is readable. A process gone
/// between two samples drops out of the second: the group's figure then
/// undercounts, which is why the groups are found once, after the warmup.
pub fn sample(pids: &[u32]) -> Option<ProcSample> {
    let mut total: Option<ProcSample> = None;
    for &pid in pids {
        let Some(cpu_s) = cpu_seconds(pid) else {
            continue;
        };
        let t = total.get_or_insert_default();
        t.cpu_s += cpu_s;
        if let Some(io) = io(pid) {
            t.io = Some(t.io.unwrap_or_default().add(io));
        }
    }
    total
}

/// Busy CPU seconds of the whole machine (every core, every process: the
/// load generator included), from the first line of /proc/stat.
pub fn machine_busy_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?;
    let ticks: Vec<f64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal …: idle and iowait are
    // not busy; guest times are already inside user.
    let total: f64 = ticks.iter().take(8).sum();
    let idle = ticks.get(3)? + ticks.get(4).unwrap_or(&0.0);
    Some((total - idle) / clk_tck())
}

/// A `Vm…:` line of /proc/PID/status, in KiB.
fn status_kib(pid: u32, key: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
}

/// Resident set size now (VmRSS), in MiB.
pub fn vm_rss_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmRSS:").map(|k| k as f64 / 1024.0)
}

/// Peak resident set size over the process's life (VmHWM), in MiB.
pub fn vm_hwm_mib(pid: u32) -> Option<f64> {
    status_kib(pid, "VmHWM:").map(|k| k as f64 / 1024.0)
}

/// Samples VmRSS every 100 ms and keeps the largest.
pub struct RssSampler {
    max_kib: Arc<AtomicU64>,
    task: JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> Self {
        let max_kib = Arc::new(AtomicU64::new(0));
        let max = max_kib.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(100));
            loop {
                tick.tick().await;
                if let Some(kib) = status_kib(pid, "VmRSS:") {
                    max.fetch_max(kib, Relaxed);
                }
            }
        });
        Self { max_kib, task }
    }

    /// The largest sample, in MiB (None if none was taken).
    pub fn stop(self) -> Option<f64> {
        self.task.abort();
        match self.max_kib.load(Relaxed) {
            0 => None,
            kib => Some(kib as f64 / 1024.0),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(cpu_seconds(me).is_some());
        assert!(io(me).is_some());
        let both = sample(&[me, me]).unwrap();
        assert!(both.io.unwrap().syscw >= io(me).unwrap().syscw);
        assert!(vm_hwm_mib(me).unwrap() > 0.0);
        assert!(machine_busy_seconds().unwrap() > 0.0);
    }
}
