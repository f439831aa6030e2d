//! How many items one request may carry (BUCKET_MAX_BATCH, configured),
//! whichever list carries them.
use super::FieldViolation;

/// A list of items a request carries, named as the caller knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Batch {
    /// IngestBatch's `packets`.
    Packets,
    /// MarkProcessedBatch's `marks`.
    Marks,
    /// ExtendLease's `lease_tokens`.
    LeaseTokens,
    /// A JSON body that is an array (of packets or of marks).
    JsonArray,
    /// Redrive's `statuses` filter.
    Statuses,
}

impl Batch {
    /// `len` items, when at most `max` are allowed.
    pub fn check(self, max: usize, len: usize) -> Result<(), FieldViolation> {
        if len <= max {
            return Ok(());
        }
        Err(self.violation(max, &len.to_string()))
    }

    /// More than `max` items, found before all were counted: a list is
    /// refused at its first item too many, not read to its end.
    pub fn over(self, max: usize) -> FieldViolation {
        self.violation(max, &format!("more than {max}"))
    }

    fn violation(self, max: usize, len: &str) -> FieldViolation {
        let (field, description) = match self {
            Batch::Packets => (
                "packets",
                format!("a batch holds at most {max} packets, got {len}"),
            ),
            Batch::Marks => (
                "marks",
                format!("a batch holds at most {max} marks, got {len}"),
            ),
            Batch::LeaseTokens => (
                "lease_tokens",
                format!("at most {max} tokens at once, got {len}"),
            ),
            Batch::JsonArray => (
                "body",
                format!("an array holds at most {max} items, got {len}"),
            ),
            Batch::Statuses => (
                "statuses",
                format!("at most {max} statuses at once, got {len}"),
            ),
        };
        FieldViolation::new(field, description)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_limit_is_inclusive_and_the_list_is_named() {
        assert_eq!(Batch::Marks.check(3, 3), Ok(()));
        let v = Batch::LeaseTokens.check(3, 4).unwrap_err();
        assert_eq!(v.field, "lease_tokens");
        assert_eq!(v.description, "at most 3 tokens at once, got 4");
        assert_eq!(Batch::JsonArray.check(0, 1).unwrap_err().field, "body");
        assert_eq!(
            Batch::Packets.over(500).description,
            "a batch holds at most 500 packets, got more than 500"
        );
    }
}
