//! The durable job store (the only module that uses sqlx): SQLite by default (WAL, created on
//! first start), migrations embedded from `migrations/`, jobs with their status, parameters,
//! seeds and idempotency keys, artifacts on disk under the data dir (referenced by path and
//! SHA-256), API keys (hashes only), restart recovery and the expiry sweep. docs/jobs.md has
//! the schema and the lifecycle.
mod artifacts;
mod jobs;
mod keys;
mod remote;

use std::str::FromStr;
use std::time::Duration;

use sqlx::SqlitePool;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};

pub use artifacts::{ArtifactFile, Artifacts};
pub use jobs::{ArtifactRow, Insert, JobRow, JobStatus, NewJob, Recovery};
pub use keys::{ApiKeyRow, CreatedKey, hash_token};

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("database: {0}")]
    Db(#[from] sqlx::Error),
    #[error("migrations: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("artifact file {path}: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error("{0}")]
    NotFound(String),
    #[error("random source: {0}")]
    Random(String),
    /// The object store of the artifacts (unreachable, missing bucket, refused credentials).
    #[error("artifact store {0}")]
    Remote(String),
}

pub type StoreResult<T> = Result<T, StoreError>;

/// The migrations of `migrations/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations");

/// A connection pool onto the job database. Cheap to clone.
#[derive(Clone, Debug)]
pub struct JobStore {
    pool: SqlitePool,
}

impl JobStore {
    /// Opens (creating the file when missing) and migrates the database at `url`
    /// (`sqlite://path`, `sqlite::memory:`).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let store = Self::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens without migrating.
    pub async fn connect(url: &str) -> StoreResult<Self> {
        let memory = url.contains(":memory:");
        let options = SqliteConnectOptions::from_str(url)?
            .create_if_missing(true)
            .foreign_keys(true)
            .busy_timeout(Duration::from_secs(10));
        let options = if memory {
            options
        } else {
            options.journal_mode(SqliteJournalMode::Wal)
        };
        // An in-memory database exists per connection: keep exactly one.
        let pool = SqlitePoolOptions::new()
            .max_connections(if memory { 1 } else { 4 })
            .connect_with(options)
            .await?;
        Ok(Self { pool })
    }

    /// Applies the migrations that have not run yet.
    pub async fn migrate(&self) -> StoreResult<()> {
        MIGRATOR.run(&self.pool).await?;
        Ok(())
    }

    pub(crate) fn pool(&self) -> &SqlitePool {
        &self.pool
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.pool.close().await;
    }
}

/// Unix milliseconds now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `n` random bytes as lowercase hex (from [`crate::ids`]).
pub fn random_hex(n: usize) -> StoreResult<String> {
    crate::ids::random_hex(n).map_err(|e| StoreError::Random(e.to_string()))
}

pub use crate::ids::hex;

/// SHA-256 of `bytes` as hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    hex(&sha2::Sha256::digest(bytes))
}

#[cfg(test)]
mod tests;
