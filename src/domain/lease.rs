//! How long a lease a caller may ask for, at any door: StreamPending,
//! ExtendLease, and the JSON gateway's poll.
use super::FieldViolation;

/// Longest lease a caller may ask for, in seconds (also the longest
/// default an operator may set).
pub const MAX_LEASE_SECONDS: u32 = 3600;
/// Most packets one poll of the JSON gateway leases, and how many when the
/// poll does not say.
pub const MAX_POLL: u32 = 100;
pub const DEFAULT_POLL: u32 = 10;

/// A lease length as asked for in `field`: 0 is "not said" (None); more
/// than [`MAX_LEASE_SECONDS`] is refused.
pub fn lease_seconds(field: &str, seconds: u32) -> Result<Option<u32>, FieldViolation> {
    if seconds > MAX_LEASE_SECONDS {
        return Err(FieldViolation::new(
            field,
            format!("{field} must be at most {MAX_LEASE_SECONDS}, got {seconds}"),
        ));
    }
    Ok((seconds > 0).then_some(seconds))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_is_unsaid_and_the_limit_is_inclusive() {
        assert_eq!(lease_seconds("lease_seconds", 0), Ok(None));
        assert_eq!(
            lease_seconds("lease_seconds", MAX_LEASE_SECONDS),
            Ok(Some(MAX_LEASE_SECONDS))
        );
        assert_eq!(
            lease_seconds("lease_seconds", 3601)
                .unwrap_err()
                .description,
            "lease_seconds must be at most 3600, got 3601"
        );
    }
}
