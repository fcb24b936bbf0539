//! The durable job store (the only module that uses sqlx): SQLite by default (WAL, created on
//! first start) or PostgreSQL for many replicas on one queue (`db` hides the difference), with
//! migrations embedded from `migrations/sqlite/` and `migrations/postgres/`; jobs with their
//! status, parameters, seeds and idempotency keys, lease-based claiming across replicas
//! (`lease`), artifacts on disk under the data dir (referenced by path and SHA-256), API keys
//! (hashes only), restart recovery and the expiry sweep. docs/jobs.md has the schema and the
//! lifecycle.
mod artifacts;
pub(crate) mod db;
mod jobs;
mod keys;
mod lease;
mod remote;

pub use artifacts::{ArtifactFile, Artifacts};
pub use db::{Backend, DatabaseUrl, ExclusiveLock, redact_url};
pub use jobs::{ArtifactRow, Insert, JobRow, JobStatus, NewJob, Recovery, StoredProgress};
pub use keys::{ApiKeyRow, CreatedKey, hash_token};
pub use lease::{Claim, ClaimLimit, Completion, Lease, Reaped, Renewal};

use std::time::Duration;

use db::Db;

/// Why a store operation failed.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database URL is not one the store understands (the URL is shown redacted).
    #[error("database configuration: {0}")]
    Config(String),
    /// The database could not be reached or refused the credentials (the URL is redacted).
    #[error("connecting to {url}: {source}")]
    Connect {
        url: String,
        #[source]
        source: sqlx::Error,
    },
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

/// The SQLite migrations of `migrations/sqlite/`, compiled into the binary.
pub static MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/sqlite");

/// The PostgreSQL migrations of `migrations/postgres/` (same versions, same schema, in
/// PostgreSQL's types). sqlx's PostgreSQL migrator holds a session advisory lock
/// (`pg_advisory_lock`, keyed by the database name) from before it creates its
/// `_sqlx_migrations` table until the last migration is applied, and applies each migration in
/// its own transaction: replicas starting together wait for each other and never see a
/// half-migrated schema.
pub static PG_MIGRATOR: sqlx::migrate::Migrator = sqlx::migrate!("./migrations/postgres");

/// A connection pool onto the job database (SQLite or PostgreSQL). Cheap to clone.
#[derive(Clone, Debug)]
pub struct JobStore {
    db: Db,
}

impl JobStore {
    /// Opens (creating a SQLite file when missing) and migrates the database at `url`
    /// (`sqlite://path`, `sqlite::memory:`, `postgres://user:password@host/db`).
    pub async fn open(url: &str) -> StoreResult<Self> {
        let store = Self::connect(url).await?;
        store.migrate().await?;
        Ok(store)
    }

    /// Opens without migrating. An unknown scheme is a [`StoreError::Config`], an unreachable
    /// server or refused credentials a [`StoreError::Connect`] (URLs redacted in both).
    pub async fn connect(url: &str) -> StoreResult<Self> {
        Ok(Self {
            db: db::connect(url).await?,
        })
    }

    /// Applies the migrations that have not run yet.
    pub async fn migrate(&self) -> StoreResult<()> {
        match &self.db {
            Db::Sqlite(p) => MIGRATOR.run(p).await?,
            Db::Postgres(p) => PG_MIGRATOR.run(p).await?,
        }
        Ok(())
    }

    /// The embedded migrations of this store's backend.
    pub fn migrator(&self) -> &'static sqlx::migrate::Migrator {
        match self.backend() {
            Backend::Sqlite => &MIGRATOR,
            Backend::Postgres => &PG_MIGRATOR,
        }
    }

    /// Which database this store runs on.
    pub fn backend(&self) -> Backend {
        self.db.backend()
    }

    pub(crate) fn db(&self) -> &Db {
        &self.db
    }

    /// One trivial query (`SELECT 1`), within `limit`: whether the database answers now.
    pub async fn ping(&self, limit: Duration) -> StoreResult<()> {
        let query = async {
            match &self.db {
                Db::Sqlite(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
                Db::Postgres(pool) => sqlx::query("SELECT 1").execute(pool).await.map(|_| ()),
            }
        };
        match tokio::time::timeout(limit, query).await {
            Ok(result) => Ok(result?),
            Err(_) => Err(StoreError::Db(sqlx::Error::PoolTimedOut)),
        }
    }

    /// Closes the pool (waits for connections to be returned).
    pub async fn close(&self) {
        self.db.close().await;
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
