//! Ends expired leases, on every node: the database hands each expired row
//! to exactly one sweeper, which queues it again.
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::dispatcher::Dispatcher;

pub(super) async fn run(dispatcher: Arc<Dispatcher>, every: Duration, shutdown: CancellationToken) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        if let Err(e) = dispatcher.expire_leases().await {
            tracing::warn!(error = %e, "lease sweep failed");
        }
    }
}
