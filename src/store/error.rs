//! The store's error: whether retrying later may help, or not, with the
//! driver's error kept as its source.
use std::fmt;
use std::sync::Arc;

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is overloaded, or the store is
    /// shutting down: nothing was written, and a retry may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(#[source] Cause),
    #[error("storage error: {0}")]
    Internal(#[source] Cause),
    /// Too many inserts already wait for a commit: refused before queueing
    /// (nothing written); a retry after a short backoff may succeed.
    #[error("the bucket is overloaded: too many writes are waiting; retry with backoff")]
    Overloaded,
}

/// What went wrong underneath: the driver's error (sqlx, rusqlite), or a
/// message of the store's own. Shared, because a failed commit answers
/// every write that waited for it with the same error.
#[derive(Debug, Clone)]
pub struct Cause(Arc<dyn std::error::Error + Send + Sync>);

impl Cause {
    pub fn of(e: impl std::error::Error + Send + Sync + 'static) -> Self {
        Cause(Arc::new(e))
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

impl std::error::Error for Cause {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.0.source()
    }
}

/// A cause that is only a message (the store's own).
#[derive(Debug)]
struct Message(String);

impl fmt::Display for Message {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Message {}

impl From<String> for Cause {
    fn from(message: String) -> Self {
        Cause::of(Message(message))
    }
}

impl From<&str> for Cause {
    fn from(message: &str) -> Self {
        message.to_owned().into()
    }
}

impl From<sqlx::Error> for StoreError {
    fn from(e: sqlx::Error) -> Self {
        use sqlx::Error as E;
        let unavailable = match &e {
            E::Io(_) | E::Tls(_) | E::PoolTimedOut | E::PoolClosed | E::WorkerCrashed => true,
            E::Protocol(_) => true,
            E::Database(db) => db.code().is_some_and(|code| transient_code(&code)),
            _ => false,
        };
        if unavailable {
            StoreError::Unavailable(Cause::of(e))
        } else {
            StoreError::Internal(Cause::of(e))
        }
    }
}

impl From<rusqlite::Error> for StoreError {
    fn from(e: rusqlite::Error) -> Self {
        let transient = match &e {
            rusqlite::Error::SqliteFailure(failure, _) => {
                transient_code(&failure.extended_code.to_string())
            }
            _ => false,
        };
        if transient {
            StoreError::Unavailable(Cause::of(e))
        } else {
            StoreError::Internal(Cause::of(e))
        }
    }
}

impl From<std::io::Error> for StoreError {
    /// The record log's disk: full, failing, or refusing writes. Nothing
    /// was acknowledged; a retry may succeed once the disk takes writes.
    fn from(e: std::io::Error) -> Self {
        StoreError::Unavailable(Cause::of(e))
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            other => StoreError::Internal(Cause::of(other)),
        }
    }
}

/// Database error codes that mean "not now" rather than "never".
fn transient_code(code: &str) -> bool {
    // PostgreSQL: 08 connection exceptions, 53 insufficient resources,
    // 57P0x shutdown, 40001/40P01 serialization failure and deadlock,
    // 55000 "database is not currently accepting connections".
    code.starts_with("08")
        || code == "55000"
        || code.starts_with("53")
        || code.starts_with("57P0")
        || code == "40001"
        || code == "40P01"
        // SQLite primary result codes: BUSY, LOCKED, IOERR, FULL, CANTOPEN.
        || matches!(code.parse::<i32>().map(|c| c & 0xff), Ok(5 | 6 | 10 | 13 | 14))
}

#[cfg(test)]
mod tests {
    use super::{StoreError, transient_code};

    #[test]
    fn the_drivers_error_is_kept_as_the_source() {
        let busy = rusqlite::Error::SqliteFailure(
            rusqlite::ffi::Error::new(5),
            Some("database is locked".into()),
        );
        let e = StoreError::from(busy);
        assert!(matches!(e, StoreError::Unavailable(_)));
        let cause = std::error::Error::source(&e).expect("the driver's error");
        assert!(cause.to_string().contains("database is locked"), "{cause}");
        // Shared, not copied, by every waiter of a failed commit.
        let again = e.clone();
        assert_eq!(again.to_string(), e.to_string());
    }

    #[test]
    fn classifies_codes() {
        assert!(transient_code("08006"));
        assert!(transient_code("57P01"));
        assert!(transient_code("5")); // SQLITE_BUSY
        assert!(transient_code("266")); // SQLITE_IOERR_READ
        assert!(!transient_code("23505")); // unique violation
        assert!(!transient_code("19")); // SQLITE_CONSTRAINT
    }
}
