//! The lease timer: wakes when the next lease expires, ends it, and has the
//! database count the delivery.
use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::dispatcher::Dispatcher;

/// `every`: the longest sleep, so lease ends the database refused are
/// retried that often.
pub(super) async fn run(dispatcher: Arc<Dispatcher>, every: Duration, shutdown: CancellationToken) {
    let mut next: Option<Instant> = None;
    loop {
        let latest = Instant::now() + every;
        let deadline = next.map_or(latest, |at| at.min(latest));
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(deadline) => {}
            _ = dispatcher.expiry_changed.notified() => {}
        }
        next = dispatcher.expire();
    }
}
