//! Lease tokens and what ExtendLease does with them: named here, below
//! both the dispatcher that grants leases and the Redis queue that carries
//! ExtendLease between nodes, so neither names the other's layer.
use std::fmt;
use std::sync::Arc;

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
/// of one packet to one stream, and nothing after that lease ends. It also
/// says which delivery that was, so a mark presenting it through any node
/// counts it (only the granting node knows its leases). Clients see an
/// opaque string: `{node}.{grant, hex}.{attempt, hex}.{packet id, 32 hex}`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseToken {
    /// Shared by every token its node grants (one per delivery).
    pub node: Arc<str>,
    pub grant: u64,
    /// 1 for the first delivery; 0 in a token from before tokens said it
    /// (`{node}.{grant}.{packet id}`, still taken while such nodes run).
    pub attempt: u32,
    pub packet_id: PacketId,
}

/// Longest node name a token may carry.
const MAX_NODE_CHARS: usize = 64;

impl LeaseToken {
    /// A token this server makes, or None.
    pub fn parse(text: &str) -> Option<LeaseToken> {
        let mut parts = text.split('.');
        let (node, grant, third) = (parts.next()?, parts.next()?, parts.next()?);
        let (attempt, packet) = match (parts.next(), parts.next()) {
            (Some(packet), None) => (Some(third), packet),
            (None, _) => (None, third),
            (Some(_), Some(_)) => return None,
        };
        if node.is_empty()
            || node.len() > MAX_NODE_CHARS
            || !node.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            || grant.is_empty()
            || grant.len() > 16
            || attempt.is_some_and(|a| a.is_empty() || a.len() > 8)
            || packet.len() != 32
        {
            return None;
        }
        let attempt = match attempt {
            Some(a) => u32::from_str_radix(a, 16).ok()?,
            None => 0,
        };
        Some(LeaseToken {
            node: Arc::from(node),
            grant: u64::from_str_radix(grant, 16).ok()?,
            attempt,
            packet_id: PacketId::parse(packet).ok()?,
        })
    }

    /// The token as clients see it, made straight: every delivery carries
    /// one, and through `write!` (four arguments, the text growing from
    /// empty) it cost several times as much.
    pub fn text(&self) -> String {
        let mut text = String::with_capacity(self.node.len() + 3 + 16 + 8 + 32);
        text.push_str(&self.node);
        text.push('.');
        push_hex(&mut text, self.grant);
        text.push('.');
        push_hex(&mut text, u64::from(self.attempt));
        text.push('.');
        let mut buffer = uuid::Uuid::encode_buffer();
        text.push_str(self.packet_id.as_uuid().simple().encode_lower(&mut buffer));
        text
    }
}

/// `value` in lowercase hex without leading zeros, as `{:x}` writes it.
fn push_hex(text: &mut String, mut value: u64) {
    let mut digits = [0u8; 16];
    let mut at = digits.len();
    loop {
        at -= 1;
        digits[at] = b"0123456789abcdef"[(value & 0xf) as usize];
        value >>= 4;
        if value == 0 {
            break;
        }
    }
    text.push_str(std::str::from_utf8(&digits[at..]).expect("hex digits are ASCII"));
}

impl fmt::Display for LeaseToken {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text())
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    proptest! {
        #[test]
        fn text_is_what_the_format_wrote(
            node in "[a-z0-9-]{1,64}",
            grant in any::<u64>(),
            attempt in any::<u32>(),
            id in any::<u128>(),
        ) {
            let token = LeaseToken {
                node: Arc::from(node.as_str()),
                grant,
                attempt,
                packet_id: PacketId::from(uuid::Uuid::from_u128(id)),
            };
            let written = format!(
                "{}.{:x}.{:x}.{}",
                node,
                grant,
                attempt,
                token.packet_id.as_uuid().simple()
            );
            prop_assert_eq!(token.text(), written.clone());
            prop_assert_eq!(token.to_string(), written.clone());
            prop_assert_eq!(LeaseToken::parse(&written), Some(token));
        }
    }

    #[test]
    fn tokens_round_trip_and_refuse_anything_else() {
        let token = LeaseToken {
            node: "1a2b3c4d".into(),
            grant: 0x2f,
            attempt: 3,
            packet_id: PacketId::new(),
        };
        let text = token.to_string();
        assert!(text.len() <= 128, "{text}");
        assert_eq!(LeaseToken::parse(&text), Some(token.clone()));
        let longest = LeaseToken {
            node: "n".repeat(MAX_NODE_CHARS).into(),
            grant: u64::MAX,
            attempt: u32::MAX,
            ..token.clone()
        };
        assert!(longest.to_string().len() <= 128, "{longest}");
        let simple = token.packet_id.as_uuid().simple();
        // A token from before tokens said the attempt: the delivery unknown.
        let older = format!("1a2b3c4d.2f.{simple}");
        assert_eq!(
            LeaseToken::parse(&older),
            Some(LeaseToken {
                attempt: 0,
                ..token.clone()
            })
        );
        for bad in [
            "",
            "node",
            "a.b.c",
            "1a2b3c4d.2f",
            &format!("{text}.x"),
            &format!(".2f.{simple}"),
            &format!("1a2b3c4d.zz.{simple}"),
            &format!("1a2b3c4d.2f.{}", token.packet_id),
            &format!("no de.2f.{simple}"),
            &format!("n.11112222333344445.{simple}"),
            &format!("1a2b3c4d.2f..{simple}"),
            &format!("1a2b3c4d.2f.zz.{simple}"),
            &format!("1a2b3c4d.2f.123456789.{simple}"),
        ] {
            assert_eq!(LeaseToken::parse(bad), None, "{bad:?}");
        }
    }
}
