//! The two database backends behind one small query interface. Every statement of the store is
//! written once, with `?` placeholders, and run on either pool (or transaction): on PostgreSQL
//! the placeholders become `$1, $2, ...`. Where the dialects really differ (how `queue_order`
//! is drawn, `FOR UPDATE SKIP LOCKED`) the caller branches on [`Backend`]. Arguments are only
//! text and 64-bit integers (the schema has no other types), rows are read through [`Cols`], so
//! one decoder serves both backends.
use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgConnection, PgPool, PgPoolOptions, PgRow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteRow};
use sqlx::{Connection, Postgres, Row, Sqlite, SqlitePool, Transaction};

use super::{StoreError, StoreResult};

/// Which database a store runs on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A pool onto one of the backends.
#[derive(Clone, Debug)]
pub(crate) enum Db {
    Sqlite(SqlitePool),
    Postgres(PgPool),
}

/// A transaction on one of the backends (rolled back when dropped uncommitted).
pub(crate) enum Tx {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// A bound value: the schema stores only text and 64-bit integers.
#[derive(Debug, Clone)]
pub(crate) enum Arg {
    Text(Option<String>),
    Int(Option<i64>),
}

impl From<&str> for Arg {
    fn from(s: &str) -> Self {
        Arg::Text(Some(s.to_string()))
    }
}
impl From<String> for Arg {
    fn from(s: String) -> Self {
        Arg::Text(Some(s))
    }
}
impl From<&String> for Arg {
    fn from(s: &String) -> Self {
        Arg::Text(Some(s.clone()))
    }
}
impl From<Option<&str>> for Arg {
    fn from(s: Option<&str>) -> Self {
        Arg::Text(s.map(String::from))
    }
}
impl From<Option<String>> for Arg {
    fn from(s: Option<String>) -> Self {
        Arg::Text(s)
    }
}
impl From<&Option<String>> for Arg {
    fn from(s: &Option<String>) -> Self {
        Arg::Text(s.clone())
    }
}
impl From<i64> for Arg {
    fn from(i: i64) -> Self {
        Arg::Int(Some(i))
    }
}
impl From<Option<i64>> for Arg {
    fn from(i: Option<i64>) -> Self {
        Arg::Int(i)
    }
}

/// `args![a, b, ...]`: a `Vec<Arg>` from values convertible into [`Arg`].
macro_rules! args {
    ($($a:expr),* $(,)?) => { vec![$($crate::store::db::Arg::from($a)),*] };
}
pub(crate) use args;

/// Typed access to the columns of a row of either backend.
pub(crate) trait Cols {
    fn text(&self, col: &str) -> StoreResult<String>;
    fn opt_text(&self, col: &str) -> StoreResult<Option<String>>;
    fn int(&self, col: &str) -> StoreResult<i64>;
    fn opt_int(&self, col: &str) -> StoreResult<Option<i64>>;
}

macro_rules! impl_cols {
    ($row:ty) => {
        impl Cols for $row {
            fn text(&self, col: &str) -> StoreResult<String> {
                Ok(self.try_get(col)?)
            }
            fn opt_text(&self, col: &str) -> StoreResult<Option<String>> {
                Ok(self.try_get(col)?)
            }
            fn int(&self, col: &str) -> StoreResult<i64> {
                Ok(self.try_get(col)?)
            }
            fn opt_int(&self, col: &str) -> StoreResult<Option<i64>> {
                Ok(self.try_get(col)?)
            }
        }
    };
}
impl_cols!(SqliteRow);
impl_cols!(PgRow);

/// A value read from one row.
pub(crate) trait FromRow: Sized {
    fn from_row(row: &dyn Cols) -> StoreResult<Self>;
}

/// A single integer column named `v` (`SELECT COUNT(*) AS v ...`).
pub(crate) struct Int(pub i64);
impl FromRow for Int {
    fn from_row(row: &dyn Cols) -> StoreResult<Self> {
        row.int("v").map(Int)
    }
}

/// A single text column named `v`.
pub(crate) struct Text(pub String);
impl FromRow for Text {
    fn from_row(row: &dyn Cols) -> StoreResult<Self> {
        row.text("v").map(Text)
    }
}

/// `?` placeholders -> `$1, $2, ...` (outside quoted literals and identifiers).
pub(crate) fn numbered(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let (mut n, mut quote) = (0, None::<char>);
    for c in sql.chars() {
        match (quote, c) {
            (None, '\'' | '"') => quote = Some(c),
            (Some(q), c) if c == q => quote = None,
            (None, '?') => {
                n += 1;
                out.push('$');
                out.push_str(&n.to_string());
                continue;
            }
            _ => {}
        }
        out.push(c);
    }
    out
}

fn bind_sqlite(
    sql: &str,
    args: Vec<Arg>,
) -> sqlx::query::Query<'_, Sqlite, sqlx::sqlite::SqliteArguments<'_>> {
    let mut q = sqlx::query::<Sqlite>(sql);
    for a in args {
        q = match a {
            Arg::Text(t) => q.bind(t),
            Arg::Int(i) => q.bind(i),
        };
    }
    q
}

fn bind_pg(
    sql: &str,
    args: Vec<Arg>,
) -> sqlx::query::Query<'_, Postgres, sqlx::postgres::PgArguments> {
    let mut q = sqlx::query::<Postgres>(sql);
    for a in args {
        q = match a {
            Arg::Text(t) => q.bind(t),
            Arg::Int(i) => q.bind(i),
        };
    }
    q
}

/// `execute`, `fetch_optional`, `fetch_all` and `fetch_one` for a pool or a transaction;
/// `|x| expr` turns the matched pool or transaction into its executor.
macro_rules! exec_methods {
    ($recv:ty, |$x:ident| $exec:expr) => {
        /// Runs a statement; the number of rows it changed.
        pub(crate) async fn execute(self: $recv, sql: &str, args: Vec<Arg>) -> StoreResult<u64> {
            Ok(match self {
                Self::Sqlite($x) => bind_sqlite(sql, args).execute($exec).await?.rows_affected(),
                Self::Postgres($x) => {
                    let sql = numbered(sql);
                    bind_pg(&sql, args).execute($exec).await?.rows_affected()
                }
            })
        }

        /// The rows of a query.
        pub(crate) async fn fetch_all<T: FromRow>(
            self: $recv,
            sql: &str,
            args: Vec<Arg>,
        ) -> StoreResult<Vec<T>> {
            match self {
                Self::Sqlite($x) => {
                    let rows = bind_sqlite(sql, args).fetch_all($exec).await?;
                    rows.iter().map(|r| T::from_row(r)).collect()
                }
                Self::Postgres($x) => {
                    let sql = numbered(sql);
                    let rows = bind_pg(&sql, args).fetch_all($exec).await?;
                    rows.iter().map(|r| T::from_row(r)).collect()
                }
            }
        }

        /// The first row of a query, if any.
        pub(crate) async fn fetch_optional<T: FromRow>(
            self: $recv,
            sql: &str,
            args: Vec<Arg>,
        ) -> StoreResult<Option<T>> {
            match self {
                Self::Sqlite($x) => {
                    let row = bind_sqlite(sql, args).fetch_optional($exec).await?;
                    row.as_ref().map(|r| T::from_row(r)).transpose()
                }
                Self::Postgres($x) => {
                    let sql = numbered(sql);
                    let row = bind_pg(&sql, args).fetch_optional($exec).await?;
                    row.as_ref().map(|r| T::from_row(r)).transpose()
                }
            }
        }
    };
}

impl Db {
    exec_methods!(&Self, |p| p);

    /// The one row of a query (an aggregate).
    pub(crate) async fn fetch_one<T: FromRow>(&self, sql: &str, args: Vec<Arg>) -> StoreResult<T> {
        self.fetch_optional(sql, args)
            .await?
            .ok_or_else(|| StoreError::Corrupt(format!("no row from: {sql}")))
    }

    pub(crate) fn backend(&self) -> Backend {
        match self {
            Db::Sqlite(_) => Backend::Sqlite,
            Db::Postgres(_) => Backend::Postgres,
        }
    }

    /// A transaction. On SQLite it takes the write lock at once (`BEGIN IMMEDIATE`): a
    /// transaction that reads before it writes could otherwise fail to upgrade its lock under
    /// WAL, and it serialises claims on the one file.
    pub(crate) async fn begin(&self) -> StoreResult<Tx> {
        Ok(match self {
            Db::Sqlite(p) => Tx::Sqlite(p.begin_with("BEGIN IMMEDIATE").await?),
            Db::Postgres(p) => Tx::Postgres(p.begin().await?),
        })
    }

    pub(crate) async fn close(&self) {
        match self {
            Db::Sqlite(p) => p.close().await,
            Db::Postgres(p) => p.close().await,
        }
    }

    /// The lock `key` if nobody holds it now (`None` otherwise): on PostgreSQL a session
    /// advisory lock (`pg_try_advisory_lock`) on a connection of its own, which is closed, not
    /// returned to the pool, when the lock is dropped, so the server releases the lock however
    /// its holder ends (a killed replica's session ends with its TCP connection). On SQLite (one
    /// file, one server) it is always granted.
    pub(crate) async fn try_lock(&self, key: i64) -> StoreResult<Option<ExclusiveLock>> {
        match self {
            Db::Sqlite(_) => Ok(Some(ExclusiveLock { _conn: None })),
            Db::Postgres(p) => {
                let mut conn = p.acquire().await?;
                conn.close_on_drop();
                let granted: bool = sqlx::query_scalar("SELECT pg_try_advisory_lock($1)")
                    .bind(key)
                    .fetch_one(&mut *conn)
                    .await?;
                Ok(granted.then_some(ExclusiveLock { _conn: Some(conn) }))
            }
        }
    }
}

/// A lock held across replicas until dropped ([`Db::try_lock`]).
pub struct ExclusiveLock {
    _conn: Option<sqlx::pool::PoolConnection<Postgres>>,
}

impl std::fmt::Debug for ExclusiveLock {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ExclusiveLock")
    }
}

impl Tx {
    exec_methods!(&mut Self, |t| &mut **t);

    pub(crate) async fn commit(self) -> StoreResult<()> {
        match self {
            Tx::Sqlite(t) => t.commit().await?,
            Tx::Postgres(t) => t.commit().await?,
        }
        Ok(())
    }

    /// Rolls back now. A transaction merely dropped is rolled back later, when its connection
    /// is next used: until then its row locks stay, and `SKIP LOCKED` claimers skip those rows.
    pub(crate) async fn rollback(self) -> StoreResult<()> {
        match self {
            Tx::Sqlite(t) => t.rollback().await?,
            Tx::Postgres(t) => t.rollback().await?,
        }
        Ok(())
    }
}

/// A database URL from the command line or environment: Debug and Display show it with the
/// password redacted; [`DatabaseUrl::expose`] gives it whole, to connect with.
#[derive(Clone, PartialEq, Eq)]
pub struct DatabaseUrl(String);

impl DatabaseUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    /// The URL with its password, for connecting only.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DatabaseUrl({})", redact_url(&self.0))
    }
}

impl std::fmt::Display for DatabaseUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&redact_url(&self.0))
    }
}

impl FromStr for DatabaseUrl {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Self(s.to_string()))
    }
}

/// The URL with any password replaced by `***` (for logs and error messages).
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (authority, tail) = match rest.find(['/', '?']) {
        Some(i) => rest.split_at(i),
        None => (rest, ""),
    };
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return redact_query(url);
    };
    let user = userinfo.split_once(':').map_or(userinfo, |(u, _)| u);
    let redacted = if userinfo.contains(':') {
        format!("{scheme}://{user}:***@{host}{tail}")
    } else {
        format!("{scheme}://{user}@{host}{tail}")
    };
    redact_query(&redacted)
}

/// `password=...` in a query string becomes `password=***`.
fn redact_query(url: &str) -> String {
    let Some((base, query)) = url.split_once('?') else {
        return url.to_string();
    };
    let parts: Vec<String> = query
        .split('&')
        .map(|kv| match kv.split_once('=') {
            Some((k, _)) if k.eq_ignore_ascii_case("password") => format!("{k}=***"),
            _ => kv.to_string(),
        })
        .collect();
    format!("{base}?{}", parts.join("&"))
}

/// How long connecting to PostgreSQL may take before it is reported unreachable.
const PG_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// Opens a pool for `url`: `sqlite://path` (created when missing), `sqlite::memory:`, or
/// `postgres://` / `postgresql://`.
pub(crate) async fn connect(url: &str) -> StoreResult<Db> {
    let shown = redact_url(url);
    let connect_err = |source: sqlx::Error| StoreError::Connect {
        url: shown.clone(),
        source,
    };
    if url.starts_with("sqlite:") {
        let memory = url.contains(":memory:");
        let options = SqliteConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("{shown}: {e}")))?
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
            .await
            .map_err(connect_err)?;
        Ok(Db::Sqlite(pool))
    } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let options = PgConnectOptions::from_str(url)
            .map_err(|e| StoreError::Config(format!("{shown}: {}", redact_url(&e.to_string()))))?;
        // One direct connection first: the pool would retry until its timeout and then report
        // only "pool timed out", hiding "connection refused" or "password authentication
        // failed".
        let first = tokio::time::timeout(PG_CONNECT_TIMEOUT, PgConnection::connect_with(&options))
            .await
            .map_err(|_| connect_err(sqlx::Error::PoolTimedOut))?
            .map_err(connect_err)?;
        let _ = first.close().await;
        let pool = PgPoolOptions::new()
            .max_connections(8)
            .acquire_timeout(PG_CONNECT_TIMEOUT)
            .connect_with(options)
            .await
            .map_err(connect_err)?;
        Ok(Db::Postgres(pool))
    } else {
        Err(StoreError::Config(format!(
            "unknown database URL '{shown}': expected sqlite://PATH, sqlite::memory: or postgres://USER:PASSWORD@HOST/DB"
        )))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_are_numbered_outside_literals() {
        assert_eq!(
            numbered("SELECT a FROM t WHERE b = ? AND c = '?' AND d IN (?, ?)"),
            "SELECT a FROM t WHERE b = $1 AND c = '?' AND d IN ($2, $3)"
        );
    }

    #[test]
    fn passwords_never_show() {
        assert_eq!(
            redact_url("postgres://afa:s3cret@db:5432/afa?sslmode=disable"),
            "postgres://afa:***@db:5432/afa?sslmode=disable"
        );
        assert_eq!(
            redact_url("postgres://afa@db/afa?password=s3cret&x=1"),
            "postgres://afa@db/afa?password=***&x=1"
        );
        assert_eq!(redact_url("postgres://db/afa"), "postgres://db/afa");
        assert_eq!(redact_url("sqlite://afa.db"), "sqlite://afa.db");
        assert_eq!(
            redact_url("postgres://u:p@ss:w@rd@h/d"),
            "postgres://u:***@h/d"
        );
        let url: DatabaseUrl = "postgres://afa:s3cret@db/afa".parse().unwrap();
        assert!(!format!("{url:?} {url}").contains("s3cret"));
        assert!(url.expose().contains("s3cret"));
    }
}
