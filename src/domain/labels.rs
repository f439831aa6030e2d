//! The closed sets a packet's labels come from: which system sent it, the
//! sender's role, and the legacy state.
//!
//! Each value's text is written once, here. It is the JSON form, and the
//! form stored in the database's TEXT columns and in the Redis queue's
//! entries, so it must never change.
use std::fmt;
use std::str::FromStr;

use super::packet::quoted;

/// A value outside a label's set; its text is the violation's description.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UnknownLabel(String);

impl fmt::Display for UnknownLabel {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for UnknownLabel {}

/// A label type, read from the request field that carries it.
pub trait Label: FromStr<Err = UnknownLabel> {
    const FIELD: &'static str;
}

macro_rules! label {
    (
        $(#[$meta:meta])*
        $name:ident, field $field:literal { $($variant:ident = $text:literal),+ $(,)? }
    ) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
        pub enum $name {
            $(#[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub const ALL: &'static [$name] = &[$($name::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self {
                    $($name::$variant => $text),+
                }
            }
        }

        impl Label for $name {
            const FIELD: &'static str = $field;
        }

        impl FromStr for $name {
            type Err = UnknownLabel;

            fn from_str(s: &str) -> Result<Self, UnknownLabel> {
                Self::ALL
                    .iter()
                    .copied()
                    .find(|v| v.as_str() == s)
                    .ok_or_else(|| {
                        let names: Vec<&str> = Self::ALL.iter().map(|v| v.as_str()).collect();
                        UnknownLabel(format!(
                            "{} must be one of {}, got {}",
                            $field,
                            names.join(", "),
                            quoted(s)
                        ))
                    })
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

label! {
    /// The platform a packet comes from.
    SystemType, field "system_type" { Gurukul = "gurukul", Ems = "ems" }
}

label! {
    /// Who the sender is (not a caller's [`crate::auth::Role`]).
    SenderRole, field "role" { Student = "student", Employee = "employee" }
}

label! {
    /// The original bucket's `state`, kept for old clients.
    LegacyState, field "state" {
        Working = "WORKING",
        Idle = "IDLE",
        Away = "AWAY",
        Distracted = "DISTRACTED",
        Faking = "FAKING",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round_trips<T>(all: &[T], as_str: fn(T) -> &'static str)
    where
        T: Copy + PartialEq + fmt::Debug + FromStr + serde::Serialize + serde::de::DeserializeOwned,
        T::Err: fmt::Debug,
    {
        for &v in all {
            let text = as_str(v);
            assert_eq!(text.parse::<T>().unwrap(), v);
            let json = serde_json::to_string(&v).unwrap();
            assert_eq!(json, format!("\"{text}\""));
            assert_eq!(serde_json::from_str::<T>(&json).unwrap(), v);
        }
    }

    #[test]
    fn every_value_round_trips_in_todays_text() {
        round_trips(SystemType::ALL, SystemType::as_str);
        round_trips(SenderRole::ALL, SenderRole::as_str);
        round_trips(LegacyState::ALL, LegacyState::as_str);
        let texts = |names: Vec<&str>| names.join(",");
        assert_eq!(
            texts(SystemType::ALL.iter().map(|v| v.as_str()).collect()),
            "gurukul,ems"
        );
        assert_eq!(
            texts(SenderRole::ALL.iter().map(|v| v.as_str()).collect()),
            "student,employee"
        );
        assert_eq!(
            texts(LegacyState::ALL.iter().map(|v| v.as_str()).collect()),
            "WORKING,IDLE,AWAY,DISTRACTED,FAKING"
        );
    }

    #[test]
    fn unknown_values_are_refused_with_the_violation_text() {
        assert_eq!(
            "school".parse::<SystemType>().unwrap_err().to_string(),
            r#"system_type must be one of gurukul, ems, got "school""#
        );
        assert_eq!(
            "Student".parse::<SenderRole>().unwrap_err().to_string(),
            r#"role must be one of student, employee, got "Student""#
        );
        assert_eq!(
            "working".parse::<LegacyState>().unwrap_err().to_string(),
            r#"state must be one of WORKING, IDLE, AWAY, DISTRACTED, FAKING, got "working""#
        );
        assert!(serde_json::from_str::<SystemType>(r#""GURUKUL""#).is_err());
    }
}
