//! One run's figures: a human-readable block on stdout and, with --csv, one
//! appended row (the plot reads these rows back).
use std::io::Write;
use std::path::Path;

use anyhow::{Result, bail};
use hdrhistogram::Histogram;

use crate::costs::{Cost, Cpu};
use crate::pg_wal::WalCost;
use crate::series::{self, Second};

/// Latency percentiles, in µs.
#[derive(Clone, Copy, Debug)]
pub struct Percentiles {
    pub count: u64,
    pub p50: u64,
    pub p90: u64,
    pub p99: u64,
    pub p999: u64,
    pub max: u64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Option<Self> {
        (!h.is_empty()).then(|| Self {
            count: h.len(),
            p50: h.value_at_quantile(0.50),
            p90: h.value_at_quantile(0.90),
            p99: h.value_at_quantile(0.99),
            p999: h.value_at_quantile(0.999),
            max: h.max(),
        })
    }

    pub fn human(&self) -> String {
        format!(
            "p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  (n={})",
            ms(self.p50),
            ms(self.p90),
            ms(self.p99),
            ms(self.p999),
            ms(self.max),
            self.count
        )
    }
}

fn ms(us: u64) -> String {
    format!("{:.2} ms", us as f64 / 1000.0)
}

#[derive(Clone, Debug, Default)]
pub struct EndCheck {
    pub acked: u64,
    /// Acknowledged and never delivered (None: not checked).
    pub undelivered: Option<u64>,
    pub unmarked: Option<u64>,
    pub redeliveries: u64,
    pub duplicates: u64,
    pub foreign: u64,
    pub delivered_unacked: u64,
    /// Acknowledged but missing from the server's count (the stored check).
    pub not_stored: Option<u64>,
    pub ingest_errors: u64,
    pub unoffered: u64,
    pub mark_errors: u64,
    pub stream_errors: u64,
    /// What the server itself says is left (NATS: consumer pending / ack pending).
    pub server_side: Option<String>,
    pub first_error: Option<String>,
}

#[derive(Clone, Debug, Default)]
pub struct Report {
    pub mode: String,
    pub target: String,
    pub server: String,
    /// The load's shape in words.
    pub shape: String,
    pub offered_rate: Option<f64>,
    /// Closed-loop e2e: ingests kept outstanding (the sustained mode).
    pub outstanding: Option<usize>,
    pub users: Option<u64>,
    pub streams: Option<usize>,
    pub in_flight: Option<u32>,
    pub marks: Option<&'static str>,
    pub connections: Option<usize>,
    pub concurrency: Option<usize>,
    pub batch_size: Option<usize>,
    pub window_s: f64,
    pub ingested_per_s: Option<f64>,
    pub delivered_per_s: Option<f64>,
    pub marked_per_s: Option<f64>,
    /// Drain mode: packets delivered and marked per second.
    pub drained_per_s: Option<f64>,
    pub ack: Option<Percentiles>,
    pub e2e: Option<Percentiles>,
    /// The server process: the bucket, or nats-server.
    pub server_cost: Option<Cost>,
    pub cpu_basis: &'static str,
    /// PostgreSQL's and Redis's CPU together.
    pub store_cpu: Option<Cpu>,
    /// The PostgreSQL backends of the run's database.
    pub pg_backends: Option<Cost>,
    pub pg_backend_count: usize,
    /// PostgreSQL's WAL writer, checkpointer and background writer.
    pub pg_shared: Option<Cost>,
    pub redis: Option<Cost>,
    pub wal: Option<WalCost>,
    /// The measured window second by second (e2e).
    pub series: Vec<Second>,
    /// The tool itself (load generator and consumers).
    pub client_cpu: Option<Cpu>,
    pub machine_cores: Option<f64>,
    pub rss_max_mib: Option<f64>,
    pub hwm_mib: Option<f64>,
    pub end: EndCheck,
    pub saturated: bool,
    pub notes: Vec<String>,
}

fn rate(r: Option<f64>) -> String {
    r.map_or("n/a".into(), |r| format!("{r:.0}/s"))
}

fn mib(m: Option<f64>) -> String {
    m.map_or("n/a".into(), |m| format!("{m:.1} MiB"))
}

impl Report {
    pub fn failed(&self) -> bool {
        self.end.undelivered.unwrap_or(0) > 0 || self.end.not_stored.unwrap_or(0) > 0
    }

    pub fn print(&self) {
        let mut out = String::new();
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<18}{v}\n"));
        line(
            &format!("== {}", self.mode),
            format!("target {}", self.target),
        );
        line("server", self.server.clone());
        line("load", self.shape.clone());
        let mut rates = format!("ingested {}", rate(self.ingested_per_s));
        if self.delivered_per_s.is_some() || self.marked_per_s.is_some() {
            rates += &format!(
                "   delivered {}   marked {}",
                rate(self.delivered_per_s),
                rate(self.marked_per_s)
            );
        }
        if let Some(d) = self.drained_per_s {
            rates = format!("drained {d:.0} packets/s (delivered and marked)");
        }
        line(
            "throughput",
            format!("{rates}   over {:.2} s", self.window_s),
        );
        if let Some(p) = &self.ack {
            line("ingest ack", p.human());
        }
        if let Some(p) = &self.e2e {
            line("ingest→delivery", p.human());
        }
        if let Some(sm) = series::summary(&self.series) {
            line("p99 by second", series_summary(&sm));
        }
        let server_cpu = self.server_cost.map(|c| c.cpu);
        match &server_cpu {
            Some(c) => line("server CPU", format!("{} ({})", c.human(), self.cpu_basis)),
            None => line("server CPU", "n/a (no pid: pass --pid)".into()),
        }
        if let Some(d) = self.server_cost.and_then(|c| c.disk) {
            line(
                "server writes",
                format!("{}; /proc/PID/io write_bytes, syscw", d.human()),
            );
        }
        if let Some(c) = &self.store_cpu {
            line(
                "store CPU",
                format!("{}: {}", c.human(), self.store_parts()),
            );
        }
        if let Some(d) = self.pg_backends.and_then(|c| c.disk) {
            line("PostgreSQL writes", format!("backends: {}", d.human()));
        }
        if let Some(d) = self.pg_shared.and_then(|c| c.disk) {
            line(
                "",
                format!("WAL writer, checkpointer, background writer: {}", d.human()),
            );
        }
        if let Some(w) = &self.wal {
            line("PostgreSQL WAL", w.human());
        }
        if let Some(c) = &self.client_cpu {
            line(
                "client CPU",
                format!("{} (this tool: load generator and consumers)", c.human()),
            );
        }
        if let Some(m) = self.machine_cores {
            line(
                "machine CPU",
                format!(
                    "{m:.2} of {} cores busy (load generator included)",
                    machine_cores()
                ),
            );
        }
        line(
            "server memory",
            format!(
                "RSS max {} (sampled every 100 ms), VmHWM {}",
                mib(self.rss_max_mib),
                mib(self.hwm_mib)
            ),
        );
        let e = &self.end;
        let opt = |v: Option<u64>| v.map_or("not checked".into(), |v| v.to_string());
        line(
            "end check",
            format!(
                "acknowledged {}, undelivered {}, unmarked {}, redeliveries {}, duplicates {}",
                e.acked,
                opt(e.undelivered),
                opt(e.unmarked),
                e.redeliveries,
                e.duplicates
            ),
        );
        if let Some(n) = e.not_stored {
            line("stored check", format!("acknowledged but not stored: {n}"));
        }
        if let Some(s) = &e.server_side {
            line("server side", s.clone());
        }
        line(
            "errors",
            format!(
                "ingest {}, not offered {}, marks {}, streams {}, foreign deliveries {}, delivered unacknowledged {}",
                e.ingest_errors,
                e.unoffered,
                e.mark_errors,
                e.stream_errors,
                e.foreign,
                e.delivered_unacked
            ),
        );
        if let Some(err) = &e.first_error {
            line("first error", err.clone());
        }
        if let Some(n) = e.undelivered {
            out.push_str(&format!("undelivered: {n}\n"));
        }
        if let Some(n) = self.outstanding {
            out.push_str(&self.sustained_line(n));
        }
        if (self.offered_rate.is_some() || self.outstanding.is_some())
            && self.delivered_per_s.is_some()
        {
            out.push_str(&format!(
                "saturated: {}\n",
                if self.saturated { "yes" } else { "no" }
            ));
        }
        for n in &self.notes {
            out.push_str(&format!("note: {n}\n"));
        }
        println!("{out}");
    }

    /// The closed-loop e2e's headline: what delivery sustained while
    /// ingest went as fast as `outstanding` requests allowed.
    fn sustained_line(&self, outstanding: usize) -> String {
        format!(
            "sustained: {} delivered/s (ingested {}, marked {}; {outstanding} ingests outstanding over {} connections, {} streams × {} in flight, {} marks)\n",
            self.delivered_per_s
                .map_or("n/a".into(), |r| format!("{r:.0}")),
            rate(self.ingested_per_s),
            rate(self.marked_per_s),
            self.connections.unwrap_or(0),
            self.streams.unwrap_or(0),
            self.in_flight.unwrap_or(0),
            self.marks.unwrap_or("?"),
        )
    }

    /// The store CPU line's parts: which processes, and each one's share.
    fn store_parts(&self) -> String {
        let us = |c: &Cost| {
            c.cpu
                .us_per_packet
                .map_or("n/a".into(), |u| format!("{u:.0} µs"))
        };
        let mut parts = Vec::new();
        if let Some(c) = &self.pg_backends {
            parts.push(format!(
                "PostgreSQL's {} backends of the run {}",
                self.pg_backend_count,
                us(c)
            ));
        }
        if let Some(c) = &self.pg_shared {
            parts.push(format!(
                "its WAL writer, checkpointer and background writer {}",
                us(c)
            ));
        }
        if let Some(c) = &self.redis {
            parts.push(format!("Redis {} (redis-server)", us(c)));
        }
        format!("{}; not in the figure above", parts.join(", "))
    }

    pub const CSV_HEADER: &'static str = "mode,target,offered_rate,outstanding,users,streams,in_flight,marks,connections,concurrency,batch_size,window_s,\
ingested_per_s,delivered_per_s,marked_per_s,drained_per_s,\
ack_p50_ms,ack_p90_ms,ack_p99_ms,ack_p999_ms,ack_max_ms,\
e2e_p50_ms,e2e_p90_ms,e2e_p99_ms,e2e_p999_ms,e2e_max_ms,worst_second,worst_second_e2e_p99_ms,\
cpu_s,cpu_cores,cpu_us_per_packet,write_bytes_per_packet,write_syscalls_per_packet,\
store_cpu_us_per_packet,postgres_cpu_us_per_packet,postgres_shared_cpu_us_per_packet,redis_cpu_us_per_packet,\
postgres_write_bytes_per_packet,postgres_write_syscalls_per_packet,postgres_shared_write_bytes_per_packet,wal_bytes_per_packet,wal_records_per_packet,wal_fpi_per_packet,\
client_cpu_cores,machine_busy_cores,rss_max_mib,hwm_mib,\
acked,undelivered,unmarked,redeliveries,duplicates,ingest_errors,unoffered,mark_errors,saturated,machine_cores,unix_time";

    pub fn csv_row(&self) -> String {
        fn f(v: Option<f64>, digits: usize) -> String {
            v.map_or(String::new(), |v| format!("{v:.digits$}"))
        }
        fn n<T: ToString>(v: Option<T>) -> String {
            v.map_or(String::new(), |v| v.to_string())
        }
        let ms = |us: Option<u64>| f(us.map(|us| us as f64 / 1000.0), 3);
        let lat = |p: &Option<Percentiles>| -> Vec<String> {
            match p {
                Some(p) => [p.p50, p.p90, p.p99, p.p999, p.max]
                    .iter()
                    .map(|us| ms(Some(*us)))
                    .collect(),
                None => vec![String::new(); 5],
            }
        };
        let us_per_packet = |c: Option<Cost>| f(c.and_then(|c| c.cpu.us_per_packet), 1);
        let bytes_per_packet = |c: Option<Cost>| f(c.and_then(|c| c.disk?.bytes_per_packet), 0);
        let syscalls_per_packet =
            |c: Option<Cost>| f(c.and_then(|c| c.disk?.syscalls_per_packet), 2);
        let worst = series::summary(&self.series).map(|s| s.worst);
        let server_cpu = self.server_cost.map(|c| c.cpu);
        let e = &self.end;
        let mut cols = vec![
            self.mode.clone(),
            self.target.clone(),
            f(self.offered_rate, 0),
            n(self.outstanding),
            n(self.users),
            n(self.streams),
            n(self.in_flight),
            n(self.marks),
            n(self.connections),
            n(self.concurrency),
            n(self.batch_size),
            format!("{:.3}", self.window_s),
            f(self.ingested_per_s, 1),
            f(self.delivered_per_s, 1),
            f(self.marked_per_s, 1),
            f(self.drained_per_s, 1),
        ];
        cols.extend(lat(&self.ack));
        cols.extend(lat(&self.e2e));
        cols.extend([
            n(worst.map(|w| w.second)),
            ms(worst.and_then(|w| w.e2e_p99)),
            f(server_cpu.map(|c| c.seconds), 3),
            f(server_cpu.map(|c| c.cores), 3),
            us_per_packet(self.server_cost),
            bytes_per_packet(self.server_cost),
            syscalls_per_packet(self.server_cost),
            f(self.store_cpu.and_then(|c| c.us_per_packet), 1),
            us_per_packet(self.pg_backends),
            us_per_packet(self.pg_shared),
            us_per_packet(self.redis),
            bytes_per_packet(self.pg_backends),
            syscalls_per_packet(self.pg_backends),
            bytes_per_packet(self.pg_shared),
            f(self.wal.map(|w| w.bytes_per_packet), 0),
            f(self.wal.map(|w| w.records_per_packet), 2),
            f(self.wal.map(|w| w.fpi_per_packet), 3),
            f(self.client_cpu.map(|c| c.cores), 3),
            f(self.machine_cores, 3),
            f(self.rss_max_mib, 1),
            f(self.hwm_mib, 1),
            e.acked.to_string(),
            n(e.undelivered),
            n(e.unmarked),
            e.redeliveries.to_string(),
            e.duplicates.to_string(),
            e.ingest_errors.to_string(),
            e.unoffered.to_string(),
            e.mark_errors.to_string(),
            self.saturated.to_string(),
            machine_cores().to_string(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs())
                .to_string(),
        ]);
        // Values are numbers and fixed words; a stray comma would shift columns.
        cols.iter()
            .map(|c| c.replace(',', ";"))
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Appends the row, writing the header first into a new or empty file.
    pub fn append_csv(&self, path: &Path) -> Result<()> {
        let fresh = check_csv(path)?;
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if fresh {
            writeln!(file, "{}", Self::CSV_HEADER)?;
        }
        writeln!(file, "{}", self.csv_row())?;
        Ok(())
    }
}

/// A CSV this version may append to: new, empty, or with its header (rows
/// under another version's header would be read as the wrong figures).
/// Returns whether the header is still to be written. Called before a run
/// as well, so a wrong file is found before the minutes of measuring.
pub fn check_csv(path: &Path) -> Result<bool> {
    let existing = match std::fs::read_to_string(path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
        Err(e) => bail!("reading {}: {e}", path.display()),
    };
    match existing.lines().next() {
        None => Ok(true),
        Some(header) if header == Report::CSV_HEADER => Ok(false),
        Some(_) => bail!(
            "{} has other columns than this version of the tool writes: append to a new file",
            path.display()
        ),
    }
}

fn series_summary(s: &series::Summary) -> String {
    let ms =
        |us: Option<u64>| us.map_or("n/a".into(), |us| format!("{:.2} ms", us as f64 / 1000.0));
    format!(
        "worst second {}–{} s: p99 {} (max {}, n={}); median second p99 {} over {} s",
        s.worst.second,
        s.worst.second + 1,
        ms(s.worst.e2e_p99),
        ms(s.worst.e2e_max),
        s.worst.delivered,
        ms(Some(s.median_p99)),
        s.seconds
    )
}

/// Cores of this machine (the plot's title says what the figures shared).
pub fn machine_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn csv_is_appended_only_under_its_own_header() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("runs.csv");
        let r = Report {
            mode: "e2e".into(),
            ..Default::default()
        };
        r.append_csv(&path).unwrap();
        r.append_csv(&path).unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert_eq!(text.lines().next(), Some(Report::CSV_HEADER));
        std::fs::write(&path, "mode,target\ne2e,sqlite\n").unwrap();
        assert!(r.append_csv(&path).is_err());
        assert_eq!(std::fs::read_to_string(&path).unwrap().lines().count(), 2);
    }

    #[test]
    fn row_has_as_many_columns_as_the_header() {
        let r = Report {
            mode: "e2e".into(),
            target: "sqlite".into(),
            offered_rate: Some(1000.0),
            marks: Some("unary"),
            ..Default::default()
        };
        assert_eq!(
            r.csv_row().split(',').count(),
            Report::CSV_HEADER.split(',').count()
        );
    }
}
