//! Retention: finished packets (processed, failed, dead_letter) older than
//! the retention period, by `received_at`, are deleted in small steps,
//! oldest first, so a year of telemetry does not pile up. Pending packets
//! are never deleted. On PostgreSQL a step is mostly dropping a whole day
//! (see `partitions`), so the same task also creates the days ahead, and
//! runs even with retention off.
use std::time::Duration;

use chrono::Utc;
use tokio_util::sync::CancellationToken;

use super::Store;

/// Rows one step deletes at most: a few ms of the writer, like one commit.
const BATCH: u32 = 1000;
/// Pause between two steps, so ingest keeps the writer most of the time.
const BETWEEN_BATCHES: Duration = Duration::from_millis(100);
/// How often the oldest packets are looked at.
const EVERY: Duration = Duration::from_secs(60);

/// How long finished packets are kept; None: forever.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention(pub Option<Duration>);

/// Parses a retention period (see [`parse_period`]), for the command line.
pub fn parse(text: &str) -> Result<Retention, String> {
    parse_period(text).map(Retention)
}

/// Parses a retention period: `30d`, `12h`, `90m`, `45s`, or `off`.
pub fn parse_period(text: &str) -> Result<Option<Duration>, String> {
    let text = text.trim();
    if text.eq_ignore_ascii_case("off") {
        return Ok(None);
    }
    // The unit is the last character, not byte: `30é` ends in two bytes,
    // and splitting between them panicked.
    let split = text.char_indices().last().map_or(0, |(at, _)| at);
    let (number, unit) = text.split_at(split);
    let seconds = match unit {
        "d" => 86_400,
        "h" => 3_600,
        "m" => 60,
        "s" => 1,
        _ => {
            return Err(format!(
                "{text:?}: a number with d, h, m or s (30d, 12h), or off"
            ));
        }
    };
    let n: u64 = number
        .parse()
        .ok()
        .filter(|n| *n > 0)
        .ok_or_else(|| format!("{text:?}: a positive whole number before the unit"))?;
    n.checked_mul(seconds)
        .map(|s| Some(Duration::from_secs(s)))
        .ok_or_else(|| format!("{text:?} is too long"))
}

/// Deletes what retention allows, step by step; returns how many.
pub async fn prune_now(store: &Store, period: Duration, shutdown: &CancellationToken) -> u64 {
    let Ok(period) = chrono::Duration::from_std(period) else {
        return 0;
    };
    let before = Utc::now() - period;
    let mut total = 0;
    while !shutdown.is_cancelled() {
        match store.prune(before, BATCH).await {
            Ok(step) => {
                total += step.packets;
                metrics::counter!("bucket_packets_pruned_total").increment(step.packets);
                if step.done {
                    break;
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, "retention: deleting old packets failed; will retry");
                break;
            }
        }
        tokio::time::sleep(BETWEEN_BATCHES).await;
    }
    if total > 0 {
        tracing::info!(deleted = total, %before, "retention: old finished packets deleted");
    }
    total
}

/// Every minute until `shutdown`: readies the days ahead, and deletes what
/// retention allows if `period` is set.
pub async fn run(store: Store, period: Option<Duration>, shutdown: CancellationToken) {
    loop {
        if let Err(e) = store.prepare(Utc::now()).await {
            tracing::warn!(error = %e, "retention: readying the days ahead failed; will retry");
        }
        if let Some(period) = period {
            prune_now(&store, period, &shutdown).await;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(EVERY) => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn periods() {
        assert_eq!(
            parse_period("30d"),
            Ok(Some(Duration::from_secs(30 * 86_400)))
        );
        assert_eq!(
            parse_period("12h"),
            Ok(Some(Duration::from_secs(12 * 3_600)))
        );
        assert_eq!(parse_period("off"), Ok(None));
        assert_eq!(parse_period("OFF"), Ok(None));
        for bad in [
            "",
            "30",
            "d",
            "0d",
            "-1d",
            "1.5d",
            "30w",
            "99999999999999999999d",
            "30é",
            "é",
            "3é0d",
        ] {
            assert!(parse_period(bad).is_err(), "{bad}");
        }
    }
}
