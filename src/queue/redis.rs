//! The Redis queue: a stream read through a consumer group, shared by every
//! bucket node.
//!
//! A committed packet is XADDed to `{prefix}pending` with its body (a batch
//! at a time by a script, `redis/adding.rs`), so the node that reads it
//! delivers without reading the database; with
//! `BUCKET_REDIS_SHARDS` > 1 to one of several such stream keys, chosen by
//! its id ([`super::shards`]), each with its own consumer group, and
//! everything below holds per shard. Each node XREADGROUPs every shard
//! (blocking, so a packet ingested on any node reaches a waiting stream on
//! any other at once) only as many entries as its streams have room for.
//! An entry stays in the reading node's pending-entries list (PEL) for as
//! long as the node holds the packet; it is XACKed and XDELed when the
//! packet is marked, dead-lettered, or handed back (a lease that ended
//! unmarked is XADDed anew, so any node may take it).
//!
//! The PEL says which node holds what: a node that stops without handing
//! its entries back (a crash) stops renewing `{prefix}node:{name}`, and the
//! other nodes claim its entries, check them against the database, and
//! deliver what is still pending. A live node's own PEL can hold entries
//! the node knows nothing of (an XREADGROUP whose answer was lost, a Redis
//! restored from an older snapshot): no other node claims them, so every
//! heartbeat the node takes back those it has not held for a while and
//! checks them against the database the same way. Nor does a node keep
//! more packets waiting than its streams have room for: a blocking read
//! sent while a stream had room can answer after the stream left, and
//! every heartbeat hands the excess back (XADDed anew, for any node).
//!
//! ExtendLease may reach any node: a lease granted elsewhere is changed by
//! asking its node on that node's channel `{prefix}leases:{name}` and
//! waiting (briefly) for the answer on the asker's.
//!
//! In a Redis Cluster every command names one key, and the channels are
//! sharded (SSUBSCRIBE/SPUBLISH), each on its own slot.
//!
//! While Redis cannot be reached a node keeps serving its own streams from
//! memory, a window of what it could not add (the rest waits in the
//! database); once Redis answers again that goes back to the stream through
//! the database (only what is still pending), and the reconciler puts back
//! whatever else the stream lacks. Nothing goes back to the stream with its
//! body unless the database just said it is pending (a lease end): another
//! node may have recorded its outcome unheard.
//!
//! An entry with a body is delivered unchecked, so a packet that has one
//! must have no other copy. An XADD whose answer never came may land later
//! (fred writes a pipeline that timed out waiting for a connection once
//! one is up, to a Redis that may have restarted meanwhile): its packet is
//! not kept in memory but left to the database, and the hand-back adds it
//! only if the stream lacks it then. By then it has landed or never will:
//! the hand-back reads the stream through the same client, whose commands
//! reach Redis in the order they were sent.
use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};

use fred::clients::SubscriberClient;
use fred::prelude::*;
use fred::types::config::Options;
use fred::types::streams::XReadResponse;
use fred::types::{Expiration, Key};
use tokio::sync::{Notify, broadcast, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::QueueSink;
use super::shards::{self, Shards};
use super::{QueueError, Queued, codec};
use crate::config::RedisConfig;
use crate::domain::PacketId;
use crate::domain::lease_token::{LeaseChange, LeaseToken};
use crate::error::Error;
use crate::store::{PendingPacket, Store};

mod adding;
mod reconciling;
pub use reconciling::StreamView;

const GROUP: &str = "dispatch";
const ID: &str = "id";
const BODY: &str = "p";
/// How long one XREADGROUP waits before the reader looks at demand again.
const BLOCK_MS: u64 = 1000;
/// Most entries one XRANGE page or one pipeline carries.
const PAGE: usize = 512;
/// A node renews its liveness key this often; the key outlives two misses.
const HEARTBEAT: Duration = Duration::from_secs(3);
const NODE_TTL_MS: i64 = 10_000;
/// XCLAIM takes only entries idle this long. A stopped node's entries are
/// idle since before its key expired (at least NODE_TTL - HEARTBEAT), and
/// one that another survivor just claimed is not idle: so two survivors
/// never both take the same entry.
const CLAIM_MIN_IDLE_MS: u64 = 5_000;
/// How long a node asked to change its leases has to answer.
const ASK_TIMEOUT: Duration = Duration::from_secs(2);
/// An entry in a node's own PEL that it does not hold is taken back once
/// idle this long: longer than a read's answer takes to be resolved into
/// the node's hands (a database lookup bounded by its pool's 2 s wait), so
/// an entry merely on its way is rarely read twice (and if it is, the
/// dispatcher knows the entry it already holds).
const OWN_MIN_IDLE_MS: u64 = 10_000;

/// What nodes say to each other about leases, on `{prefix}leases:{node}`.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LeaseMessage {
    /// Change these leases (ExtendLease); answer on `from`'s channel.
    Ask {
        id: u64,
        from: String,
        tokens: Vec<String>,
        /// The new length; None ends the leases.
        lease_ms: Option<u64>,
    },
    Answer {
        id: u64,
        results: Vec<LeaseAnswer>,
    },
}

/// `n` answers: the node holding the leases could not be asked in time.
fn unavailable(holder: &str, n: usize) -> Vec<Result<LeaseChange, Error>> {
    (0..n)
        .map(|_| {
            Err(Error::Unavailable(format!(
                "node {holder}, which holds this lease, did not answer in time; retry"
            )))
        })
        .collect()
}

/// One token's outcome, as it travels between nodes.
#[derive(Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LeaseAnswer {
    Extended(DateTime<Utc>),
    Ended,
    NotHeld(String),
    Unavailable(String),
}

impl From<Result<LeaseChange, Error>> for LeaseAnswer {
    fn from(result: Result<LeaseChange, Error>) -> Self {
        match result {
            Ok(LeaseChange::Extended(until)) => Self::Extended(until),
            Ok(LeaseChange::Ended) => Self::Ended,
            Err(Error::FailedPrecondition(why)) => Self::NotHeld(why),
            Err(e) => Self::Unavailable(e.to_string()),
        }
    }
}

impl From<LeaseAnswer> for Result<LeaseChange, Error> {
    fn from(answer: LeaseAnswer) -> Self {
        match answer {
            LeaseAnswer::Extended(until) => Ok(LeaseChange::Extended(until)),
            LeaseAnswer::Ended => Ok(LeaseChange::Ended),
            LeaseAnswer::NotHeld(why) => Err(Error::FailedPrecondition(why)),
            LeaseAnswer::Unavailable(why) => Err(Error::Unavailable(why)),
        }
    }
}

/// A packet to XADD, and the entry it replaces (removed once it is added).
struct Outgoing {
    pending: PendingPacket,
    replaces: Option<String>,
}

/// What became of one XADD.
enum Xadded {
    Added,
    /// Not added: Redis was not connected, or answered with an error.
    Refused(QueueError),
    /// Perhaps added, now or later: no answer came in time, or the
    /// connection dropped after the command went out. fred writes a
    /// pipeline that timed out while it waited for a connection once one
    /// is up (it skips only single commands that timed out), and Redis
    /// may have run a command whose answer was lost.
    Unsure(QueueError),
}

pub struct RedisQueue {
    /// Ordinary commands, failing fast while disconnected.
    commands: Client,
    /// One per shard, each with connections of its own: a blocking
    /// XREADGROUP holds its client until it answers.
    readers: Vec<Reader>,
    /// Pub/sub for outcomes recorded through another node.
    subscriber: SubscriberClient,
    /// Sharded pub/sub (SPUBLISH) in a Redis Cluster: there PUBLISH counts
    /// only the receivers on the node it reached, and "nobody listens"
    /// (see [`RedisQueue::change_leases`]) must be true. Classic elsewhere,
    /// which Redis before 7 also has.
    sharded_pubsub: bool,
    /// Reads packets whose entry carries no body (put back by the
    /// reconciler, or claimed from a stopped node).
    store: Store,
    shards: Shards,
    channel: String,
    node_key: String,
    node_prefix: String,
    /// `{prefix}leases:`; this node's lease channel is that and its name.
    leases_prefix: String,
    /// ExtendLease asks sent to other nodes, waiting for their answer.
    asks: Mutex<HashMap<u64, oneshot::Sender<Vec<LeaseAnswer>>>>,
    next_ask: AtomicU64,
    /// True once this node listens on its lease channel (answers to its
    /// asks come there).
    listening: watch::Sender<bool>,
    /// This node's name in the consumer group.
    consumer: String,
    outgoing: mpsc::UnboundedSender<Outgoing>,
    /// Packets given to `outgoing`, and of those how many the adder is
    /// done with (added, kept when Redis refused, or left to the database
    /// when it did not answer): the reconciler waits for the second to
    /// reach the first before it calls a packet missing.
    pushed: AtomicU64,
    sent: watch::Sender<u64>,
    done: mpsc::UnboundedSender<String>,
    receivers: Mutex<Option<Receivers>>,
    /// Ends the adder and remover once they drained (after the dispatcher).
    flush: CancellationToken,
    flushers: Mutex<Vec<JoinHandle<()>>>,
    /// Entries already in this node's pending-entries list whose packets
    /// the database could not be asked for: nothing else reads them again
    /// (other nodes claim only from stopped ones, and the reconciler sees
    /// them in the stream), so every heartbeat retries them.
    orphans: Mutex<HashMap<PacketId, String>>,
    /// Packets sent back to pending (Redrive, Replay) whose XADD failed:
    /// retried every heartbeat, since the reconciler's incremental pass
    /// reads only recently received packets.
    unqueued: Mutex<HashSet<PacketId>>,
    /// The Redis server (its run_id) the stream was last checked against:
    /// a restarted one (empty, or from an old snapshot, or a promoted
    /// replica) may hold as many entries as packets are pending and still
    /// lack some.
    checked_run: Mutex<Option<String>>,
    /// Entries whose packets are being added anew (a lease ended
    /// unmarked): in no one's hands until the XADD is done, and removed
    /// after it.
    moving: Mutex<HashSet<String>>,
    /// Per shard, where the next look at this node's own PEL starts: a
    /// page a heartbeat, so a long list costs one command per heartbeat.
    own_cursor: Mutex<Vec<String>>,
    /// Set once Redis refused the adding script (`redis/adding.rs`): from
    /// then on each packet is XADDed by itself.
    scripts_refused: AtomicBool,
}

struct Reader {
    client: Client,
    /// Local streams have room: read more.
    demand: Notify,
}

struct Receivers {
    outgoing: mpsc::UnboundedReceiver<Outgoing>,
    done: mpsc::UnboundedReceiver<String>,
}

/// Where Redis is, from `REDIS_URL`, else from the seed's `REDIS_HOST` &
/// co. (None: no Redis, the in-memory queue); a Redis Cluster from a
/// `redis-cluster://` URL or `BUCKET_REDIS_CLUSTER`. Built field by field,
/// never by pasting a URL together: a password may hold `@`, `:` or `/`.
#[derive(Clone)]
pub struct RedisTarget {
    config: Config,
    /// For logs: no password.
    pub display: String,
}

impl RedisTarget {
    pub fn from_config(config: &RedisConfig) -> Result<Option<RedisTarget>, QueueError> {
        let mut target = if let Some(url) = &config.redis_url {
            RedisTarget {
                config: Config::from_url(url)?,
                display: crate::config::redact_url(url),
            }
        } else if let Some(host) = &config.redis_host {
            RedisTarget {
                config: Config {
                    server: ServerConfig::new_centralized(host.clone(), config.redis_port),
                    ..Default::default()
                },
                display: format!("redis://{host}:{}", config.redis_port),
            }
        } else {
            return Ok(None);
        };
        if config.redis_cluster
            && let ServerConfig::Centralized { server } = &target.config.server
        {
            // The one address is a seed: the cluster names its other nodes.
            target.config.server = ServerConfig::Clustered {
                hosts: vec![server.clone()],
                policy: Default::default(),
            };
            target.display = format!("{} (cluster)", target.display);
        }
        // Seed-style credentials apply on top of a URL that lacks them.
        if target.config.username.is_none() {
            target.config.username = config.redis_username.clone();
        }
        if target.config.password.is_none() {
            target.config.password = config.redis_password.clone();
        }
        Ok(Some(target))
    }
}

/// The code of a Redis error reply (its first word: `BUSYGROUP`,
/// `NOGROUP`, …), which names the error the way a kind would; fred files
/// the ones it does not know under one kind.
fn error_code(e: &fred::error::Error) -> Option<&str> {
    e.details()
        .split_whitespace()
        .next()
        .filter(|w| w.chars().all(|c| c.is_ascii_uppercase()))
}

/// A stream entry: its id, tagged with its shard ([`shards::tag`]), and
/// its fields.
type Entry = (String, HashMap<String, String>);

impl RedisQueue {
    /// Builds the clients and starts connecting, without waiting: a Redis
    /// that is down at start is retried forever (exponential backoff).
    pub fn connect(
        target: &RedisTarget,
        config: &RedisConfig,
        node: &str,
        store: Store,
    ) -> Result<Arc<RedisQueue>, QueueError> {
        let mut redis_config = target.config.clone();
        redis_config.fail_fast = false;
        let build = |command_timeout: Duration| {
            Builder::from_config(redis_config.clone())
                .with_performance_config(|p| p.default_command_timeout = command_timeout)
                .with_connection_config(|c| {
                    c.connection_timeout = Duration::from_secs(2);
                    c.internal_command_timeout = Duration::from_secs(2);
                    c.max_command_attempts = 1;
                })
                .set_policy(ReconnectPolicy::new_exponential(0, 100, 2_000, 2))
                .clone()
        };
        let shards = Shards::new(&config.redis_prefix, config.redis_shards)?;
        let commands = build(Duration::from_secs(2)).build()?;
        let readers = (0..shards.count())
            .map(|_| {
                Ok(Reader {
                    client: build(Duration::from_millis(BLOCK_MS + 2_000)).build()?,
                    demand: Notify::new(),
                })
            })
            .collect::<Result<Vec<_>, QueueError>>()?;
        let subscriber = build(Duration::from_secs(2)).build_subscriber_client()?;
        commands.connect();
        for reader in &readers {
            reader.client.connect();
        }
        subscriber.connect();
        // Subscriptions are renewed on every reconnect.
        subscriber.manage_subscriptions();

        let (outgoing, outgoing_rx) = mpsc::unbounded_channel();
        let (done, done_rx) = mpsc::unbounded_channel();
        let prefix = &config.redis_prefix;
        Ok(Arc::new(RedisQueue {
            sharded_pubsub: redis_config.server.is_clustered(),
            commands,
            readers,
            subscriber,
            store,
            channel: format!("{prefix}settled"),
            node_key: format!("{prefix}node:{node}"),
            node_prefix: format!("{prefix}node:"),
            leases_prefix: format!("{prefix}leases:"),
            asks: Mutex::new(HashMap::new()),
            next_ask: AtomicU64::new(0),
            listening: watch::Sender::new(false),
            consumer: node.to_owned(),
            outgoing,
            pushed: AtomicU64::new(0),
            sent: watch::Sender::new(0),
            done,
            receivers: Mutex::new(Some(Receivers {
                outgoing: outgoing_rx,
                done: done_rx,
            })),
            flush: CancellationToken::new(),
            flushers: Mutex::new(Vec::new()),
            orphans: Mutex::new(HashMap::new()),
            unqueued: Mutex::new(HashSet::new()),
            checked_run: Mutex::new(None),
            moving: Mutex::new(HashSet::new()),
            own_cursor: Mutex::new(vec!["-".to_owned(); shards.count()]),
            scripts_refused: AtomicBool::new(false),
            shards,
        }))
    }

    /// Starts the tasks that move packets between the stream and `sink`.
    /// Readers end with `shutdown`; writers with [`RedisQueue::close`].
    pub fn start(self: &Arc<Self>, sink: Arc<dyn QueueSink>, shutdown: CancellationToken) {
        let receivers = self
            .receivers
            .lock()
            .expect("receivers lock")
            .take()
            .expect("started once");
        let adder = tokio::spawn(self.clone().add_loop(receivers.outgoing, sink.clone()));
        let remover = tokio::spawn(self.clone().remove_loop(receivers.done));
        self.flushers
            .lock()
            .expect("flushers lock")
            .extend([adder, remover]);
        for shard in 0..self.shards.count() {
            tokio::spawn(
                self.clone()
                    .read_loop(shard, sink.clone(), shutdown.clone()),
            );
        }
        tokio::spawn(self.clone().listen_settled(sink.clone(), shutdown.clone()));
        tokio::spawn(self.clone().watch_nodes(sink, shutdown));
    }

    /// Resolves once the command connection is up.
    pub async fn wait_connected(&self) {
        let _ = self.commands.wait_for_connect().await;
    }

    /// Connection events: one message each time Redis (re)connects.
    pub fn reconnections(&self) -> broadcast::Receiver<fred::types::config::Server> {
        self.commands.reconnect_rx()
    }

    pub fn connected(&self) -> bool {
        self.commands.is_connected()
    }

    fn fast(&self) -> fred::clients::WithOptions<Client> {
        self.commands.with_options(&Options {
            fail_fast: true,
            ..Default::default()
        })
    }

    /// Creates the consumer group on every shard that lacks it.
    pub async fn ensure_group(&self) -> Result<(), QueueError> {
        for shard in 0..self.shards.count() {
            let created: Result<(), _> = self
                .fast()
                .xgroup_create(self.shards.key(shard), GROUP, "0", true)
                .await;
            match created {
                Err(e) if error_code(&e) != Some("BUSYGROUP") => return Err(e.into()),
                _ => {}
            }
        }
        Ok(())
    }

    /// Newly committed packets, for any node to take.
    pub fn push(&self, packets: Vec<PendingPacket>) {
        self.pushed
            .fetch_add(packets.len() as u64, Ordering::Release);
        for pending in packets {
            let _ = self.outgoing.send(Outgoing {
                pending,
                replaces: None,
            });
        }
    }

    /// Packets whose lease ended unmarked: added anew for any node, and
    /// their old entries removed.
    pub fn requeue(&self, packets: Vec<Queued>) {
        self.pushed
            .fetch_add(packets.len() as u64, Ordering::Release);
        let mut moving = self.moving.lock().expect("moving lock");
        for queued in packets {
            moving.extend(queued.entry.clone());
            let _ = self.outgoing.send(Outgoing {
                pending: queued.pending,
                replaces: queued.entry,
            });
        }
    }

    /// Entries of packets this node is done with.
    pub fn remove_entries(&self, entries: Vec<String>) {
        for entry in entries {
            let _ = self.done.send(entry);
        }
    }

    /// Local streams have room: read more.
    pub fn demand(&self) {
        for reader in &self.readers {
            reader.demand.notify_one();
        }
    }

    /// PUBLISH, or SPUBLISH in a Redis Cluster; how many received it.
    async fn announce(&self, channel: &str, text: String) -> Result<i64, fred::error::Error> {
        if self.sharded_pubsub {
            self.fast().spublish(channel, text).await
        } else {
            self.fast().publish(channel, text).await
        }
    }

    /// Tells the other nodes these packets' outcomes are recorded.
    pub async fn publish_settled(&self, ids: &[PacketId]) {
        let text = ids
            .iter()
            .map(PacketId::to_string)
            .collect::<Vec<_>>()
            .join(" ");
        if let Err(e) = self.announce(&self.channel, text).await {
            // The holder finds the outcome in the database when the lease ends.
            tracing::debug!(error = %e, "could not announce outcomes");
        }
    }

    /// Entries read without waiting (the JSON gateway's poll).
    pub async fn read_now(&self, count: usize) -> Result<Vec<Queued>, QueueError> {
        if !self.connected() {
            return Ok(Vec::new());
        }
        let mut entries = Vec::new();
        for shard in 0..self.shards.count() {
            let left = count.saturating_sub(entries.len());
            if left == 0 {
                break;
            }
            entries.extend(self.read_group(&self.fast(), shard, left, None).await?);
        }
        Ok(self.resolve(entries, false).await)
    }

    /// Hands back the entries of `waiting` (read from the stream, not
    /// handed out), flushes every pending write, and gives up this node's
    /// liveness key. They go back as ids, so the node that reads one asks
    /// the database first: an outcome recorded through another node may
    /// not have reached this one. If Redis refuses, they stay in this
    /// node's pending-entries list, and the others claim them once its key
    /// is gone (asking the database too). Packets without an entry are not
    /// added: the dispatcher gave them back through the database before
    /// (or could not, Redis away, and a reconciler adds them later).
    pub async fn close(&self, waiting: Vec<Queued>) {
        let (ids, entries): (Vec<PacketId>, Vec<String>) = waiting
            .into_iter()
            .filter_map(|q| Some((q.id(), q.entry?)))
            .unzip();
        match self.add_ids(&ids).await {
            Ok(()) => self.remove_entries(entries),
            Err(e) => {
                tracing::debug!(error = %e, count = ids.len(), "entries left for other nodes to claim")
            }
        }
        self.flush.cancel();
        let flushers: Vec<JoinHandle<()>> =
            std::mem::take(&mut *self.flushers.lock().expect("flushers lock"));
        for task in flushers {
            let _ = task.await;
        }
        let _: Result<(), _> = self.fast().del(self.node_key.as_str()).await;
    }

    /// XADDs what waits, a pipeline at a time. While Redis is away the
    /// packets stay with this node, as many as its buffer takes (they go
    /// back to the stream once Redis answers). Those it may have added (no
    /// answer came) stay in the database only: see [`Xadded::Unsure`].
    async fn add_loop(
        self: Arc<Self>,
        mut rx: mpsc::UnboundedReceiver<Outgoing>,
        sink: Arc<dyn QueueSink>,
    ) {
        let mut batch = Vec::with_capacity(PAGE);
        while self.next_batch(&mut rx, &mut batch).await {
            let count = batch.len() as u64;
            let outcomes = self.xadd(&batch).await;
            let moved: Vec<String> = batch.iter().filter_map(|o| o.replaces.clone()).collect();
            let (mut replaced, mut kept, mut unsure) = (Vec::new(), Vec::new(), Vec::new());
            let (mut refusal, mut silence) = (None, None);
            for (item, outcome) in batch.drain(..).zip(outcomes) {
                match outcome {
                    Xadded::Added => replaced.extend(item.replaces),
                    Xadded::Refused(e) => {
                        refusal = Some(e);
                        kept.push(Queued {
                            pending: item.pending,
                            entry: item.replaces,
                        });
                    }
                    Xadded::Unsure(e) => {
                        silence = Some(e);
                        unsure.push(item);
                    }
                }
            }
            // A lease's end whose new entry may land: its old entry goes
            // now, before the packet is left to the database. Else the
            // hand-back would find the old entry and add nothing, and this
            // node would take it back from its own list (the database
            // says pending) and deliver it beside the new one.
            let old: Vec<String> = unsure.iter().filter_map(|o| o.replaces.clone()).collect();
            if !old.is_empty()
                && let Err(e) = self.remove(&old).await
            {
                tracing::debug!(error = %e, count = old.len(), "could not remove entries replaced by an unanswered XADD; the remover tries again");
                self.remove_entries(old);
            }
            {
                // Removed by now (or below), or back in this node's hands.
                let mut moving = self.moving.lock().expect("moving lock");
                for entry in &moved {
                    moving.remove(entry);
                }
            }
            self.remove_entries(replaced);
            if let Some(e) = refusal {
                tracing::warn!(error = %e, count = kept.len(), "Redis away: packets stay with this node");
                sink.keep(kept);
            }
            if let Some(e) = silence {
                tracing::warn!(error = %e, count = unsure.len(), "Redis did not answer XADD: packets left to the database until it does");
                sink.leave(unsure.into_iter().map(|o| o.pending).collect());
            }
            self.sent.send_modify(|n| *n += count);
        }
    }

    /// Waits for what `rx` brings, a page at most, into `batch`; once the
    /// flush began, takes what is left without waiting. False when there
    /// is nothing more to do.
    async fn next_batch<T>(&self, rx: &mut mpsc::UnboundedReceiver<T>, batch: &mut Vec<T>) -> bool {
        tokio::select! {
            biased;
            n = rx.recv_many(batch, PAGE) => n > 0,
            _ = self.flush.cancelled() => {
                while let Ok(item) = rx.try_recv() {
                    batch.push(item);
                }
                !batch.is_empty()
            }
        }
    }

    /// XACKs and XDELs entries this node is done with.
    async fn remove_loop(self: Arc<Self>, mut rx: mpsc::UnboundedReceiver<String>) {
        let mut batch = Vec::with_capacity(PAGE);
        while self.next_batch(&mut rx, &mut batch).await {
            if let Err(e) = self.remove(&batch).await {
                // Left in this node's PEL: harmless (a claimer checks the
                // database first), and gone if Redis restarted empty.
                tracing::debug!(error = %e, count = batch.len(), "could not remove stream entries");
            }
            batch.clear();
        }
    }

    async fn remove(&self, entries: &[String]) -> Result<(), QueueError> {
        let mut by_shard: HashMap<usize, Vec<&str>> = HashMap::new();
        for (shard, entry) in entries.iter().filter_map(|e| shards::untag(e)) {
            by_shard.entry(shard).or_default().push(entry);
        }
        let pipeline = self.commands.pipeline();
        for (shard, entries) in by_shard {
            let key = self.shards.key(shard);
            let _: () = pipeline.xack(key, GROUP, entries.clone()).await?;
            let _: () = pipeline.xdel(key, entries).await?;
        }
        let _: Vec<Value> = pipeline.all().await?;
        Ok(())
    }

    /// Moves entries from one shard to this node, as many as local streams
    /// have room for. Each shard's reader takes its share of that room, so
    /// together they overshoot it by less than one entry per shard.
    async fn read_loop(
        self: Arc<Self>,
        shard: usize,
        sink: Arc<dyn QueueSink>,
        shutdown: CancellationToken,
    ) {
        let reader = &self.readers[shard];
        loop {
            let wanted = sink.wanted().div_ceil(self.shards.count());
            if wanted == 0 || !reader.client.is_connected() {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = reader.demand.notified() => {}
                    _ = tokio::time::sleep(Duration::from_millis(250)) => {}
                }
                continue;
            }
            let read = tokio::select! {
                _ = shutdown.cancelled() => return,
                read = self.read_group(&reader.client, shard, wanted, Some(BLOCK_MS)) => read,
            };
            let read = match read {
                Ok(entries) => Ok(self.resolve(entries, false).await),
                Err(e) => Err(e),
            };
            match read {
                Ok(queued) => sink.feed(queued),
                Err(QueueError::Redis(e)) if error_code(&e) == Some("NOGROUP") => {
                    // Redis restarted empty: the group is gone with the stream.
                    if let Err(e) = self.ensure_group().await {
                        tracing::warn!(error = %e, "could not create the consumer group");
                    }
                }
                Err(e) => {
                    tracing::warn!(error = %e, "reading the Redis queue failed");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        }
    }

    /// XREADGROUPs up to `count` new entries of `shard`, waiting up to
    /// `block` ms. One key per call: shards are on different slots.
    async fn read_group<C: StreamsInterface + Sync>(
        &self,
        client: &C,
        shard: usize,
        count: usize,
        block: Option<u64>,
    ) -> Result<Vec<Entry>, QueueError> {
        let response: Value = client
            .xreadgroup(
                GROUP,
                &self.consumer,
                Some(count as u64),
                block,
                false,
                self.shards.key(shard),
                ">",
            )
            .await?;
        // A blocking read that times out answers nil.
        if response.is_null() {
            return Ok(Vec::new());
        }
        let response: XReadResponse<String, String, String, String> =
            response.into_xread_response()?;
        Ok(response
            .into_values()
            .flatten()
            .map(|(entry, fields)| (shards::tag(shard, &entry), fields))
            .collect())
    }

    /// The packets of `entries`: from their bodies, or from the database
    /// for entries without one or when `verify` (claimed from a stopped
    /// node, which may have recorded outcomes it never removed). Entries of
    /// packets no longer pending are removed. Entries the database could
    /// not be asked about stay this node's orphans, retried every
    /// heartbeat: they are in its pending-entries list already.
    async fn resolve(&self, entries: Vec<Entry>, verify: bool) -> Vec<Queued> {
        let mut out = Vec::with_capacity(entries.len());
        let mut lookup: HashMap<PacketId, String> = HashMap::new();
        let mut stale = Vec::new();
        for (entry, fields) in entries {
            let Some(id) = fields.get(ID).and_then(|v| PacketId::parse(v).ok()) else {
                stale.push(entry);
                continue;
            };
            match fields.get(BODY).and_then(|b| codec::decode(b.as_bytes())) {
                Some(pending) if !verify => out.push(Queued {
                    pending,
                    entry: Some(entry),
                }),
                _ => {
                    if let Some(duplicate) = lookup.insert(id, entry) {
                        stale.push(duplicate);
                    }
                }
            }
        }
        self.remove_entries(stale);
        out.extend(self.look_up(lookup).await);
        out
    }

    /// The pending packets among `lookup` (packet → its entry); the
    /// entries of the others removed. If the database does not answer,
    /// all of them become orphans.
    async fn look_up(&self, mut lookup: HashMap<PacketId, String>) -> Vec<Queued> {
        if lookup.is_empty() {
            return Vec::new();
        }
        let ids: Vec<PacketId> = lookup.keys().copied().collect();
        match self.store.pending_among(&ids).await {
            Ok(found) => {
                let out = found
                    .into_iter()
                    .map(|pending| {
                        let entry = lookup.remove(&pending.packet.packet_id);
                        Queued { pending, entry }
                    })
                    .collect();
                self.remove_entries(lookup.into_values().collect());
                out
            }
            Err(e) => {
                tracing::warn!(error = %e, count = lookup.len(), "could not read queued packets from the database; retrying");
                self.orphans.lock().expect("orphans lock").extend(lookup);
                Vec::new()
            }
        }
    }

    /// Tries again what an earlier heartbeat could not do: orphans, and
    /// packets sent back to pending that are not in the stream yet.
    async fn retry_stranded(&self, sink: &Arc<dyn QueueSink>) {
        let orphans = std::mem::take(&mut *self.orphans.lock().expect("orphans lock"));
        if !orphans.is_empty() {
            sink.feed(self.look_up(orphans).await);
        }
        let unqueued: Vec<PacketId> = self
            .unqueued
            .lock()
            .expect("unqueued lock")
            .drain()
            .collect();
        if !unqueued.is_empty()
            && let Err(e) = self.requeued(&unqueued).await
        {
            tracing::debug!(error = %e, "queueing packets sent back to pending failed again");
        }
    }

    /// Packets an operator sent back to pending, for any node to take; if
    /// Redis refuses, retried every heartbeat until it takes them.
    pub async fn requeued(&self, ids: &[PacketId]) -> Result<(), QueueError> {
        let added = self.add_ids(ids).await;
        if added.is_err() {
            self.unqueued
                .lock()
                .expect("unqueued lock")
                .extend(ids.iter().copied());
        }
        added
    }

    /// SSUBSCRIBE in a Redis Cluster takes one channel at a time: the two
    /// are on different slots.
    async fn subscribe(&self, leases: &str) -> Result<(), fred::error::Error> {
        if self.sharded_pubsub {
            self.subscriber.ssubscribe(self.channel.as_str()).await?;
            self.subscriber.ssubscribe(leases).await
        } else {
            self.subscriber
                .subscribe(vec![self.channel.as_str(), leases])
                .await
        }
    }

    async fn listen_settled(
        self: Arc<Self>,
        sink: Arc<dyn QueueSink>,
        shutdown: CancellationToken,
    ) {
        let mut messages = self.subscriber.message_rx();
        let leases = format!("{}{}", self.leases_prefix, self.consumer);
        while let Err(e) = self.subscribe(&leases).await {
            tracing::debug!(error = %e, "subscribing to outcomes; retrying");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
        self.listening.send_replace(true);
        loop {
            let message = tokio::select! {
                _ = shutdown.cancelled() => return,
                message = messages.recv() => message,
            };
            match message {
                Ok(message) if &*message.channel == leases.as_str() => {
                    let text: Option<String> = message.value.convert().ok();
                    match text.and_then(|t| serde_json::from_str(&t).ok()) {
                        Some(m) => self.on_lease_message(m, &sink),
                        None => tracing::debug!("unreadable lease message"),
                    }
                }
                Ok(message) => {
                    let text: Option<String> = message.value.convert().ok();
                    let ids: Vec<PacketId> = text
                        .iter()
                        .flat_map(|t| t.split(' '))
                        .filter_map(|id| PacketId::parse(id).ok())
                        .collect();
                    sink.settle_remote(&ids);
                }
                Err(broadcast::error::RecvError::Lagged(_)) => {}
                Err(broadcast::error::RecvError::Closed) => return,
            }
        }
    }

    /// Keeps this node's liveness key, and claims the entries of nodes that
    /// lost theirs.
    async fn watch_nodes(self: Arc<Self>, sink: Arc<dyn QueueSink>, shutdown: CancellationToken) {
        loop {
            if self.connected() {
                let alive: Result<(), _> = self
                    .fast()
                    .set(
                        self.node_key.as_str(),
                        1,
                        Some(Expiration::PX(NODE_TTL_MS)),
                        None,
                        false,
                    )
                    .await;
                if let Err(e) = alive {
                    tracing::debug!(error = %e, "could not renew the liveness key");
                }
                self.retry_stranded(&sink).await;
                let surplus = sink.surplus();
                if !surplus.is_empty() {
                    tracing::info!(
                        count = surplus.len(),
                        "handed back to the stream packets no local stream has room for"
                    );
                    self.requeue(surplus);
                }
                let taken = self.take_back_own(&sink).await;
                if !taken.is_empty() {
                    tracing::info!(
                        count = taken.len(),
                        "took back pending packets this node's own stream list held unknown to it"
                    );
                    sink.feed(taken);
                }
                let claimed = self.claim_from_stopped_nodes().await;
                if !claimed.is_empty() {
                    tracing::info!(
                        count = claimed.len(),
                        "took over packets held by a stopped node"
                    );
                    sink.feed(claimed);
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(HEARTBEAT) => {}
            }
        }
    }

    /// The entries of nodes that lost their liveness key, claimed, with
    /// the packets still pending. Shard by shard: one that fails (its
    /// cluster node away) does not keep the others' entries from being
    /// claimed.
    pub async fn claim_from_stopped_nodes(&self) -> Vec<Queued> {
        let mut claimed = Vec::new();
        for shard in 0..self.shards.count() {
            match self.claim_in(shard).await {
                Ok(entries) => claimed.extend(entries),
                Err(e) => tracing::debug!(error = %e, shard, "looking for stopped nodes failed"),
            }
        }
        claimed
    }

    /// Entries in this node's own PEL that it does not hold, idle at least
    /// [`OWN_MIN_IDLE_MS`], checked against the database: what is still
    /// pending, to hand out; the rest removed.
    async fn take_back_own(&self, sink: &Arc<dyn QueueSink>) -> Vec<Queued> {
        // Before the lists are read: an entry that comes into this node's
        // hands afterwards was read (or claimed) since, and is not idle.
        let held = sink.held_entries();
        let mut taken = Vec::new();
        for shard in 0..self.shards.count() {
            match self.take_back_in(shard, &held).await {
                Ok(entries) => taken.extend(entries),
                Err(e) => {
                    tracing::debug!(error = %e, shard, "looking at this node's own stream list failed");
                }
            }
        }
        taken
    }

    async fn take_back_in(
        &self,
        shard: usize,
        held: &HashSet<String>,
    ) -> Result<Vec<Queued>, QueueError> {
        let key = self.shards.key(shard);
        let start = self.own_cursor.lock().expect("cursor lock")[shard].clone();
        let page: Vec<(String, String, u64, u64)> = self
            .fast()
            .xpending(
                key,
                GROUP,
                (start.as_str(), "+", PAGE as u64, self.consumer.as_str()),
            )
            .await?;
        let next = match page.last() {
            Some((last, ..)) if page.len() == PAGE => format!("({last}"),
            _ => "-".to_owned(),
        };
        self.own_cursor.lock().expect("cursor lock")[shard] = next;
        let lost: Vec<String> = {
            let moving = self.moving.lock().expect("moving lock");
            let orphans = self.orphans.lock().expect("orphans lock");
            let orphaned: HashSet<&String> = orphans.values().collect();
            page.into_iter()
                .filter(|(entry, _, idle, _)| {
                    let tagged = shards::tag(shard, entry);
                    *idle >= OWN_MIN_IDLE_MS
                        && !held.contains(&tagged)
                        && !moving.contains(&tagged)
                        && !orphaned.contains(&tagged)
                })
                .map(|(entry, ..)| entry)
                .collect()
        };
        if lost.is_empty() {
            return Ok(Vec::new());
        }
        // Claimed by this node from itself: only if still idle, so an
        // entry read again meanwhile (by a read whose answer came) is left.
        self.claim(shard, lost, OWN_MIN_IDLE_MS).await
    }

    /// XCLAIMs `ids` of `shard` for this node, those idle at least
    /// `min_idle_ms`, and checks them against the database: what is still
    /// pending, to hand out.
    async fn claim(
        &self,
        shard: usize,
        ids: Vec<String>,
        min_idle_ms: u64,
    ) -> Result<Vec<Queued>, QueueError> {
        let entries: Vec<Entry> = self
            .fast()
            .xclaim_values(
                self.shards.key(shard),
                GROUP,
                &self.consumer,
                min_idle_ms,
                ids,
                None,
                None,
                None,
                false,
                false,
            )
            .await?;
        let entries = entries
            .into_iter()
            .map(|(entry, fields)| (shards::tag(shard, &entry), fields))
            .collect();
        Ok(self.resolve(entries, true).await)
    }

    /// The entries of `shard` held by stopped nodes, claimed.
    async fn claim_in(&self, shard: usize) -> Result<Vec<Queued>, QueueError> {
        let key = self.shards.key(shard);
        // XPENDING's summary: [count, min, max, [[consumer, count], ...]].
        let summary: Value = self.fast().xpending(key, GROUP, ()).await?;
        let holders: Vec<String> = match summary {
            Value::Array(parts) if parts.len() == 4 => match &parts[3] {
                Value::Array(rows) => rows
                    .iter()
                    .filter_map(|row| match row {
                        Value::Array(pair) => pair.first()?.as_string(),
                        _ => None,
                    })
                    .collect(),
                _ => Vec::new(),
            },
            _ => Vec::new(),
        };
        let mut claimed = Vec::new();
        for holder in holders.into_iter().filter(|h| *h != self.consumer) {
            let alive: bool = self
                .fast()
                .exists(Key::from(format!("{}{holder}", self.node_prefix)))
                .await?;
            if alive {
                continue;
            }
            let pending: Vec<(String, String, u64, u64)> = self
                .fast()
                .xpending(key, GROUP, ("-", "+", PAGE as u64, holder.as_str()))
                .await?;
            let ids: Vec<String> = pending.into_iter().map(|(id, ..)| id).collect();
            if ids.is_empty() {
                let _: Result<i64, _> = self
                    .fast()
                    .xgroup_delconsumer(key, GROUP, holder.as_str())
                    .await;
                continue;
            }
            claimed.extend(self.claim(shard, ids, CLAIM_MIN_IDLE_MS).await?);
        }
        Ok(claimed)
    }

    /// ExtendLease for leases `holder` (another node) granted: asks it, and
    /// waits for its answer at most [`ASK_TIMEOUT`].
    pub async fn change_leases(
        &self,
        holder: &str,
        tokens: &[LeaseToken],
        lease: Option<Duration>,
    ) -> Vec<Result<LeaseChange, Error>> {
        let id = self.next_ask.fetch_add(1, Ordering::Relaxed);
        let ask = LeaseMessage::Ask {
            id,
            from: self.consumer.clone(),
            tokens: tokens.iter().map(LeaseToken::to_string).collect(),
            lease_ms: lease.map(|l| l.as_millis() as u64),
        };
        let started = tokio::time::Instant::now();
        let mut listening = self.listening.subscribe();
        let ready = tokio::time::timeout(ASK_TIMEOUT, listening.wait_for(|l| *l))
            .await
            .is_ok_and(|r| r.is_ok());
        if !ready {
            return unavailable(holder, tokens.len());
        }
        let (tx, rx) = oneshot::channel();
        self.asks.lock().expect("asks lock").insert(id, tx);
        let text = serde_json::to_string(&ask).expect("a lease message encodes");
        let channel = format!("{}{holder}", self.leases_prefix);
        let answer = match self.announce(&channel, text).await {
            // Nobody listens: that node stopped, and its leases with it.
            Ok(0) => Ok(None),
            Ok(_) => tokio::time::timeout(ASK_TIMEOUT.saturating_sub(started.elapsed()), rx)
                .await
                .map(|r| r.ok())
                .map_err(|_| ()),
            Err(_) => Err(()),
        };
        self.asks.lock().expect("asks lock").remove(&id);
        match answer {
            Ok(Some(results)) if results.len() == tokens.len() => {
                results.into_iter().map(Into::into).collect()
            }
            Ok(None) => tokens
                .iter()
                .map(|t| {
                    Err(Error::FailedPrecondition(format!(
                        "the lease on packet {} is not held: the node that granted it stopped",
                        t.packet_id
                    )))
                })
                .collect(),
            _ => unavailable(holder, tokens.len()),
        }
    }

    /// A lease message on this node's channel: an ask from another node
    /// (answered on its channel), or the answer to one of ours.
    fn on_lease_message(self: &Arc<Self>, message: LeaseMessage, sink: &Arc<dyn QueueSink>) {
        match message {
            LeaseMessage::Answer { id, results } => {
                if let Some(tx) = self.asks.lock().expect("asks lock").remove(&id) {
                    let _ = tx.send(results);
                }
            }
            LeaseMessage::Ask {
                id,
                from,
                tokens,
                lease_ms,
            } => {
                let parsed: Vec<LeaseToken> =
                    tokens.iter().filter_map(|t| LeaseToken::parse(t)).collect();
                if parsed.len() != tokens.len() {
                    return;
                }
                let results = sink
                    .change_leases(&parsed, lease_ms.map(Duration::from_millis))
                    .into_iter()
                    .map(LeaseAnswer::from)
                    .collect();
                let answer = LeaseMessage::Answer { id, results };
                let text = serde_json::to_string(&answer).expect("a lease message encodes");
                let channel = format!("{}{from}", self.leases_prefix);
                let me = self.clone();
                tokio::spawn(async move {
                    if let Err(e) = me.announce(&channel, text).await {
                        tracing::debug!(error = %e, "could not answer a lease ask");
                    }
                });
            }
        }
    }
}

#[cfg(test)]
mod error_code_tests {
    use super::*;
    use fred::error::{Error, ErrorKind};

    #[test]
    fn redis_error_codes_are_read_from_the_reply() {
        let busy = Error::new(
            ErrorKind::Unknown,
            "BUSYGROUP Consumer Group name already exists",
        );
        assert_eq!(error_code(&busy), Some("BUSYGROUP"));
        let gone = Error::new(
            ErrorKind::Unknown,
            "NOGROUP No such key 'bucket:pending' or consumer group 'dispatch'",
        );
        assert_eq!(error_code(&gone), Some("NOGROUP"));
        // Not an error reply: a message that merely mentions a code.
        let io = Error::new(ErrorKind::IO, "connection reset while reading NOGROUP");
        assert_eq!(error_code(&io), None);
    }
}

#[cfg(test)]
mod target_tests {
    use super::*;

    fn settings() -> RedisConfig {
        crate::config::Config::defaults().redis
    }

    #[test]
    fn a_seed_becomes_a_cluster_with_its_password_as_typed() {
        let mut config = settings();
        config.redis_host = Some("10.0.0.7".into());
        config.redis_port = 7000;
        config.redis_password = Some("p@ss:w/rd?#%".into());
        config.redis_cluster = true;
        let target = RedisTarget::from_config(&config).unwrap().unwrap();
        assert_eq!(
            target.config.server,
            ServerConfig::new_clustered(vec![("10.0.0.7", 7000)])
        );
        assert_eq!(target.config.password.as_deref(), Some("p@ss:w/rd?#%"));
        assert!(!target.display.contains("p@ss"));
    }

    #[test]
    fn a_cluster_url_names_its_nodes() {
        let mut config = settings();
        config.redis_url = Some("redis-cluster://:secret@a:7000?node=b:7001".into());
        let target = RedisTarget::from_config(&config).unwrap().unwrap();
        assert!(target.config.server.is_clustered());
        let mut hosts: Vec<String> = target
            .config
            .server
            .hosts()
            .iter()
            .map(|h| format!("{}:{}", h.host, h.port))
            .collect();
        hosts.sort();
        assert_eq!(hosts, ["a:7000", "b:7001"]);
        assert_eq!(target.config.password.as_deref(), Some("secret"));
        // Without the flag, a plain URL stays one server.
        config.redis_url = Some("redis://a:7000".into());
        let target = RedisTarget::from_config(&config).unwrap().unwrap();
        assert!(!target.config.server.is_clustered());
    }
}
