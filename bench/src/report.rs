//! One run's figures: a human-readable block on stdout and, with --csv, one
//! appended row (the plot reads these rows back).
use std::io::Write;
use std::path::Path;

use anyhow::Result;
use hdrhistogram::Histogram;

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

    fn human(&self) -> String {
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

    fn human(&self) -> String {
        format!(
            "{:.2} s = {:.2} cores, {}",
            self.seconds,
            self.cores,
            self.us_per_packet
                .map_or("n/a µs/packet".into(), |u| format!("{u:.0} µs/packet"))
        )
    }
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
    pub cpu: Option<Cpu>,
    pub cpu_basis: &'static str,
    pub store_cpu: Option<Cpu>,
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
        let mut line = |k: &str, v: String| out.push_str(&format!("{k:<17}{v}\n"));
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
        match &self.cpu {
            Some(c) => line("server CPU", format!("{} ({})", c.human(), self.cpu_basis)),
            None => line("server CPU", "n/a (no pid: pass --pid)".into()),
        }
        if let Some(c) = &self.store_cpu {
            line(
                "store CPU",
                format!(
                    "{} (PostgreSQL backends / redis-server, not in the figure above)",
                    c.human()
                ),
            );
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
        if self.offered_rate.is_some() && self.delivered_per_s.is_some() {
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

    pub const CSV_HEADER: &'static str = "mode,target,offered_rate,streams,in_flight,marks,connections,concurrency,batch_size,window_s,\
ingested_per_s,delivered_per_s,marked_per_s,drained_per_s,\
ack_p50_ms,ack_p90_ms,ack_p99_ms,ack_p999_ms,ack_max_ms,\
e2e_p50_ms,e2e_p90_ms,e2e_p99_ms,e2e_p999_ms,e2e_max_ms,\
cpu_s,cpu_cores,cpu_us_per_packet,store_cpu_us_per_packet,client_cpu_cores,machine_busy_cores,rss_max_mib,hwm_mib,\
acked,undelivered,unmarked,redeliveries,duplicates,ingest_errors,unoffered,mark_errors,saturated,machine_cores,unix_time";

    pub fn csv_row(&self) -> String {
        fn f(v: Option<f64>, digits: usize) -> String {
            v.map_or(String::new(), |v| format!("{v:.digits$}"))
        }
        fn n<T: ToString>(v: Option<T>) -> String {
            v.map_or(String::new(), |v| v.to_string())
        }
        let lat = |p: &Option<Percentiles>| -> Vec<String> {
            match p {
                Some(p) => [p.p50, p.p90, p.p99, p.p999, p.max]
                    .iter()
                    .map(|us| format!("{:.3}", *us as f64 / 1000.0))
                    .collect(),
                None => vec![String::new(); 5],
            }
        };
        let e = &self.end;
        let mut cols = vec![
            self.mode.clone(),
            self.target.clone(),
            f(self.offered_rate, 0),
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
            f(self.cpu.map(|c| c.seconds), 3),
            f(self.cpu.map(|c| c.cores), 3),
            f(self.cpu.and_then(|c| c.us_per_packet), 1),
            f(self.store_cpu.and_then(|c| c.us_per_packet), 1),
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
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        if file.metadata()?.len() == 0 {
            writeln!(file, "{}", Self::CSV_HEADER)?;
        }
        writeln!(file, "{}", self.csv_row())?;
        Ok(())
    }
}

/// Cores of this machine (the plot's title says what the figures shared).
pub fn machine_cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

#[cfg(test)]
mod tests {
    use super::*;

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
