//! Every packet the tool sent, by id: when it was scheduled, whether its
//! ingest was acknowledged, how often it was delivered, whether its mark was
//! answered OK. Publishers and consumers update it concurrently (a delivery
//! may arrive before its ingest ack); the end check reads it.
use std::collections::HashMap;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering::Relaxed};
use std::time::Instant;

use hdrhistogram::Histogram;
use uuid::Uuid;

use crate::series::{self, LatencySeries};

/// Sharded so that publishers and consumers on other threads rarely meet on
/// one lock.
const SHARDS: usize = 64;

#[derive(Debug)]
struct Entry {
    /// When the packet was due to be sent (open loop) or was sent (closed loop).
    scheduled: Instant,
    /// Inside the measured window: its latencies go into the histograms.
    measured: bool,
    acked: bool,
    deliveries: u32,
    marked: bool,
}

/// Monotonic counts; rates come from their values at the window's two ends.
#[derive(Default, Debug)]
pub struct Counters {
    /// Sends due inside the measured window (open loop: including the ones
    /// that could not be offered).
    pub offered: AtomicU64,
    /// Open loop: sends skipped because too many requests were outstanding.
    pub unoffered: AtomicU64,
    pub acked: AtomicU64,
    /// Packets whose ingest failed (request error or rejected item).
    pub ingest_errors: AtomicU64,
    /// Ingest requests sent and not yet answered.
    pub outstanding: AtomicU64,
    pub deliveries: AtomicU64,
    /// Deliveries the server numbered > 1 (delivery_attempt / NATS delivered count).
    pub redeliveries: AtomicU64,
    /// Deliveries of an id this tool had already received.
    pub duplicates: AtomicU64,
    /// Deliveries of ids this tool never sent (an old backlog on --url).
    pub foreign: AtomicU64,
    pub marked: AtomicU64,
    pub mark_errors: AtomicU64,
    /// Consumer streams that broke and were opened again.
    pub stream_errors: AtomicU64,
    /// Packets both acknowledged and marked: the end check waits for this
    /// to reach `acked`.
    pub settled: AtomicU64,
}

/// Counter values at one instant.
#[derive(Clone, Copy, Debug, Default)]
pub struct Snapshot {
    pub at: Option<Instant>,
    pub acked: u64,
    pub deliveries: u64,
    pub marked: u64,
}

/// What the end check found.
#[derive(Clone, Copy, Debug, Default)]
pub struct EndScan {
    pub acked: u64,
    /// Acknowledged and never delivered: must be 0.
    pub undelivered: u64,
    /// Acknowledged, delivered, never marked OK.
    pub unmarked: u64,
    /// Delivered although its ingest was not acknowledged (the server
    /// committed it and the answer was lost, or it came after the deadline).
    pub delivered_unacked: u64,
}

pub struct Tracker {
    shards: Vec<Mutex<HashMap<u128, Entry>>>,
    pub counters: Counters,
    ack_latency: Mutex<Histogram<u64>>,
    e2e_latency: Mutex<Histogram<u64>>,
    ack_series: LatencySeries,
    e2e_series: LatencySeries,
    first_error: Mutex<Option<String>>,
}

fn new_histogram() -> Histogram<u64> {
    // 1 µs to 1 hour at 3 significant digits.
    Histogram::new_with_bounds(1, 3_600_000_000, 3).expect("valid histogram bounds")
}

fn micros(from: Instant, to: Instant) -> u64 {
    to.saturating_duration_since(from).as_micros() as u64
}

impl Default for Tracker {
    fn default() -> Self {
        Self::new()
    }
}

impl Tracker {
    pub fn new() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::default()).collect(),
            counters: Counters::default(),
            ack_latency: Mutex::new(new_histogram()),
            e2e_latency: Mutex::new(new_histogram()),
            ack_series: LatencySeries::default(),
            e2e_series: LatencySeries::default(),
            first_error: Mutex::default(),
        }
    }

    fn shard(&self, id: Uuid) -> &Mutex<HashMap<u128, Entry>> {
        // v7 ids: the low bits are random, so they spread evenly.
        &self.shards[(id.as_u128() as usize) % SHARDS]
    }

    /// A packet about to be sent; call before the send, so that a delivery
    /// racing its ingest ack finds it.
    pub fn register(&self, id: Uuid, scheduled: Instant, measured: bool) {
        self.shard(id).lock().unwrap().insert(
            id.as_u128(),
            Entry {
                scheduled,
                measured,
                acked: false,
                deliveries: 0,
                marked: false,
            },
        );
        if measured {
            self.counters.offered.fetch_add(1, Relaxed);
        }
    }

    pub fn acked(&self, id: Uuid, at: Instant) {
        let mut shard = self.shard(id).lock().unwrap();
        let Some(e) = shard.get_mut(&id.as_u128()) else {
            return;
        };
        if e.acked {
            return;
        }
        e.acked = true;
        let (measured, scheduled, marked) = (e.measured, e.scheduled, e.marked);
        drop(shard);
        self.counters.acked.fetch_add(1, Relaxed);
        if marked {
            self.counters.settled.fetch_add(1, Relaxed);
        }
        if measured {
            let us = micros(scheduled, at).max(1);
            let _ = self.ack_latency.lock().unwrap().record(us);
            self.ack_series.record(scheduled, us);
        }
    }

    pub fn ingest_failed(&self, count: u64, why: impl FnOnce() -> String) {
        self.counters.ingest_errors.fetch_add(count, Relaxed);
        self.note_error(why);
    }

    /// A delivery; `attempt` is the server's count (1 for the first).
    pub fn delivered(&self, id: Uuid, attempt: u64, at: Instant) {
        self.counters.deliveries.fetch_add(1, Relaxed);
        if attempt > 1 {
            self.counters.redeliveries.fetch_add(1, Relaxed);
        }
        let mut shard = self.shard(id).lock().unwrap();
        let Some(e) = shard.get_mut(&id.as_u128()) else {
            drop(shard);
            self.counters.foreign.fetch_add(1, Relaxed);
            return;
        };
        e.deliveries += 1;
        if e.deliveries > 1 {
            drop(shard);
            self.counters.duplicates.fetch_add(1, Relaxed);
            return;
        }
        let (measured, scheduled) = (e.measured, e.scheduled);
        drop(shard);
        if measured {
            let us = micros(scheduled, at).max(1);
            let _ = self.e2e_latency.lock().unwrap().record(us);
            self.e2e_series.record(scheduled, us);
        }
    }

    /// The server answered a mark of `id` with OK.
    pub fn marked(&self, id: Uuid) {
        self.counters.marked.fetch_add(1, Relaxed);
        let mut shard = self.shard(id).lock().unwrap();
        if let Some(e) = shard.get_mut(&id.as_u128())
            && !e.marked
        {
            e.marked = true;
            if e.acked {
                self.counters.settled.fetch_add(1, Relaxed);
            }
        }
    }

    pub fn mark_failed(&self, count: u64, why: impl FnOnce() -> String) {
        self.counters.mark_errors.fetch_add(count, Relaxed);
        self.note_error(why);
    }

    pub fn stream_failed(&self, why: impl FnOnce() -> String) {
        self.counters.stream_errors.fetch_add(1, Relaxed);
        self.note_error(why);
    }

    /// Keeps the first error's text for the report: one is enough to debug,
    /// thousands would drown the output.
    fn note_error(&self, why: impl FnOnce() -> String) {
        let mut first = self.first_error.lock().unwrap();
        if first.is_none() {
            *first = Some(why());
        }
    }

    pub fn first_error(&self) -> Option<String> {
        self.first_error.lock().unwrap().clone()
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            at: Some(Instant::now()),
            acked: self.counters.acked.load(Relaxed),
            deliveries: self.counters.deliveries.load(Relaxed),
            marked: self.counters.marked.load(Relaxed),
        }
    }

    /// Every acknowledged packet was marked and no ingest is still waiting
    /// for its answer.
    pub fn all_settled(&self) -> bool {
        self.counters.outstanding.load(Relaxed) == 0
            && self.counters.settled.load(Relaxed) >= self.counters.acked.load(Relaxed)
    }

    pub fn ack_histogram(&self) -> Histogram<u64> {
        self.ack_latency.lock().unwrap().clone()
    }

    pub fn e2e_histogram(&self) -> Histogram<u64> {
        self.e2e_latency.lock().unwrap().clone()
    }

    /// Per-second latencies count from `t0` (the measured window's start).
    pub fn start_series(&self, t0: Instant) {
        self.ack_series.start(t0);
        self.e2e_series.start(t0);
    }

    /// The measured window's first `seconds` seconds.
    pub fn series(&self, seconds: usize) -> Vec<series::Second> {
        series::rows(&self.ack_series, &self.e2e_series, seconds)
    }

    pub fn end_scan(&self) -> EndScan {
        let mut scan = EndScan::default();
        for shard in &self.shards {
            for e in shard.lock().unwrap().values() {
                if e.acked {
                    scan.acked += 1;
                    if e.deliveries == 0 {
                        scan.undelivered += 1;
                    } else if !e.marked {
                        scan.unmarked += 1;
                    }
                } else if e.deliveries > 0 {
                    scan.delivered_unacked += 1;
                }
            }
        }
        scan
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_delivery_before_its_ack_still_settles() {
        let t = Tracker::new();
        let id = Uuid::now_v7();
        let now = Instant::now();
        t.register(id, now, true);
        t.counters.outstanding.fetch_add(1, Relaxed);
        t.delivered(id, 1, now);
        t.marked(id);
        assert!(!t.all_settled());
        t.acked(id, now);
        t.counters.outstanding.fetch_sub(1, Relaxed);
        assert!(t.all_settled());
        let scan = t.end_scan();
        assert_eq!((scan.acked, scan.undelivered, scan.unmarked), (1, 0, 0));
    }

    #[test]
    fn second_delivery_is_a_duplicate_and_unknown_ids_are_foreign() {
        let t = Tracker::new();
        let id = Uuid::now_v7();
        let now = Instant::now();
        t.register(id, now, true);
        t.acked(id, now);
        t.delivered(id, 1, now);
        t.delivered(id, 2, now);
        t.delivered(Uuid::now_v7(), 1, now);
        assert_eq!(t.counters.duplicates.load(Relaxed), 1);
        assert_eq!(t.counters.redeliveries.load(Relaxed), 1);
        assert_eq!(t.counters.foreign.load(Relaxed), 1);
        assert_eq!(t.e2e_histogram().len(), 1);
        assert_eq!(t.end_scan().unmarked, 1);
    }
}
