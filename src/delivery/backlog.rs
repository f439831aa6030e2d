//! One node: reads pending packets back from the database when the memory
//! queue spilled them (at start, and whenever more arrived than it holds),
//! oldest first, a window at a time.
use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::dispatcher::Dispatcher;
use crate::error::Error;

/// Reads until the queue needs no more; returns how many packets were read.
pub(super) async fn refill(dispatcher: &Arc<Dispatcher>) -> Result<usize, Error> {
    let mut total = 0;
    while let Some(read) = dispatcher.lock_queue(|queue, _| queue.begin_refill()) {
        let (rows, quiet) = dispatcher
            .store()
            .pending_after(read.after_seq, read.limit as u32)
            .await?;
        total += rows.len();
        // Still quiet: no insert commits until the queue took the rows.
        dispatcher.lock_queue(|queue, held| queue.refilled(read, rows, held));
        drop(quiet);
        dispatcher.pump_now();
    }
    Ok(total)
}

pub(super) async fn run(dispatcher: Arc<Dispatcher>, shutdown: CancellationToken) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = dispatcher.backlog_wanted.notified() => {}
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
        if let Err(e) = refill(&dispatcher).await {
            tracing::warn!(error = %e, "reading the backlog failed; retrying");
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }
}
