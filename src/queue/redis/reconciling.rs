//! What the reconciler asks of the Redis queue: which packets the stream
//! holds, adding ids alone, and whether the server is the one checked
//! before.
//!
//! A packet is committed first and XADDed after, by whichever node
//! committed it, so the stream can lag the database by that node's send.
//! A [`StreamView`] remembers where it stopped in each shard, so a second
//! look ([`RedisQueue::catch_up`]) reads only the entries added since: an
//! entry id is always above every id its stream held before.
use std::collections::HashSet;
use std::sync::atomic::Ordering;
use std::time::Duration;

use chrono::{DateTime, Utc};
use fred::prelude::*;

use super::{Entry, GROUP, ID, PAGE, RedisQueue};
use crate::domain::PacketId;
use crate::queue::QueueError;

/// The packet ids seen in the stream, and per shard the last entry read.
#[derive(Debug, Default)]
pub struct StreamView {
    pub ids: HashSet<PacketId>,
    /// XRANGE start for the next look, per shard.
    next: Vec<String>,
}

impl RedisQueue {
    /// The packet ids in the stream (every shard), all or those of entries
    /// added since `since` (for the reconciler).
    pub async fn stream_ids(&self, since: Option<DateTime<Utc>>) -> Result<StreamView, QueueError> {
        // Entry ids begin with the time (ms) they were added.
        let start = since.map_or("-".to_owned(), |t| {
            format!("{}-0", t.timestamp_millis().max(0))
        });
        let mut view = StreamView {
            ids: HashSet::new(),
            next: vec![start; self.shards.count()],
        };
        self.catch_up(&mut view).await?;
        Ok(view)
    }

    /// Reads into `view` the entries added since it last looked.
    pub async fn catch_up(&self, view: &mut StreamView) -> Result<(), QueueError> {
        for (shard, start) in view.next.iter_mut().enumerate() {
            loop {
                let page: Vec<Entry> = self
                    .fast()
                    .xrange(
                        self.shards.key(shard),
                        start.as_str(),
                        "+",
                        Some(PAGE as u64),
                    )
                    .await?;
                view.ids.extend(
                    page.iter()
                        .filter_map(|(_, f)| f.get(ID).and_then(|v| PacketId::parse(v).ok())),
                );
                if let Some((last, _)) = page.last() {
                    *start = format!("({last}");
                }
                if page.len() < PAGE {
                    break;
                }
            }
        }
        Ok(())
    }

    /// Waits until everything this node committed before now was XADDed
    /// (or, Redis refusing, kept in its hands), at most `limit`: so a
    /// packet on its way from this node is never taken for a missing one.
    pub async fn sent_so_far(&self, limit: Duration) {
        let mark = self.pushed.load(Ordering::Acquire);
        let mut sent = self.sent.subscribe();
        let _ = tokio::time::timeout(limit, sent.wait_for(|n| *n >= mark)).await;
    }

    /// Adds ids alone (the reconciler): the reader reads their packets from
    /// the database.
    pub async fn add_ids(&self, ids: &[PacketId]) -> Result<(), QueueError> {
        for chunk in ids.chunks(PAGE) {
            let pipeline = self.commands.pipeline();
            for id in chunk {
                let key = self.shards.key(self.shards.of(*id));
                let _: () = pipeline
                    .xadd(key, false, None, "*", (ID, id.to_string()))
                    .await?;
            }
            let _: Vec<Value> = pipeline.all().await?;
        }
        Ok(())
    }

    /// The run_id of the Redis server answering (of one node, in a
    /// cluster): new at every start of a server.
    pub async fn run_id(&self) -> Result<String, QueueError> {
        let info: String = self
            .fast()
            .info(Some(fred::types::InfoKind::Server))
            .await?;
        Ok(info
            .lines()
            .find_map(|l| l.strip_prefix("run_id:"))
            .unwrap_or_default()
            .trim()
            .to_owned())
    }

    /// Whether the stream last checked was another server's than `run`'s
    /// (so this one may have lost or gained entries since).
    pub fn restarted(&self, run: &str) -> bool {
        let checked = self.checked_run.lock().expect("checked lock");
        checked.as_deref().is_some_and(|c| c != run)
    }

    /// The stream of the server `run` was checked against the database.
    pub fn checked(&self, run: String) {
        *self.checked_run.lock().expect("checked lock") = Some(run);
    }

    /// Entries in the stream (every shard), and how many of them nodes hold.
    pub async fn depth(&self) -> Result<(u64, u64), QueueError> {
        if !self.connected() {
            return Ok((0, 0));
        }
        let (mut len, mut held) = (0, 0);
        for shard in 0..self.shards.count() {
            let key = self.shards.key(shard);
            len += self.fast().xlen::<u64, _>(key).await?;
            let summary: Value = self.fast().xpending(key, GROUP, ()).await?;
            held += match summary {
                Value::Array(parts) => parts.first().and_then(|v| v.as_u64()).unwrap_or(0),
                _ => 0,
            };
        }
        Ok((len, held))
    }
}
