//! The store's error: whether retrying later may help, or not.

#[derive(Debug, Clone, thiserror::Error)]
pub enum StoreError {
    /// The database cannot be reached or is overloaded, or the store is
    /// shutting down: nothing was written, and a retry may succeed.
    #[error("storage unavailable: {0}")]
    Unavailable(String),
    #[error("storage error: {0}")]
    Internal(String),
    /// Too many inserts already wait for a commit: refused before queueing
    /// (nothing written); a retry after a short backoff may succeed.
    #[error("the bucket is overloaded: too many writes are waiting; retry with backoff")]
    Overloaded,
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
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Internal(e.to_string())
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
            StoreError::Unavailable(e.to_string())
        } else {
            StoreError::Internal(e.to_string())
        }
    }
}

impl From<sqlx::migrate::MigrateError> for StoreError {
    fn from(e: sqlx::migrate::MigrateError) -> Self {
        match e {
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            other => StoreError::Internal(other.to_string()),
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
    use super::transient_code;

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
