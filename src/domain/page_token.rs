//! UserPackets page tokens. Opaque to clients (they only pass them back),
//! and bound to the query that made them: a token from another user's
//! pages, or from another status filter, is refused instead of silently
//! jumping into the wrong list.
use sha2::{Digest, Sha256};

use super::DeliveryStatus;

const VERSION: u8 = 1;
/// Version, seq (8 bytes), query tag (8 bytes), as hex.
const TEXT_LEN: usize = 2 * (1 + 8 + 8);

/// Where the next page starts: packets older than `before_seq`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageToken {
    pub before_seq: i64,
}

/// Why a page token was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PageTokenError {
    /// Not a token this server makes.
    Malformed,
    /// Made for another user or another filter.
    OtherQuery,
}

impl PageTokenError {
    pub fn describe(self) -> &'static str {
        match self {
            Self::Malformed => "page_token is not one this server gave",
            Self::OtherQuery => {
                "page_token belongs to another query (another user_id or status_filter)"
            }
        }
    }
}

/// Eight bytes that name the query: its user and filter.
fn tag(user_id: &str, status: Option<DeliveryStatus>) -> [u8; 8] {
    let mut hash = Sha256::new();
    hash.update(user_id.as_bytes());
    hash.update([0]);
    hash.update(status.map_or("", DeliveryStatus::as_str).as_bytes());
    let digest = hash.finalize();
    digest[..8].try_into().expect("8 bytes")
}

impl PageToken {
    /// The token for the page after one ending at `before_seq`.
    pub fn encode(before_seq: i64, user_id: &str, status: Option<DeliveryStatus>) -> String {
        let mut bytes = Vec::with_capacity(17);
        bytes.push(VERSION);
        bytes.extend(before_seq.to_be_bytes());
        bytes.extend(tag(user_id, status));
        bytes.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// Reads a token given back with this query.
    pub fn decode(
        text: &str,
        user_id: &str,
        status: Option<DeliveryStatus>,
    ) -> Result<PageToken, PageTokenError> {
        if text.len() != TEXT_LEN || !text.is_ascii() {
            return Err(PageTokenError::Malformed);
        }
        let bytes: Vec<u8> = (0..text.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&text[i..i + 2], 16))
            .collect::<Result<_, _>>()
            .map_err(|_| PageTokenError::Malformed)?;
        if bytes[0] != VERSION {
            return Err(PageTokenError::Malformed);
        }
        let before_seq = i64::from_be_bytes(bytes[1..9].try_into().expect("8 bytes"));
        if before_seq <= 0 {
            return Err(PageTokenError::Malformed);
        }
        if bytes[9..] != tag(user_id, status) {
            return Err(PageTokenError::OtherQuery);
        }
        Ok(PageToken { before_seq })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_token_reads_back_only_with_its_query() {
        let t = PageToken::encode(42, "alice", None);
        assert_eq!(
            PageToken::decode(&t, "alice", None),
            Ok(PageToken { before_seq: 42 })
        );
        assert_eq!(
            PageToken::decode(&t, "bob", None),
            Err(PageTokenError::OtherQuery)
        );
        assert_eq!(
            PageToken::decode(&t, "alice", Some(DeliveryStatus::Processed)),
            Err(PageTokenError::OtherQuery)
        );
        for bad in ["", "42", "zz", &t[..t.len() - 2], &format!("{t}00"), "é"] {
            assert_eq!(
                PageToken::decode(bad, "alice", None),
                Err(PageTokenError::Malformed),
                "{bad:?}"
            );
        }
        let zero = PageToken::encode(0, "alice", None);
        assert_eq!(
            PageToken::decode(&zero, "alice", None),
            Err(PageTokenError::Malformed)
        );
    }
}
