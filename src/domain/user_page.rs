//! What a caller may ask of one user's packets (UserPackets, and the
//! JSON gateway's user path), and the user ids a query may name.
use super::packet::MAX_STRING_BYTES;
use super::page_token::PageToken;
use super::{DeliveryStatus, FieldViolation};

/// Packets in a page when the caller does not say, and at most.
pub const DEFAULT_USER_LIMIT: u32 = 50;
pub const MAX_USER_LIMIT: u32 = 500;

/// Where a page starts and how long it is, checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageBounds {
    /// The default applied.
    pub limit: u32,
    /// After the previous page's last packet; None for the first page.
    pub before_seq: Option<i64>,
}

impl PageBounds {
    /// A page of `user_id`'s packets (only `status` ones, if given). A
    /// `limit` of 0 is the default; an empty `page_token` the first page.
    pub fn check(
        user_id: &str,
        limit: u32,
        status: Option<DeliveryStatus>,
        page_token: &str,
    ) -> Result<PageBounds, Vec<FieldViolation>> {
        let mut violations = Vec::new();
        violations.extend(user_id_violation(user_id));
        if limit > MAX_USER_LIMIT {
            violations.push(FieldViolation::new(
                "limit",
                format!("limit must be at most {MAX_USER_LIMIT}, got {limit}"),
            ));
        }
        let before_seq = match page_token {
            "" => None,
            token => match PageToken::decode(token, user_id, status) {
                Ok(t) => Some(t.before_seq),
                Err(e) => {
                    violations.push(FieldViolation::new("page_token", e.describe()));
                    None
                }
            },
        };
        if !violations.is_empty() {
            return Err(violations);
        }
        Ok(PageBounds {
            limit: if limit == 0 {
                DEFAULT_USER_LIMIT
            } else {
                limit
            },
            before_seq,
        })
    }
}

/// What is wrong with a user id a query names, if anything.
pub fn user_id_violation(user_id: &str) -> Option<FieldViolation> {
    if user_id.is_empty() || user_id.len() > MAX_STRING_BYTES {
        Some(FieldViolation::new(
            "user_id",
            format!("user_id must be 1 to {MAX_STRING_BYTES} bytes"),
        ))
    } else if user_id.contains('\0') {
        // No stored user has one, and PostgreSQL refuses the query.
        Some(FieldViolation::new(
            "user_id",
            "user_id must not contain U+0000 (NUL)",
        ))
    } else {
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_limits_and_tokens() {
        assert_eq!(
            PageBounds::check("u", 0, None, ""),
            Ok(PageBounds {
                limit: DEFAULT_USER_LIMIT,
                before_seq: None
            })
        );
        let token = PageToken::encode(42, "u", None);
        assert_eq!(
            PageBounds::check("u", 7, None, &token).unwrap().before_seq,
            Some(42)
        );
        let fields: Vec<String> = PageBounds::check("", MAX_USER_LIMIT + 1, None, "junk")
            .unwrap_err()
            .into_iter()
            .map(|v| v.field)
            .collect();
        assert_eq!(fields, ["user_id", "limit", "page_token"]);
    }
}
