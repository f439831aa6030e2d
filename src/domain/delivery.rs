//! Where a packet is in its life: pending → leased → processed | failed |
//! pending (again) | dead_letter.
use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DeliveryStatus {
    Pending,
    Leased,
    Processed,
    Failed,
    DeadLetter,
}

impl DeliveryStatus {
    pub const ALL: [DeliveryStatus; 5] = [
        Self::Pending,
        Self::Leased,
        Self::Processed,
        Self::Failed,
        Self::DeadLetter,
    ];

    /// The name stored in the database's `status` column.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Pending => "pending",
            Self::Leased => "leased",
            Self::Processed => "processed",
            Self::Failed => "failed",
            Self::DeadLetter => "dead_letter",
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|st| st.as_str() == s)
    }
}

impl fmt::Display for DeliveryStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip() {
        for st in DeliveryStatus::ALL {
            assert_eq!(DeliveryStatus::parse(st.as_str()), Some(st));
        }
        assert_eq!(DeliveryStatus::parse("done"), None);
    }
}
