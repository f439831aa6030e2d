//! The Redis queue: a stream read through a consumer group, shared by every
//! bucket node.
//!
//! `push` XADDs each id to `{prefix}pending`. One reader task per node
//! XREADGROUPs (blocking, so a packet ingested on any node reaches a waiting
//! subscriber on any other at once), only as many ids as its subscribers
//! are waiting for, and XACKs + XDELs them as it hands them over. The group
//! gives each entry to one node; the database's conditional lease gives each
//! packet to one stream. Leases live in the database, not in the stream's
//! pending list: expiry and dead-lettering are the database's sweep, and an
//! expired packet is XADDed again.
//!
//! While Redis cannot be reached the node keeps working on its local
//! buffer (the in-memory queue); the reconciler puts back into the stream
//! whatever pending packets it lacks once Redis answers again.
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::Options;
use fred::types::streams::XReadResponse;
use tokio::sync::{Notify, broadcast};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::memory::MemoryQueue;
use super::{Queue, QueueError};
use crate::config::RedisConfig;

const GROUP: &str = "dispatch";
const FIELD: &str = "id";
/// How long one XREADGROUP waits before the reader looks at demand again.
const BLOCK_MS: u64 = 1000;
/// Most ids one XRANGE page reads while listing the stream.
const PAGE: u64 = 1000;
/// An entry read by a consumer but not removed this long after is stuck
/// with a node that stopped between the two steps (a read cut short by
/// shutdown, a crash): it is taken over. The two steps are a round trip apart.
const STALE_MS: u64 = 3000;
const RECLAIM_EVERY: Duration = Duration::from_secs(1);

pub struct RedisQueue {
    /// Ordinary commands, failing fast while disconnected.
    commands: Client,
    /// A connection of its own for the blocking XREADGROUP.
    reader: Client,
    /// Pub/sub for lease ends across nodes.
    subscriber: SubscriberClient,
    settled: broadcast::Sender<(String, Uuid)>,
    key: String,
    channel: String,
    /// This node's name in the consumer group.
    consumer: String,
    /// Ids read from the stream (or pushed while Redis was away), waiting
    /// for a local subscriber.
    local: MemoryQueue,
    /// How many ids local subscribers are waiting for right now.
    wanted: AtomicUsize,
    demand: Notify,
}

impl From<fred::error::Error> for QueueError {
    fn from(e: fred::error::Error) -> Self {
        QueueError(e.to_string())
    }
}

/// The Redis URL from `REDIS_URL`, else from the seed's `REDIS_HOST` & co.
pub fn redis_url(config: &RedisConfig) -> Option<String> {
    if let Some(url) = &config.redis_url {
        return Some(url.clone());
    }
    let host = config.redis_host.as_ref()?;
    let auth = match (&config.redis_username, &config.redis_password) {
        (Some(user), Some(pass)) => format!("{user}:{pass}@"),
        (None, Some(pass)) => format!(":{pass}@"),
        (Some(user), None) => format!("{user}@"),
        (None, None) => String::new(),
    };
    Some(format!("redis://{auth}{host}:{}", config.redis_port))
}

impl RedisQueue {
    /// Builds the clients and starts connecting, without waiting: a Redis
    /// that is down at start is retried forever (exponential backoff).
    pub fn connect(
        url: &str,
        config: &RedisConfig,
        node: &str,
    ) -> Result<Arc<RedisQueue>, QueueError> {
        let mut redis_config = Config::from_url(url)?;
        // Seed-style settings apply on top of a URL that lacks them.
        if redis_config.username.is_none() {
            redis_config.username = config.redis_username.clone();
        }
        if redis_config.password.is_none() {
            redis_config.password = config.redis_password.clone();
        }
        redis_config.fail_fast = false;
        let build = |command_timeout: Duration| {
            let builder = Builder::from_config(redis_config.clone())
                .with_performance_config(|p| p.default_command_timeout = command_timeout)
                .with_connection_config(|c| {
                    c.connection_timeout = Duration::from_secs(2);
                    c.internal_command_timeout = Duration::from_secs(2);
                    c.max_command_attempts = 1;
                })
                .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
                .clone();
            Ok::<_, fred::error::Error>(builder)
        };
        let commands = build(Duration::from_secs(2))?.build()?;
        let reader = build(Duration::from_millis(BLOCK_MS + 2_000))?.build()?;
        let subscriber = build(Duration::from_secs(2))?.build_subscriber_client()?;
        commands.connect();
        reader.connect();
        subscriber.connect();
        // Subscriptions are renewed on every reconnect.
        subscriber.manage_subscriptions();

        let queue = Arc::new(RedisQueue {
            commands,
            reader,
            subscriber,
            settled: broadcast::channel(1024).0,
            key: format!("{}pending", config.redis_prefix),
            channel: format!("{}settled", config.redis_prefix),
            consumer: node.to_owned(),
            local: MemoryQueue::new(),
            wanted: AtomicUsize::new(0),
            demand: Notify::new(),
        });
        Ok(queue)
    }

    /// Starts the reader and the pub/sub listener, which end with `shutdown`.
    pub fn start(self: &Arc<Self>, shutdown: CancellationToken) {
        tokio::spawn(self.clone().read_loop(shutdown.clone()));
        tokio::spawn(self.clone().listen_settled(shutdown));
    }

    async fn listen_settled(self: Arc<Self>, shutdown: CancellationToken) {
        let mut messages = self.subscriber.message_rx();
        while let Err(e) = self.subscriber.subscribe(self.channel.as_str()).await {
            tracing::debug!(error = %e, "subscribing to lease ends; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = messages.recv() => message,
            };
            match message {
                Ok(message) => {
                    tracing::trace!(?message, "lease end announced");
                    let text: Option<String> = message.value.convert().ok();
                    if let Some((owner, id)) = text.as_deref().and_then(|t| t.rsplit_once(' '))
                        && let Ok(id) = Uuid::try_parse(id)
                    {
                        let _ = self.settled.send((owner.to_owned(), id));
                    }
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Resolves once the command connection is up.
    pub async fn wait_connected(&self) {
        let _ = self.commands.wait_for_connect().await;
    }

    /// Connection events: one message each time Redis (re)connects.
    pub fn reconnections(&self) -> broadcast::Receiver<fred::types::config::Server> {
        self.commands.reconnect_rx()
    }

    fn fast(&self) -> fred::clients::WithOptions<Client> {
        self.commands.with_options(&Options {
            fail_fast: true,
            ..Default::default()
        })
    }

    async fn ensure_group(&self) -> Result<(), QueueError> {
        let created: Result<(), _> = self.fast().xgroup_create(&self.key, GROUP, "0", true).await;
        match created {
            Err(e) if !e.details().contains("BUSYGROUP") => Err(e.into()),
            _ => Ok(()),
        }
    }

    /// Moves ids from the stream to the local buffer, as many as local
    /// subscribers wait for.
    async fn read_loop(self: Arc<Self>, shutdown: CancellationToken) {
        let mut reclaimed_at = tokio::time::Instant::now();
        loop {
            if reclaimed_at.elapsed() >= RECLAIM_EVERY && self.commands.is_connected() {
                reclaimed_at = tokio::time::Instant::now();
                if let Err(e) = self.reclaim().await {
                    tracing::debug!(error = %e, "reclaiming stale stream entries failed");
                }
            }
            let wanted = self
                .wanted
                .load(Ordering::Acquire)
                .saturating_sub(self.local.depth_now());
            if wanted == 0 || !self.reader.is_connected() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = self.demand.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                continue;
            }
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                read = self.read(wanted) => read,
            };
            if let Err(e) = read {
                if e.0.contains("NOGROUP") {
                    // Redis restarted empty: the group is gone with the stream.
                    if let Err(e) = self.ensure_group().await {
                        tracing::warn!(error = %e, "could not create the consumer group");
                    }
                } else {
                    tracing::warn!(error = %e, "reading the Redis queue failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    async fn read(&self, count: usize) -> Result<(), QueueError> {
        let ids = self.claim(&self.reader, count, Some(BLOCK_MS)).await?;
        self.local.push(&ids).await
    }

    /// XREADGROUPs up to `count` new entries (waiting up to `block` ms for
    /// the first) and removes them from the stream: the ids are in this
    /// node's hands now, and a crash from here on is covered by the
    /// reconciler, which re-queues pending packets.
    async fn claim<C: StreamsInterface + Sync>(
        &self,
        client: &C,
        count: usize,
        block: Option<u64>,
    ) -> Result<Vec<Uuid>, QueueError> {
        let response: Value = client
            .xreadgroup(
                GROUP,
                &self.consumer,
                Some(count as u64),
                block,
                false,
                &self.key,
                ">",
            )
            .await?;
        // A blocking read that times out answers nil.
        if response.is_null() {
            return Ok(Vec::new());
        }
        let response: XReadResponse<String, String, String, String> =
            response.into_xread_response()?;
        let entries: Vec<Entry> = response.into_values().flatten().collect();
        if entries.is_empty() {
            return Ok(Vec::new());
        }
        self.remove(&entries).await?;
        Ok(packet_ids(&entries))
    }

    /// Acknowledges and deletes entries this node has taken.
    async fn remove(&self, entries: &[Entry]) -> Result<(), QueueError> {
        let entry_ids: Vec<String> = entries.iter().map(|(id, _)| id.clone()).collect();
        let pipeline = self.commands.pipeline();
        let _: () = pipeline.xack(&self.key, GROUP, entry_ids.clone()).await?;
        let _: () = pipeline.xdel(&self.key, entry_ids).await?;
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// Takes over entries stuck with a consumer that read them and never
    /// removed them, into the local buffer.
    async fn reclaim(&self) -> Result<(), QueueError> {
        let (_, entries): (String, Vec<Entry>) = self
            .fast()
            .xautoclaim_values(
                &self.key,
                GROUP,
                &self.consumer,
                STALE_MS,
                "0-0",
                Some(256),
                false,
            )
            .await?;
        if entries.is_empty() {
            return Ok(());
        }
        tracing::info!(
            count = entries.len(),
            "took over stream entries left by a stopped node"
        );
        self.local.push(&packet_ids(&entries)).await?;
        self.remove(&entries).await
    }

    async fn xadd(&self, ids: &[Uuid]) -> Result<(), QueueError> {
        let pipeline = self.commands.pipeline();
        for id in ids {
            let _: () = pipeline
                .xadd(&self.key, false, None, "*", (FIELD, id.to_string()))
                .await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// Every id in the stream.
    async fn stream_ids(&self) -> Result<HashSet<Uuid>, QueueError> {
        let mut ids = HashSet::new();
        let mut start = "-".to_owned();
        loop {
            let page: Vec<Entry> = self
                .fast()
                .xrange(&self.key, start.as_str(), "+", Some(PAGE))
                .await?;
            let last = page.last().map(|(id, _)| id.clone());
            ids.extend(packet_ids(&page));
            match last {
                Some(last) if page.len() as u64 == PAGE => start = format!("({last}"),
                _ => return Ok(ids),
            }
        }
    }
}

/// A stream entry: its id and fields.
type Entry = (String, HashMap<String, String>);

fn packet_ids(entries: &[Entry]) -> Vec<Uuid> {
    entries
        .iter()
        .filter_map(|(_, fields)| fields.get(FIELD).and_then(|v| Uuid::try_parse(v).ok()))
        .collect()
}

struct Wanting<'a>(&'a RedisQueue, usize);

impl Drop for Wanting<'_> {
    fn drop(&mut self) {
        self.0.wanted.fetch_sub(self.1, Ordering::AcqRel);
    }
}

#[async_trait]
impl Queue for RedisQueue {
    async fn push(&self, ids: &[Uuid]) -> Result<(), QueueError> {
        if ids.is_empty() {
            return Ok(());
        }
        if self.commands.is_connected() && self.xadd(ids).await.is_ok() {
            return Ok(());
        }
        // Redis is away: keep them here; the reconciler re-adds every
        // pending packet to the stream once Redis answers.
        self.local.push(ids).await
    }

    async fn take(&self, max: usize) -> Result<Vec<Uuid>, QueueError> {
        let _wanting = Wanting(self, max);
        self.wanted.fetch_add(max, Ordering::AcqRel);
        self.demand.notify_one();
        self.local.take(max).await
    }

    async fn try_take(&self, max: usize) -> Result<Vec<Uuid>, QueueError> {
        let mut ids = self.local.try_take(max).await?;
        if ids.len() < max && self.commands.is_connected() {
            // A poll does not wait: read the stream directly, unblocking.
            let fast = self.fast();
            ids.extend(self.claim(&fast, max - ids.len(), None).await?);
        }
        Ok(ids)
    }

    async fn depth(&self) -> Result<u64, QueueError> {
        let local = self.local.depth_now() as u64;
        if !self.commands.is_connected() {
            return Ok(local);
        }
        let len: u64 = self.fast().xlen(&self.key).await?;
        Ok(len + local)
    }

    async fn queued_ids(&self) -> Result<HashSet<Uuid>, QueueError> {
        let mut ids = self.local.queued_ids().await?;
        if self.commands.is_connected() {
            ids.extend(self.stream_ids().await?);
        }
        Ok(ids)
    }

    async fn prepare(&self) -> Result<(), QueueError> {
        self.ensure_group().await
    }

    async fn publish_settled(&self, owner: &str, id: Uuid) {
        let published: Result<(), _> = self
            .fast()
            .publish(self.channel.as_str(), format!("{owner} {id}"))
            .await;
        tracing::trace!(%owner, %id, ok = published.is_ok(), "announcing a lease end");
        if let Err(e) = published {
            // The other node frees the slot at the lease's expiry instead.
            tracing::debug!(error = %e, "could not announce a lease end");
        }
    }

    fn settled_events(&self) -> Option<broadcast::Receiver<(String, Uuid)>> {
        Some(self.settled.subscribe())
    }

    fn redis_connected(&self) -> bool {
        self.commands.is_connected()
    }
}
