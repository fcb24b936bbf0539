//! Job rows and their state transitions. Every transition is one conditional `UPDATE` (the
//! `WHERE status ...` clause is the state machine), so a racing cancel and completion cannot
//! both win. `queued -> running -> succeeded | failed | queued (retry, recovery)`, and
//! `queued | running -> cancelled | failed`.
use std::str::FromStr;

use serde_json::Value;

use super::db::{Arg, Backend, Cols, ExclusiveLock, FromRow, Int, Text, args};
use super::{JobStore, StoreError, StoreResult, now_ms, random_hex};

/// Where a job is in its life.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobStatus {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobStatus {
    pub fn as_str(self) -> &'static str {
        match self {
            JobStatus::Queued => "queued",
            JobStatus::Running => "running",
            JobStatus::Succeeded => "succeeded",
            JobStatus::Failed => "failed",
            JobStatus::Cancelled => "cancelled",
        }
    }

    /// Succeeded, failed or cancelled: nothing will change any more.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            JobStatus::Succeeded | JobStatus::Failed | JobStatus::Cancelled
        )
    }
}

impl FromStr for JobStatus {
    type Err = StoreError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(match s {
            "queued" => JobStatus::Queued,
            "running" => JobStatus::Running,
            "succeeded" => JobStatus::Succeeded,
            "failed" => JobStatus::Failed,
            "cancelled" => JobStatus::Cancelled,
            other => return Err(StoreError::Corrupt(format!("job status '{other}'"))),
        })
    }
}

/// A job to insert.
#[derive(Debug, Clone, PartialEq)]
pub struct NewJob {
    pub ensemble: String,
    /// The validated request with every default resolved.
    pub params: Value,
    pub seeds: Vec<u64>,
    /// The API key that owns the job (`None`: the operator's `--api-key`s or an open server).
    pub owner: Option<String>,
    /// `(Idempotency-Key, hash of the request)`.
    pub idempotency: Option<(String, String)>,
    /// Jobs with the same key may share a batch: one claim takes several of them (`None`: the
    /// job is claimed alone). Only a hint for claiming; the worker batches by its own key.
    pub batch_key: Option<String>,
}

/// A stored job.
#[derive(Debug, Clone, PartialEq)]
pub struct JobRow {
    pub id: String,
    pub queue_order: i64,
    pub status: JobStatus,
    pub ensemble: String,
    pub params: Value,
    pub seeds: Vec<u64>,
    pub images: usize,
    pub owner: Option<String>,
    pub idempotency_key: Option<String>,
    pub request_hash: Option<String>,
    pub attempts: u32,
    pub error: Option<String>,
    pub timings: Option<Value>,
    /// Unix milliseconds.
    pub created_at: i64,
    pub started_at: Option<i64>,
    pub finished_at: Option<i64>,
    pub batch_key: Option<String>,
    /// The replica holding the job's lease (kept after it finished: who ran it last).
    pub lease_owner: Option<String>,
    /// Unix milliseconds; a `running` job whose lease expired goes back to the queue.
    pub lease_expires_at: Option<i64>,
    /// What the lease holder last wrote of a running job's progress (`None` before it wrote).
    pub progress: Option<StoredProgress>,
}

/// A running job's progress as its lease holder wrote it ([`JobStore::record_progress`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StoredProgress {
    /// Images ahead of it in the holder's worker queue; `None` once it runs.
    pub position: Option<usize>,
    pub step: usize,
    pub total: usize,
    /// When it was written (unix ms, the holder's clock).
    pub at: i64,
}

/// One file of a finished job.
#[derive(Debug, Clone, PartialEq)]
pub struct ArtifactRow {
    pub job_id: String,
    pub index: usize,
    /// `png`, `jpeg`, `webp` (the image) or `maps`.
    pub kind: String,
    /// Relative to the data dir.
    pub path: String,
    pub sha256: String,
    pub bytes: u64,
}

/// What `insert_job` did.
#[derive(Debug, Clone, PartialEq)]
pub enum Insert {
    Created(JobRow),
    /// The idempotency key was seen with the same request: the earlier job.
    Existing(JobRow),
    /// The idempotency key was seen with another request.
    Conflict(JobRow),
}

/// What start-up recovery did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Recovery {
    /// Interrupted `running` jobs put back in the queue (in queue order).
    pub requeued: Vec<String>,
    /// Interrupted jobs that had used up their attempts.
    pub failed: Vec<String>,
    /// Jobs now waiting, including `requeued`.
    pub queued: usize,
}

/// The advisory-lock key of the expiry sweep (PostgreSQL; "afa-swp" in ASCII). sqlx's
/// migrator keys its own lock by a hash of the database name, so they do not meet.
const SWEEP_LOCK: i64 = 0x0061_6661_2d73_7770;

pub(crate) const COLUMNS: &str = "id, queue_order, status, ensemble, params, seeds, images, \
    owner_key_id, idempotency_key, request_hash, attempts, error, timings, created_at, \
    started_at, finished_at, batch_key, lease_owner, lease_expires_at, worker_position, \
    progress_step, progress_total, progress_at";

fn json(text: &str, col: &str) -> StoreResult<Value> {
    serde_json::from_str(text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
}

impl FromRow for JobRow {
    fn from_row(row: &dyn Cols) -> StoreResult<Self> {
        let seeds: Vec<u64> = serde_json::from_value(json(&row.text("seeds")?, "seeds")?)
            .map_err(|e| StoreError::Corrupt(format!("seeds: {e}")))?;
        let timings = row
            .opt_text("timings")?
            .map(|t| json(&t, "timings"))
            .transpose()?;
        Ok(JobRow {
            id: row.text("id")?,
            queue_order: row.int("queue_order")?,
            status: row.text("status")?.parse()?,
            ensemble: row.text("ensemble")?,
            params: json(&row.text("params")?, "params")?,
            seeds,
            images: row.int("images")?.max(0) as usize,
            owner: row.opt_text("owner_key_id")?,
            idempotency_key: row.opt_text("idempotency_key")?,
            request_hash: row.opt_text("request_hash")?,
            attempts: row.int("attempts")?.max(0) as u32,
            error: row.opt_text("error")?,
            timings,
            created_at: row.int("created_at")?,
            started_at: row.opt_int("started_at")?,
            finished_at: row.opt_int("finished_at")?,
            batch_key: row.opt_text("batch_key")?,
            lease_owner: row.opt_text("lease_owner")?,
            lease_expires_at: row.opt_int("lease_expires_at")?,
            progress: match row.opt_int("progress_at")? {
                None => None,
                Some(at) => Some(StoredProgress {
                    position: row.opt_int("worker_position")?.map(|p| p.max(0) as usize),
                    step: row.opt_int("progress_step")?.unwrap_or(0).max(0) as usize,
                    total: row.opt_int("progress_total")?.unwrap_or(0).max(0) as usize,
                    at,
                }),
            },
        })
    }
}

impl FromRow for ArtifactRow {
    fn from_row(row: &dyn Cols) -> StoreResult<Self> {
        Ok(ArtifactRow {
            job_id: row.text("job_id")?,
            index: row.int("idx")?.max(0) as usize,
            kind: row.text("kind")?,
            path: row.text("path")?,
            sha256: row.text("sha256")?,
            bytes: row.int("bytes")?.max(0) as u64,
        })
    }
}

fn is_unique_violation(e: &StoreError) -> bool {
    matches!(e, StoreError::Db(sqlx::Error::Database(d)) if d.is_unique_violation())
}

impl JobStore {
    /// Inserts a queued job, or answers with the job an idempotency key already names.
    pub async fn insert_job(&self, job: &NewJob) -> StoreResult<Insert> {
        // A concurrent insert with the same key loses on the unique index and reads the winner.
        for _ in 0..3 {
            if let Some(found) = self.find_idempotent(job).await? {
                return Ok(found);
            }
            match self.try_insert(job).await {
                Ok(row) => return Ok(Insert::Created(row)),
                Err(e) if is_unique_violation(&e) => continue,
                Err(e) => return Err(e),
            }
        }
        Err(StoreError::Corrupt(
            "could not insert a job after 3 attempts".into(),
        ))
    }

    /// The job `job`'s idempotency key already names (`Existing` when the request hash is the
    /// same, `Conflict` when not), if any.
    pub async fn find_idempotent(&self, job: &NewJob) -> StoreResult<Option<Insert>> {
        let Some((key, hash)) = &job.idempotency else {
            return Ok(None);
        };
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs WHERE idempotency_key = ? \
             AND owner_key_id IS NOT DISTINCT FROM ?"
        );
        let row: Option<JobRow> = self
            .db()
            .fetch_optional(&sql, args![key, &job.owner])
            .await?;
        let Some(row) = row else { return Ok(None) };
        Ok(Some(if row.request_hash.as_deref() == Some(hash) {
            Insert::Existing(row)
        } else {
            Insert::Conflict(row)
        }))
    }

    async fn try_insert(&self, job: &NewJob) -> StoreResult<JobRow> {
        let id = format!("job_{}", random_hex(12)?);
        let (key, hash) = job.idempotency.clone().unzip();
        // One SQLite file has one writer at a time: MAX + 1 is safe there. Replicas insert into
        // PostgreSQL concurrently: the column is an identity (a sequence).
        let (order_col, order_val) = match self.backend() {
            Backend::Sqlite => (
                "queue_order, ",
                "(SELECT COALESCE(MAX(queue_order), 0) + 1 FROM jobs), ",
            ),
            Backend::Postgres => ("", ""),
        };
        let sql = format!(
            "INSERT INTO jobs (id, {order_col}status, ensemble, params, seeds, images, \
             owner_key_id, idempotency_key, request_hash, batch_key, created_at) \
             VALUES (?, {order_val}'queued', ?, ?, ?, ?, ?, ?, ?, ?, ?)"
        );
        let seeds = serde_json::to_string(&job.seeds).unwrap_or_default();
        let values = args![
            &id,
            &job.ensemble,
            job.params.to_string(),
            seeds,
            job.seeds.len() as i64,
            &job.owner,
            key,
            hash,
            &job.batch_key,
            now_ms(),
        ];
        self.db().execute(&sql, values).await?;
        self.job(&id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("job {id} vanished after insert")))
    }

    /// The job `id`, whoever owns it.
    pub async fn job(&self, id: &str) -> StoreResult<Option<JobRow>> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?");
        self.db().fetch_optional(&sql, args![id]).await
    }

    /// The job `id` when `owner` owns it (another owner's job is `None`, as if absent).
    pub async fn job_for(&self, id: &str, owner: Option<&str>) -> StoreResult<Option<JobRow>> {
        Ok(self.job(id).await?.filter(|j| j.owner.as_deref() == owner))
    }

    /// The first queued job in submission order.
    pub async fn next_queued(&self) -> StoreResult<Option<JobRow>> {
        let sql = format!(
            "SELECT {COLUMNS} FROM jobs WHERE status = 'queued' ORDER BY queue_order LIMIT 1"
        );
        self.db().fetch_optional(&sql, vec![]).await
    }

    /// Images ahead of a queued job in the shared queue: those of queued jobs before it
    /// (`queue_order` smaller) and of every running job (on any replica).
    pub async fn images_ahead(&self, queue_order: i64) -> StoreResult<usize> {
        let Int(n) = self
            .db()
            .fetch_one(
                "SELECT CAST(COALESCE(SUM(images), 0) AS BIGINT) AS v FROM jobs \
                 WHERE (status = 'queued' AND queue_order < ?) OR status = 'running'",
                args![queue_order],
            )
            .await?;
        Ok(n.max(0) as usize)
    }

    /// Images of `owner`'s queued and running jobs.
    pub async fn active_images(&self, owner: Option<&str>) -> StoreResult<usize> {
        let Int(n) = self
            .db()
            .fetch_one(
                "SELECT CAST(COALESCE(SUM(images), 0) AS BIGINT) AS v FROM jobs \
                 WHERE status IN ('queued', 'running') AND owner_key_id IS NOT DISTINCT FROM ?",
                args![owner],
            )
            .await?;
        Ok(n.max(0) as usize)
    }

    /// `queued -> running` (one more attempt) without a lease (the one-process dispatcher);
    /// false when the job is no longer queued. Replicas sharing a queue use
    /// [`JobStore::claim`] instead.
    pub async fn mark_running(&self, id: &str) -> StoreResult<bool> {
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?, \
                 lease_owner = NULL, lease_id = NULL, lease_expires_at = NULL \
                 WHERE id = ? AND status = 'queued'",
                args![now_ms(), id],
            )
            .await?;
        Ok(n == 1)
    }

    /// `running -> succeeded` with its artifacts and timings, in one transaction; false (and
    /// nothing recorded) when the job is no longer running (cancelled meanwhile).
    pub async fn complete(
        &self,
        id: &str,
        artifacts: &[ArtifactRow],
        timings: &Value,
    ) -> StoreResult<bool> {
        self.complete_where(id, None, artifacts, timings).await
    }

    /// `complete`, fenced by `lease_id` when given.
    pub(super) async fn complete_where(
        &self,
        id: &str,
        lease_id: Option<&str>,
        artifacts: &[ArtifactRow],
        timings: &Value,
    ) -> StoreResult<bool> {
        let mut tx = self.db().begin().await?;
        let fence = if lease_id.is_some() {
            " AND lease_id = ?"
        } else {
            ""
        };
        let mut values = args![timings.to_string(), now_ms(), id];
        values.extend(lease_id.map(Arg::from));
        let sql = format!(
            "UPDATE jobs SET status = 'succeeded', timings = ?, error = NULL, finished_at = ? \
             WHERE id = ? AND status = 'running'{fence}"
        );
        if tx.execute(&sql, values).await? != 1 {
            tx.rollback().await?; // nothing changed; no lock left behind
            return Ok(false);
        }
        for a in artifacts {
            tx.execute(
                "INSERT INTO artifacts (job_id, idx, kind, path, sha256, bytes) \
                 VALUES (?, ?, ?, ?, ?, ?)",
                args![
                    id,
                    a.index as i64,
                    &a.kind,
                    &a.path,
                    &a.sha256,
                    a.bytes as i64
                ],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// `queued | running -> failed` with `reason`; false when already finished.
    pub async fn fail(&self, id: &str, reason: &str) -> StoreResult<bool> {
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? \
                 WHERE id = ? AND status IN ('queued', 'running')",
                args![reason, now_ms(), id],
            )
            .await?;
        Ok(n == 1)
    }

    /// `running -> queued` (a retry keeps its place in the queue); `reason` is kept as the last
    /// error. False when the job is not running.
    pub async fn requeue(&self, id: &str, reason: Option<&str>) -> StoreResult<bool> {
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET status = 'queued', error = COALESCE(?, error), \
                 lease_owner = NULL, lease_id = NULL, lease_expires_at = NULL \
                 WHERE id = ? AND status = 'running'",
                args![reason, id],
            )
            .await?;
        Ok(n == 1)
    }

    /// `queued | running -> cancelled`; the status before, or `None` when it was finished.
    /// The lease columns stay: the holder learns of the cancel at its next renewal.
    /// (No read-then-write transaction: under WAL that can fail to upgrade its lock.)
    pub async fn cancel(&self, id: &str) -> StoreResult<Option<JobStatus>> {
        let before: Option<Text> = self
            .db()
            .fetch_optional("SELECT status AS v FROM jobs WHERE id = ?", args![id])
            .await?;
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET status = 'cancelled', error = 'cancelled by the client', \
                 finished_at = ? WHERE id = ? AND status IN ('queued', 'running')",
                args![now_ms(), id],
            )
            .await?;
        match before {
            Some(Text(s)) if n == 1 => Ok(Some(s.parse()?)),
            _ => Ok(None),
        }
    }

    /// Start-up recovery. On SQLite (one file, one server) every `running` job was
    /// interrupted by the previous process; on PostgreSQL those without a lease or with an
    /// expired one were (jobs other replicas hold under a live lease are left alone). Jobs with
    /// attempts left go back to `queued` (keeping their place); the others fail with a reason.
    pub async fn recover(&self, max_attempts: u32) -> StoreResult<Recovery> {
        let cond = match self.backend() {
            Backend::Sqlite => None,
            Backend::Postgres => Some(format!(
                "lease_expires_at IS NULL OR lease_expires_at < {}",
                self.db_now()
            )),
        };
        let (requeued, failed) = self
            .return_interrupted(
                cond.as_deref(),
                max_attempts,
                "interrupted by a server restart; run again",
            )
            .await?;
        let Int(queued) = self
            .db()
            .fetch_one(
                "SELECT COUNT(*) AS v FROM jobs WHERE status = 'queued'",
                vec![],
            )
            .await?;
        Ok(Recovery {
            requeued,
            failed,
            queued: queued.max(0) as usize,
        })
    }

    /// The artifacts of a job, by index then kind.
    pub async fn artifacts(&self, id: &str) -> StoreResult<Vec<ArtifactRow>> {
        self.db()
            .fetch_all(
                "SELECT job_id, idx, kind, path, sha256, bytes FROM artifacts \
                 WHERE job_id = ? ORDER BY idx, kind",
                args![id],
            )
            .await
    }

    /// Finished jobs whose `finished_at` is before `before_ms` (at most `limit`).
    pub async fn expired(&self, before_ms: i64, limit: i64) -> StoreResult<Vec<String>> {
        let ids: Vec<Text> = self
            .db()
            .fetch_all(
                "SELECT id AS v FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') \
                 AND finished_at < ? ORDER BY finished_at LIMIT ?",
                args![before_ms, limit],
            )
            .await?;
        Ok(ids.into_iter().map(|Text(id)| id).collect())
    }

    /// The expiry sweep's lock: one replica sweeps at a time (`None`: another one is sweeping
    /// now). Held until dropped.
    pub async fn try_sweep_lock(&self) -> StoreResult<Option<ExclusiveLock>> {
        self.db().try_lock(SWEEP_LOCK).await
    }

    /// Deletes a job row and its artifact rows.
    pub async fn delete_job(&self, id: &str) -> StoreResult<()> {
        self.db()
            .execute("DELETE FROM jobs WHERE id = ?", args![id])
            .await?;
        Ok(())
    }
}
