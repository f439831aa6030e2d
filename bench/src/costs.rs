//! What the measured window cost a group of processes, absolute and per
//! packet: CPU time, and bytes and write syscalls from /proc/PID/io.
use crate::proc_stats::{IoCounters, ProcSample};

/// CPU over the measured window.
#[derive(Clone, Copy, Debug)]
pub struct Cpu {
    pub seconds: f64,
    pub cores: f64,
    /// Per processed packet (per ingested packet in the ingest-only modes).
    pub us_per_packet: Option<f64>,
}

impl Cpu {
    pub fn new(seconds: f64, window_s: f64, packets: u64) -> Self {
        Self {
            seconds,
            cores: if window_s > 0.0 {
                seconds / window_s
            } else {
                0.0
            },
            us_per_packet: (packets > 0).then(|| seconds * 1e6 / packets as f64),
        }
    }

    pub fn human(&self) -> String {
        format!(
            "{:.2} s = {:.2} cores, {}",
            self.seconds,
            self.cores,
            self.us_per_packet
                .map_or("n/a µs/packet".into(), |u| format!("{u:.0} µs/packet"))
        )
    }
}

/// Writes over the measured window.
#[derive(Clone, Copy, Debug)]
pub struct DiskWrites {
    pub bytes: u64,
    pub syscalls: u64,
    pub bytes_per_packet: Option<f64>,
    pub syscalls_per_packet: Option<f64>,
}

impl DiskWrites {
    pub fn new(a: IoCounters, b: IoCounters, packets: u64) -> Self {
        let (bytes, syscalls) = (
            b.write_bytes.saturating_sub(a.write_bytes),
            b.syscw.saturating_sub(a.syscw),
        );
        let per = |v: u64| (packets > 0).then(|| v as f64 / packets as f64);
        Self {
            bytes,
            syscalls,
            bytes_per_packet: per(bytes),
            syscalls_per_packet: per(syscalls),
        }
    }

    pub fn human(&self) -> String {
        let per =
            |v: Option<f64>, digits: usize| v.map_or("n/a".into(), |v| format!("{v:.digits$}"));
        format!(
            "{} B written and {} write syscalls per packet ({:.1} MB and {} syscalls in the window)",
            per(self.bytes_per_packet, 0),
            per(self.syscalls_per_packet, 2),
            self.bytes as f64 / 1e6,
            self.syscalls
        )
    }
}

/// A group's CPU and writes between two samples.
#[derive(Clone, Copy, Debug)]
pub struct Cost {
    pub cpu: Cpu,
    /// None when /proc/PID/io was not readable.
    pub disk: Option<DiskWrites>,
}

impl Cost {
    pub fn between(a: ProcSample, b: ProcSample, window_s: f64, packets: u64) -> Self {
        Self {
            cpu: Cpu::new(b.cpu_s - a.cpu_s, window_s, packets),
            disk: a.io.zip(b.io).map(|(x, y)| DiskWrites::new(x, y, packets)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn per_packet_figures() {
        let a = ProcSample {
            cpu_s: 1.0,
            io: Some(IoCounters {
                write_bytes: 4096,
                syscw: 10,
            }),
        };
        let b = ProcSample {
            cpu_s: 2.0,
            io: Some(IoCounters {
                write_bytes: 4096 + 40_000,
                syscw: 30,
            }),
        };
        let c = Cost::between(a, b, 2.0, 10);
        assert_eq!(c.cpu.us_per_packet, Some(100_000.0));
        assert_eq!(c.cpu.cores, 0.5);
        let d = c.disk.unwrap();
        assert_eq!(
            (d.bytes_per_packet, d.syscalls_per_packet),
            (Some(4000.0), Some(2.0))
        );
        assert!(Cost::between(a, b, 2.0, 0).cpu.us_per_packet.is_none());
    }
}
