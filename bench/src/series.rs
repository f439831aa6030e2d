//! Latency second by second, so a stall shows when it happened (a
//! checkpoint, a compaction) instead of being averaged into the run's p99.
//! A packet counts in the second it was due to be sent (open loop: its
//! scheduled time; closed loop: its send), measured from the window's start:
//! a stall then shows in the second whose packets waited for it.
use std::io::Write as _;
use std::path::Path;
use std::sync::{Mutex, OnceLock};
use std::time::Instant;

use anyhow::{Context as _, Result};
use hdrhistogram::Histogram;

/// One histogram per second since `origin`.
pub struct LatencySeries {
    origin: OnceLock<Instant>,
    seconds: Mutex<Vec<Histogram<u64>>>,
}

fn second_histogram() -> Histogram<u64> {
    // Two significant digits (1%) is plenty for a per-second p99 and keeps
    // a second's histogram ~50 KB, so an hour-long run stays small.
    Histogram::new_with_bounds(1, 3_600_000_000, 2).expect("valid histogram bounds")
}

impl Default for LatencySeries {
    fn default() -> Self {
        Self {
            origin: OnceLock::new(),
            seconds: Mutex::default(),
        }
    }
}

impl LatencySeries {
    /// Second 0 starts here; before this is called nothing is recorded.
    pub fn start(&self, origin: Instant) {
        let _ = self.origin.set(origin);
    }

    /// A packet due at `scheduled` took `us`.
    pub fn record(&self, scheduled: Instant, us: u64) {
        let Some(origin) = self.origin.get() else {
            return;
        };
        let Some(since) = scheduled.checked_duration_since(*origin) else {
            return;
        };
        let second = since.as_secs() as usize;
        let mut seconds = self.seconds.lock().unwrap();
        if seconds.len() <= second {
            seconds.resize_with(second + 1, second_histogram);
        }
        let _ = seconds[second].record(us.max(1));
    }

    fn snapshot(&self) -> Vec<Histogram<u64>> {
        self.seconds.lock().unwrap().clone()
    }
}

/// One second's figures, µs.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Second {
    pub second: usize,
    pub acked: u64,
    pub ack_p99: Option<u64>,
    pub delivered: u64,
    pub e2e_p50: Option<u64>,
    pub e2e_p90: Option<u64>,
    pub e2e_p99: Option<u64>,
    pub e2e_max: Option<u64>,
}

/// The ack and ingest→delivery series side by side, seconds `0..seconds`
/// (the measured window; later seconds only hold stragglers of the drain).
pub fn rows(ack: &LatencySeries, e2e: &LatencySeries, seconds: usize) -> Vec<Second> {
    let (ack, e2e) = (ack.snapshot(), e2e.snapshot());
    let quantile = |h: Option<&Histogram<u64>>, q: f64| {
        h.filter(|h| !h.is_empty()).map(|h| h.value_at_quantile(q))
    };
    (0..seconds)
        .map(|s| {
            let (a, d) = (ack.get(s), e2e.get(s));
            Second {
                second: s,
                acked: a.map_or(0, Histogram::len),
                ack_p99: quantile(a, 0.99),
                delivered: d.map_or(0, Histogram::len),
                e2e_p50: quantile(d, 0.50),
                e2e_p90: quantile(d, 0.90),
                e2e_p99: quantile(d, 0.99),
                e2e_max: d.filter(|h| !h.is_empty()).map(Histogram::max),
            }
        })
        .collect()
}

/// The seconds' ingest→delivery p99 at a glance: the worst second (when,
/// how bad) against the typical one.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Summary {
    pub worst: Second,
    /// The median of the seconds' p99s, µs.
    pub median_p99: u64,
    pub seconds: usize,
}

pub fn summary(rows: &[Second]) -> Option<Summary> {
    let with_p99: Vec<&Second> = rows.iter().filter(|r| r.e2e_p99.is_some()).collect();
    let worst = **with_p99.iter().max_by_key(|r| r.e2e_p99)?;
    let mut p99s: Vec<u64> = with_p99.iter().filter_map(|r| r.e2e_p99).collect();
    p99s.sort_unstable();
    Some(Summary {
        worst,
        median_p99: p99s[p99s.len() / 2],
        seconds: with_p99.len(),
    })
}

pub const CSV_HEADER: &str =
    "second,acked,ack_p99_ms,delivered,e2e_p50_ms,e2e_p90_ms,e2e_p99_ms,e2e_max_ms";

fn ms(us: Option<u64>) -> String {
    us.map_or(String::new(), |us| format!("{:.3}", us as f64 / 1000.0))
}

/// Writes the rows to `path` (replacing it): one run, one file.
pub fn write_csv(path: &Path, rows: &[Second]) -> Result<()> {
    let mut out = String::from(CSV_HEADER);
    out.push('\n');
    for r in rows {
        out.push_str(&format!(
            "{},{},{},{},{},{},{},{}\n",
            r.second,
            r.acked,
            ms(r.ack_p99),
            r.delivered,
            ms(r.e2e_p50),
            ms(r.e2e_p90),
            ms(r.e2e_p99),
            ms(r.e2e_max)
        ));
    }
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(out.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn packets_count_in_the_second_they_were_due() {
        let (ack, e2e) = (LatencySeries::default(), LatencySeries::default());
        let t0 = Instant::now();
        // Before start: not recorded.
        e2e.record(t0, 5);
        e2e.start(t0);
        ack.start(t0);
        for i in 0..100u64 {
            e2e.record(t0 + Duration::from_millis(10 * i), 1_000);
        }
        // A stall in second 2.
        e2e.record(t0 + Duration::from_millis(2_500), 80_000);
        ack.record(t0 + Duration::from_millis(2_500), 70_000);
        let rows = rows(&ack, &e2e, 4);
        assert_eq!(rows.len(), 4);
        assert_eq!(rows[0].delivered, 100);
        assert_eq!(rows[2].delivered, 1);
        assert_eq!(rows[3].delivered, 0);
        let s = summary(&rows).unwrap();
        assert_eq!(s.worst.second, 2);
        assert_eq!(s.seconds, 2);
        assert!(s.worst.e2e_p99.unwrap() >= 79_000);
        assert_eq!(rows[2].acked, 1);
    }
}
