//! The application's one error type. It reaches the wire through exactly two
//! mappings: `From<Error> for tonic::Status` (grpc/status.rs) and
//! `IntoResponse for Error` (http/error.rs).
use crate::domain::FieldViolation;
use crate::store::StoreError;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The caller sent something invalid; every violated field is named.
    #[error("invalid input: {}", summary(.0))]
    InvalidInput(Vec<FieldViolation>),
    #[error("{0} not found")]
    NotFound(String),
    /// The request is well formed but the state does not allow it (a lease
    /// this caller does not hold).
    #[error("failed precondition: {0}")]
    FailedPrecondition(String),
    /// Storage (or another dependency) cannot serve now; retrying may work.
    #[error("unavailable: {0}")]
    Unavailable(String),
    /// No credential, or one this server does not know.
    #[error("unauthenticated: {0}")]
    Unauthenticated(String),
    /// A known credential without the role the call needs.
    #[error("permission denied: {0}")]
    PermissionDenied(String),
    /// A limit was reached; retrying after `retry_after` may work.
    #[error("resource exhausted: {message}")]
    ResourceExhausted {
        message: String,
        retry_after: Option<std::time::Duration>,
    },
    #[error("internal error: {0}")]
    Internal(String),
}

impl Error {
    pub fn invalid(field: &str, description: impl Into<String>) -> Self {
        Error::InvalidInput(vec![FieldViolation::new(field, description)])
    }

    /// Names violated fields by their path in the request, e.g.
    /// `packet.focus_score` (gRPC) or `body.focus_score` (JSON).
    pub fn prefixed(self, prefix: &str) -> Self {
        match self {
            Error::InvalidInput(vs) => Error::InvalidInput(
                vs.into_iter()
                    .map(|v| {
                        // A violation of the whole item names the prefix alone.
                        let field = match v.field.as_str() {
                            "" => prefix.trim_end_matches('.').to_owned(),
                            f => format!("{prefix}{f}"),
                        };
                        FieldViolation::new(field, v.description)
                    })
                    .collect(),
            ),
            other => other,
        }
    }
}

fn summary(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| v.description.as_str())
        .collect::<Vec<_>>()
        .join("; ")
}

/// What clients hear when storage cannot answer now.
pub const STORAGE_UNAVAILABLE: &str = "storage is unavailable; retry with backoff";
/// What clients hear of a storage failure that is a bug.
pub const STORAGE_INTERNAL: &str = "internal storage error (the cause is in the server's log)";

impl From<StoreError> for Error {
    /// The driver's text (hosts, SQL, constraint names) stays in the log,
    /// logged here once; clients hear what to do about it.
    fn from(e: StoreError) -> Self {
        match e {
            StoreError::Unavailable(cause) => {
                tracing::warn!(%cause, "storage unavailable");
                Error::Unavailable(STORAGE_UNAVAILABLE.into())
            }
            StoreError::Internal(cause) => {
                tracing::error!(%cause, "storage error");
                Error::Internal(STORAGE_INTERNAL.into())
            }
            // Counted (bucket_writes_refused_total), not logged per call.
            StoreError::Overloaded => Error::Unavailable(StoreError::Overloaded.to_string()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn storage_errors_reach_clients_without_the_drivers_text() {
        let secret = "connection to 10.0.0.7:5432 refused (user bucket_prod)";
        for e in [
            StoreError::Unavailable(secret.into()),
            StoreError::Internal(format!("duplicate key violates packets_pkey: {secret}").into()),
        ] {
            let text = Error::from(e).to_string();
            assert!(
                !text.contains("10.0.0.7") && !text.contains("packets_pkey"),
                "{text}"
            );
        }
    }
}
