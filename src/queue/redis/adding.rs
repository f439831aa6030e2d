//! How a batch of committed packets goes into the stream: one EVAL per
//! shard, a script that XADDs each entry and answers, per entry, the error
//! Redis gave that XADD or none. A batch costs one command per shard
//! instead of one per packet, which is most of what fred spent per packet
//! (BENCHMARKS.md, twelfth session).
//!
//! Invariants:
//! - Each entry's outcome is its own, as with one XADD each: the script
//!   calls XADD with `redis.pcall`, so a refused XADD (an ACL without
//!   XADD, no memory) refuses that entry alone and the others are added.
//! - An error answered for the whole EVAL means the script did not run
//!   (Redis refuses a script before it starts: ACL, BUSY, LOADING, a
//!   cluster moving), except a Lua error, which may come after some
//!   XADDs: those entries are unsure, as when no answer came.
//! - Where scripts are not allowed (an ACL without EVAL, a server or proxy
//!   without Lua), nothing ran: the entries go as one XADD each, in a
//!   pipeline, and so does every later batch of this node.
use std::sync::atomic::Ordering;

use fred::interfaces::LuaInterface;
use fred::prelude::*;

use super::{BODY, ID, Outgoing, RedisQueue, Xadded, codec, error_code};
use crate::queue::QueueError;

/// XADDs its ARGV pairs (packet id, body) to KEYS[1]; answers one string
/// per pair: empty when added, else the XADD's error.
const XADD_ALL: &str = "local out = {} \
    for i = 1, #ARGV, 2 do \
    local r = redis.pcall('XADD', KEYS[1], '*', 'id', ARGV[i], 'p', ARGV[i + 1]) \
    if type(r) == 'table' and r.err then out[#out + 1] = r.err else out[#out + 1] = '' end \
    end \
    return out";

/// What an error answered for a whole EVAL says of its entries.
#[derive(Debug, PartialEq, Eq)]
enum Failed {
    /// The script did not run, and will not here: add each by itself.
    ScriptsRefused,
    /// The script did not run (Redis busy, loading, out of memory, …).
    Refused,
    /// It may have run, all or in part.
    Unsure,
}

/// Error codes with which Redis refuses a script before running it, for a
/// while: its entries are refused as an XADD would be.
const REFUSED_FOR_NOW: [&str; 9] = [
    "BUSY",
    "LOADING",
    "MASTERDOWN",
    "CLUSTERDOWN",
    "TRYAGAIN",
    "OOM",
    "READONLY",
    "NOREPLICAS",
    "MISCONF",
];

fn failed(e: &fred::error::Error) -> Failed {
    let Some(code) = error_code(e) else {
        // No answer (a timeout, a dropped connection): it may have run.
        return Failed::Unsure;
    };
    if REFUSED_FOR_NOW.contains(&code) {
        return Failed::Refused;
    }
    // A Lua error is raised while the script runs, after what it did
    // (Redis 7 names the script `user_script`, 6 says it was running).
    if code == "ERR"
        && (e.details().contains("user_script") || e.details().contains("Error running script"))
    {
        return Failed::Unsure;
    }
    // NOPERM, an unknown command, whatever else refuses EVAL itself.
    Failed::ScriptsRefused
}

/// An entry's fields as the reader reads them, whichever way it is added.
fn entry(item: &Outgoing) -> [(&'static str, Value); 2] {
    [
        (ID, item.pending.packet.packet_id.text().into()),
        (BODY, Value::Bytes(codec::encode(&item.pending).into())),
    ]
}

impl RedisQueue {
    /// What became of each XADD of `batch`, in order.
    pub(super) async fn xadd(&self, batch: &[Outgoing]) -> Vec<Xadded> {
        if !self.connected() {
            return batch
                .iter()
                .map(|_| Xadded::Refused(QueueError::NotConnected))
                .collect();
        }
        if self.scripts_refused.load(Ordering::Relaxed) {
            return self.xadd_each(&batch.iter().collect::<Vec<_>>()).await;
        }
        let mut outcomes = self.xadd_scripted(batch).await;
        let again: Vec<&Outgoing> = batch
            .iter()
            .zip(&outcomes)
            .filter(|(_, o)| o.is_none())
            .map(|(item, _)| item)
            .collect();
        if !again.is_empty() {
            let mut each = self.xadd_each(&again).await.into_iter();
            for outcome in outcomes.iter_mut().filter(|o| o.is_none()) {
                *outcome = each.next();
            }
        }
        outcomes
            .into_iter()
            .map(|o| o.expect("every entry answered"))
            .collect()
    }

    /// One EVAL per shard of the batch; None for the entries of a shard
    /// whose EVAL Redis refused as such (nothing of it ran).
    async fn xadd_scripted(&self, batch: &[Outgoing]) -> Vec<Option<Xadded>> {
        let mut by_shard: Vec<(usize, Vec<usize>)> = Vec::new();
        for (i, item) in batch.iter().enumerate() {
            let shard = self.shards.of(item.pending.packet.packet_id);
            match by_shard.iter_mut().find(|(s, _)| *s == shard) {
                Some((_, items)) => items.push(i),
                None => by_shard.push((shard, vec![i])),
            }
        }
        // Each EVAL names its one key, so a cluster sends it to that key's
        // slot; fred writes them back to back.
        let calls = by_shard.iter().map(|(shard, items)| {
            let mut args: Vec<Value> = Vec::with_capacity(items.len() * 2);
            for &i in items {
                args.extend(entry(&batch[i]).map(|(_, value)| value));
            }
            self.commands
                .eval::<Value, _, _, _>(XADD_ALL, self.shards.key(*shard), args)
        });
        let answers = futures::future::join_all(calls).await;
        let mut outcomes: Vec<Option<Xadded>> = batch.iter().map(|_| None).collect();
        for ((_, items), answer) in by_shard.iter().zip(answers) {
            match answer {
                Ok(Value::Array(each)) if each.len() == items.len() => {
                    for (&i, answer) in items.iter().zip(each) {
                        outcomes[i] = Some(match answer.as_string() {
                            Some(error) if !error.is_empty() => Xadded::Refused(
                                fred::error::Error::new(fred::error::ErrorKind::Unknown, error)
                                    .into(),
                            ),
                            _ => Xadded::Added,
                        });
                    }
                }
                Ok(other) => {
                    // Not what the script answers: what it did is unknown.
                    let e = fred::error::Error::new(
                        fred::error::ErrorKind::Protocol,
                        format!("the adding script answered {other:?}"),
                    );
                    for &i in items {
                        outcomes[i] = Some(Xadded::Unsure(e.clone().into()));
                    }
                }
                Err(e) => match failed(&e) {
                    Failed::ScriptsRefused => {
                        if !self.scripts_refused.swap(true, Ordering::Relaxed) {
                            tracing::warn!(error = %e, "Redis refused the adding script: each packet is XADDed by itself from now on");
                        }
                    }
                    Failed::Refused => {
                        for &i in items {
                            outcomes[i] = Some(Xadded::Refused(e.clone().into()));
                        }
                    }
                    Failed::Unsure => {
                        for &i in items {
                            outcomes[i] = Some(Xadded::Unsure(e.clone().into()));
                        }
                    }
                },
            }
        }
        outcomes
    }

    /// One XADD per entry, in one pipeline.
    async fn xadd_each(&self, batch: &[&Outgoing]) -> Vec<Xadded> {
        let refused = |e: QueueError| batch.iter().map(|_| Xadded::Refused(e.clone())).collect();
        let pipeline = self.commands.pipeline();
        for item in batch {
            let fields = Vec::from(entry(item));
            let key = self
                .shards
                .key(self.shards.of(item.pending.packet.packet_id));
            // Queued in memory: nothing is sent before try_all.
            let queued: Result<(), _> = pipeline.xadd(key, false, None, "*", fields).await;
            if let Err(e) = queued {
                return refused(e.into());
            }
        }
        let mut results = pipeline.try_all::<Value>().await;
        if results.len() != batch.len() {
            // The pipeline failed as a whole: its one error stands for each.
            let e = match results.pop() {
                Some(Err(e)) => e,
                _ => fred::error::Error::new(
                    fred::error::ErrorKind::Protocol,
                    "a pipeline answer of the wrong length",
                ),
            };
            results = batch.iter().map(|_| Err(e.clone())).collect();
        }
        results
            .into_iter()
            .map(|result| match result {
                Ok(_) => Xadded::Added,
                // An error reply: Redis ran the command, and refused it.
                Err(e) if error_code(&e).is_some() => Xadded::Refused(e.into()),
                Err(e) => Xadded::Unsure(e.into()),
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(text: &str) -> fred::error::Error {
        fred::error::Error::new(fred::error::ErrorKind::Unknown, text.to_owned())
    }

    #[test]
    fn a_refused_eval_is_told_from_one_that_may_have_run() {
        let noperm = reply("NOPERM User bucket has no permissions to run the 'eval' command");
        assert_eq!(failed(&noperm), Failed::ScriptsRefused);
        let unknown = reply("ERR unknown command 'EVAL', with args beginning with: ");
        assert_eq!(failed(&unknown), Failed::ScriptsRefused);
        let busy = reply("BUSY Redis is busy running a script.");
        assert_eq!(failed(&busy), Failed::Refused);
        let loading = reply("LOADING Redis is loading the dataset in memory");
        assert_eq!(failed(&loading), Failed::Refused);
        let lua = reply(
            "ERR user_script:1: Script attempted to access nonexistent global variable 'x' script: 1f0c…, on @user_script:1.",
        );
        assert_eq!(failed(&lua), Failed::Unsure);
        let timeout =
            fred::error::Error::new(fred::error::ErrorKind::Timeout, "Request timed out.");
        assert_eq!(failed(&timeout), Failed::Unsure);
    }

    #[test]
    fn the_script_names_the_fields_the_reader_reads() {
        assert!(XADD_ALL.contains(&format!("'{ID}', ARGV[i]")));
        assert!(XADD_ALL.contains(&format!("'{BODY}', ARGV[i + 1]")));
    }
}
