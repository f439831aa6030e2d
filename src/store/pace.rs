//! How long a commit group waits for company, learnt from the arrivals and
//! commits before it: under load a group grows (more writes share one
//! fsync), while a lone or slow client never waits.
//!
//! Invariant: a group waits only when at least one more write is expected
//! within the wait (the arrival rate times the wait is at least one), and
//! never longer than the engine's linger nor than a commit itself takes:
//! a write's added latency is bounded by the cost it shares.
use std::time::{Duration, Instant};

/// Weight of the newest sample in the smoothed rate and commit time.
const NEW: f64 = 0.25;

/// The arrival rate and commit time of one lane, smoothed.
#[derive(Debug, Clone)]
pub struct Pace {
    linger: Duration,
    /// Writes a second.
    rate: f64,
    /// Seconds one commit takes.
    commit: f64,
    last_take: Option<Instant>,
}

/// A wait for company: until `company` more writes came, at most `until`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Wait {
    pub until: Duration,
    pub company: usize,
}

impl Pace {
    pub fn new(linger: Duration) -> Pace {
        Pace {
            linger,
            rate: 0.0,
            commit: 0.0,
            last_take: None,
        }
    }

    /// `n` writes were taken at `now`: all that arrived since the last take.
    pub fn took(&mut self, n: usize, now: Instant) {
        if let Some(last) = self.last_take {
            let gap = now.saturating_duration_since(last).as_secs_f64();
            if gap > 0.0 {
                self.rate = smooth(self.rate, n as f64 / gap);
            }
        }
        self.last_take = Some(now);
    }

    /// A commit took `took`.
    pub fn committed(&mut self, took: Duration) {
        self.commit = smooth(self.commit, took.as_secs_f64());
    }

    /// Whether the group in hand should wait for more, and how long.
    pub fn wait(&self) -> Option<Wait> {
        let until = self.linger.min(Duration::from_secs_f64(self.commit));
        let expected = self.rate * until.as_secs_f64();
        (expected >= 1.0).then(|| Wait {
            until,
            company: expected as usize,
        })
    }
}

fn smooth(old: f64, sample: f64) -> f64 {
    if old == 0.0 {
        sample
    } else {
        old + NEW * (sample - old)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINGER: Duration = Duration::from_micros(300);

    /// `groups` takes of `n` writes `gap` apart, each commit taking `commit`.
    fn paced(n: usize, gap: Duration, commit: Duration, groups: u32) -> Pace {
        let mut pace = Pace::new(LINGER);
        let start = Instant::now();
        for i in 0..groups {
            pace.took(n, start + gap * i);
            pace.committed(commit);
        }
        pace
    }

    #[test]
    fn a_lone_client_never_waits() {
        // One write every 10 ms (100/s), commits of 250 µs: no company is
        // expected within any wait.
        let pace = paced(1, Duration::from_millis(10), Duration::from_micros(250), 50);
        assert_eq!(pace.wait(), None);
    }

    #[test]
    fn a_moderate_rate_does_not_wait_for_company_it_will_not_get() {
        // 1,000 writes a second, commits of 250 µs: 0.25 expected.
        let pace = paced(1, Duration::from_millis(1), Duration::from_micros(250), 50);
        assert_eq!(pace.wait(), None);
    }

    #[test]
    fn under_load_a_group_waits_for_the_company_it_expects() {
        // 20,000 writes a second (4 every 200 µs), commits of 250 µs: a
        // wait of 250 µs brings about 5 more.
        let pace = paced(
            4,
            Duration::from_micros(200),
            Duration::from_micros(250),
            50,
        );
        let wait = pace.wait().expect("a wait under load");
        assert_eq!(wait.until, Duration::from_micros(250));
        assert!((4..=5).contains(&wait.company), "{wait:?}");
    }

    #[test]
    fn the_wait_is_bounded_by_the_linger_and_by_the_commit() {
        // Slow commits (5 ms): the linger bounds the wait.
        let slow = paced(10, Duration::from_millis(1), Duration::from_millis(5), 50);
        assert_eq!(slow.wait().map(|w| w.until), Some(LINGER));
        // Fast commits (100 µs) at 50,000/s: the commit time bounds it.
        let fast = paced(
            5,
            Duration::from_micros(100),
            Duration::from_micros(100),
            50,
        );
        assert_eq!(
            fast.wait().map(|w| w.until),
            Some(Duration::from_micros(100))
        );
    }

    #[test]
    fn a_burst_that_ends_stops_the_waiting() {
        let mut pace = paced(
            4,
            Duration::from_micros(200),
            Duration::from_micros(250),
            50,
        );
        assert!(pace.wait().is_some());
        // Then one write every 20 ms: the smoothed rate falls within a few.
        let start = Instant::now() + Duration::from_secs(1);
        for i in 0..10 {
            pace.took(1, start + Duration::from_millis(20) * i);
        }
        assert_eq!(pace.wait(), None);
    }

    #[test]
    fn no_linger_never_waits() {
        let mut pace = Pace::new(Duration::ZERO);
        let start = Instant::now();
        for i in 0..50 {
            pace.took(100, start + Duration::from_micros(10) * i);
            pace.committed(Duration::from_millis(1));
        }
        assert_eq!(pace.wait(), None);
    }
}
