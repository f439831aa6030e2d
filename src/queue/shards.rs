//! How the queue is split over stream keys, so a Redis Cluster can spread
//! it: which key a packet goes to, and which key an entry came from.
//!
//! One shard keeps the single key `{prefix}pending` that deployments
//! before shards used. N shards are `{prefix}pending:{0}` …
//! `{prefix}pending:{N-1}`: the braces are a Redis Cluster hash tag, so a
//! shard's slot is chosen by its number alone and the shards land on slots
//! (hence nodes) of their own. Every command names one shard's key, so no
//! command ever spans two slots.
use super::QueueError;
use crate::domain::PacketId;

pub struct Shards {
    keys: Vec<String>,
}

impl Shards {
    pub fn new(prefix: &str, shards: u16) -> Result<Shards, QueueError> {
        if shards > 1 && prefix.contains('{') {
            // Redis hashes the first `{…}` of a key: the prefix's tag would
            // put every shard on one slot.
            return Err(QueueError::Settings(format!(
                "BUCKET_REDIS_PREFIX {prefix:?} holds a `{{`: with BUCKET_REDIS_SHARDS > 1 \
                 every shard would hash to one Redis Cluster slot"
            )));
        }
        let keys = match shards {
            0 | 1 => vec![format!("{prefix}pending")],
            n => (0..n).map(|i| format!("{prefix}pending:{{{i}}}")).collect(),
        };
        Ok(Shards { keys })
    }

    pub fn count(&self) -> usize {
        self.keys.len()
    }

    pub fn key(&self, shard: usize) -> &str {
        &self.keys[shard]
    }

    /// The shard a packet is added to. Any node may add to any shard (the
    /// entry says where it is), so this only has to spread ids evenly:
    /// both halves are folded in, as client-chosen ids need not be random
    /// in the low bits.
    pub fn of(&self, id: PacketId) -> usize {
        let (high, low) = id.as_uuid().as_u64_pair();
        ((high ^ low) % self.keys.len() as u64) as usize
    }
}

/// An entry as this node hands it around ([`super::Queued::entry`]): the
/// shard and the stream entry id, so it can be removed from its own key.
pub fn tag(shard: usize, entry: &str) -> String {
    format!("{shard}/{entry}")
}

/// The shard and the stream entry id of a tagged entry.
pub fn untag(tagged: &str) -> Option<(usize, &str)> {
    let (shard, entry) = tagged.split_once('/')?;
    Some((shard.parse().ok()?, entry))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_shard_keeps_the_old_key() {
        let shards = Shards::new("bucket:", 1).unwrap();
        assert_eq!(shards.count(), 1);
        assert_eq!(shards.key(0), "bucket:pending");
        assert_eq!(shards.of(PacketId::from(uuid::Uuid::new_v4())), 0);
    }

    #[test]
    fn shards_are_hash_tagged_and_ids_spread() {
        let shards = Shards::new("bucket:", 4).unwrap();
        assert_eq!(shards.key(3), "bucket:pending:{3}");
        let mut used = [0; 4];
        for _ in 0..400 {
            used[shards.of(PacketId::from(uuid::Uuid::new_v4()))] += 1;
        }
        assert!(used.iter().all(|n| *n > 50), "{used:?}");
    }

    #[test]
    fn a_prefix_with_a_hash_tag_is_refused_with_shards() {
        assert!(Shards::new("{bucket}:", 4).is_err());
        assert!(Shards::new("{bucket}:", 1).is_ok());
    }

    #[test]
    fn entries_carry_their_shard() {
        assert_eq!(
            untag(&tag(7, "1700000000000-3")),
            Some((7, "1700000000000-3"))
        );
        assert_eq!(untag("1700000000000-3"), None);
    }
}
