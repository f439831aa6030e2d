//! Lease tokens and what ExtendLease does with them: named here, below
//! both the dispatcher that grants leases and the Redis queue that carries
//! ExtendLease between nodes, so neither names the other's layer.
use std::fmt;

use chrono::{DateTime, Utc};

use super::PacketId;

/// What ExtendLease did to one lease.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LeaseChange {
    /// It now ends then.
    Extended(DateTime<Utc>),
    /// It ended now (a nack): the packet goes out again.
    Ended,
}

/// Names one lease, for ExtendLease: the node that granted it, the grant's
/// number there, and the packet. A grant number is never reused by a node,
/// and a node's name is new at every start, so a token names one delivery
/// of one packet to one stream, and nothing after that lease ends. Clients
/// see an opaque string: `{node}.{grant, hex}.{packet id, 32 hex}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken {
    pub node: String,
    pub grant: u64,
    pub packet_id: PacketId,
}

/// Longest node name a token may carry.
const MAX_NODE_CHARS: usize = 64;

impl LeaseToken {
    /// A token this server makes, or None.
    pub fn parse(text: &str) -> Option<LeaseToken> {
        let mut parts = text.split('.');
        let (node, grant, packet) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some()
            || node.is_empty()
            || node.len() > MAX_NODE_CHARS
            || !node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || grant.is_empty()
            || grant.len() > 16
            || packet.len() != 32
        {
            return None;
        }
        Some(LeaseToken {
            node: node.to_owned(),
            grant: u64::from_str_radix(grant, 16).ok()?,
            packet_id: PacketId::parse(packet).ok()?,
        })
    }
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{}.{:x}.{}",
            self.node,
            self.grant,
            self.packet_id.as_uuid().simple()
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_refuse_anything_else() {
        let token = LeaseToken {
            node: "1a2b3c4d".into(),
            grant: 0x2f,
            packet_id: PacketId::new(),
        };
        let text = token.to_string();
        assert!(text.len() <= 128, "{text}");
        assert_eq!(LeaseToken::parse(&text), Some(token.clone()));
        for bad in [
            "",
            "node",
            "a.b.c",
            "1a2b3c4d.2f",
            &format!("{text}.x"),
            &format!(".2f.{}", token.packet_id.as_uuid().simple()),
            &format!("1a2b3c4d.zz.{}", token.packet_id.as_uuid().simple()),
            &format!("1a2b3c4d.2f.{}", token.packet_id),
            &format!("no de.2f.{}", token.packet_id.as_uuid().simple()),
            &format!("n.11112222333344445.{}", token.packet_id.as_uuid().simple()),
        ] {
            assert_eq!(LeaseToken::parse(bad), None, "{bad:?}");
        }
    }
}
