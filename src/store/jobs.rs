//! Job rows and their state transitions. Every transition is one conditional `UPDATE` (the
//! `WHERE status ...` clause is the state machine), so a racing cancel and completion cannot
//! both win. `queued -> running -> succeeded | failed | queued (retry, recovery)`, and
//! `queued | running -> cancelled | failed`.
use std::str::FromStr;

use serde_json::Value;
use sqlx::Row;
use sqlx::sqlite::SqliteRow;

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

const COLUMNS: &str = "id, queue_order, status, ensemble, params, seeds, images, owner_key_id, \
    idempotency_key, request_hash, attempts, error, timings, created_at, started_at, finished_at";

fn job_from_row(row: &SqliteRow) -> StoreResult<JobRow> {
    let json = |col: &str| -> StoreResult<Value> {
        let text: String = row.try_get(col)?;
        serde_json::from_str(&text).map_err(|e| StoreError::Corrupt(format!("{col}: {e}")))
    };
    let seeds: Vec<u64> = serde_json::from_value(json("seeds")?)
        .map_err(|e| StoreError::Corrupt(format!("seeds: {e}")))?;
    let timings: Option<String> = row.try_get("timings")?;
    let timings = timings
        .map(|t| serde_json::from_str(&t))
        .transpose()
        .map_err(|e| StoreError::Corrupt(format!("timings: {e}")))?;
    let status: String = row.try_get("status")?;
    Ok(JobRow {
        id: row.try_get("id")?,
        queue_order: row.try_get("queue_order")?,
        status: status.parse()?,
        ensemble: row.try_get("ensemble")?,
        params: json("params")?,
        seeds,
        images: row.try_get::<i64, _>("images")? as usize,
        owner: row.try_get("owner_key_id")?,
        idempotency_key: row.try_get("idempotency_key")?,
        request_hash: row.try_get("request_hash")?,
        attempts: row.try_get::<i64, _>("attempts")? as u32,
        error: row.try_get("error")?,
        timings,
        created_at: row.try_get("created_at")?,
        started_at: row.try_get("started_at")?,
        finished_at: row.try_get("finished_at")?,
    })
}

fn artifact_from_row(row: &SqliteRow) -> StoreResult<ArtifactRow> {
    Ok(ArtifactRow {
        job_id: row.try_get("job_id")?,
        index: row.try_get::<i64, _>("idx")? as usize,
        kind: row.try_get("kind")?,
        path: row.try_get("path")?,
        sha256: row.try_get("sha256")?,
        bytes: row.try_get::<i64, _>("bytes")? as u64,
    })
}

fn is_unique_violation(e: &sqlx::Error) -> bool {
    matches!(e, sqlx::Error::Database(d) if d.is_unique_violation())
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
                Err(StoreError::Db(e)) if is_unique_violation(&e) => continue,
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
        let sql =
            format!("SELECT {COLUMNS} FROM jobs WHERE idempotency_key = ? AND owner_key_id IS ?");
        let row = sqlx::query(&sql)
            .bind(key)
            .bind(&job.owner)
            .fetch_optional(self.pool())
            .await?;
        let Some(row) = row else { return Ok(None) };
        let row = job_from_row(&row)?;
        Ok(Some(if row.request_hash.as_deref() == Some(hash) {
            Insert::Existing(row)
        } else {
            Insert::Conflict(row)
        }))
    }

    async fn try_insert(&self, job: &NewJob) -> StoreResult<JobRow> {
        let id = format!("job_{}", random_hex(12)?);
        let (key, hash) = job.idempotency.clone().unzip();
        sqlx::query(
            "INSERT INTO jobs (id, queue_order, status, ensemble, params, seeds, images, \
             owner_key_id, idempotency_key, request_hash, created_at) \
             VALUES (?, (SELECT COALESCE(MAX(queue_order), 0) + 1 FROM jobs), 'queued', \
             ?, ?, ?, ?, ?, ?, ?, ?)",
        )
        .bind(&id)
        .bind(&job.ensemble)
        .bind(job.params.to_string())
        .bind(serde_json::to_string(&job.seeds).unwrap_or_default())
        .bind(job.seeds.len() as i64)
        .bind(&job.owner)
        .bind(key)
        .bind(hash)
        .bind(now_ms())
        .execute(self.pool())
        .await?;
        self.job(&id)
            .await?
            .ok_or_else(|| StoreError::NotFound(format!("job {id} vanished after insert")))
    }

    /// The job `id`, whoever owns it.
    pub async fn job(&self, id: &str) -> StoreResult<Option<JobRow>> {
        let sql = format!("SELECT {COLUMNS} FROM jobs WHERE id = ?");
        let row = sqlx::query(&sql)
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        row.as_ref().map(job_from_row).transpose()
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
        let row = sqlx::query(&sql).fetch_optional(self.pool()).await?;
        row.as_ref().map(job_from_row).transpose()
    }

    /// Images of queued jobs submitted before the job at `queue_order`.
    pub async fn queued_images_before(&self, queue_order: i64) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(images), 0) FROM jobs WHERE status = 'queued' AND queue_order < ?",
        )
        .bind(queue_order)
        .fetch_one(self.pool())
        .await?;
        Ok(n as usize)
    }

    /// Images of `owner`'s queued and running jobs.
    pub async fn active_images(&self, owner: Option<&str>) -> StoreResult<usize> {
        let n: i64 = sqlx::query_scalar(
            "SELECT COALESCE(SUM(images), 0) FROM jobs \
             WHERE status IN ('queued', 'running') AND owner_key_id IS ?",
        )
        .bind(owner)
        .fetch_one(self.pool())
        .await?;
        Ok(n as usize)
    }

    /// `queued -> running` (one more attempt); false when the job is no longer queued.
    pub async fn mark_running(&self, id: &str) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ? \
             WHERE id = ? AND status = 'queued'",
        )
        .bind(now_ms())
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// `running -> succeeded` with its artifacts and timings, in one transaction; false (and
    /// nothing recorded) when the job is no longer running (cancelled meanwhile).
    pub async fn complete(
        &self,
        id: &str,
        artifacts: &[ArtifactRow],
        timings: &Value,
    ) -> StoreResult<bool> {
        let mut tx = self.pool().begin().await?;
        let r = sqlx::query(
            "UPDATE jobs SET status = 'succeeded', timings = ?, error = NULL, finished_at = ? \
             WHERE id = ? AND status = 'running'",
        )
        .bind(timings.to_string())
        .bind(now_ms())
        .bind(id)
        .execute(&mut *tx)
        .await?;
        if r.rows_affected() != 1 {
            tx.rollback().await?;
            return Ok(false);
        }
        for a in artifacts {
            sqlx::query(
                "INSERT INTO artifacts (job_id, idx, kind, path, sha256, bytes) \
                 VALUES (?, ?, ?, ?, ?, ?)",
            )
            .bind(id)
            .bind(a.index as i64)
            .bind(&a.kind)
            .bind(&a.path)
            .bind(&a.sha256)
            .bind(a.bytes as i64)
            .execute(&mut *tx)
            .await?;
        }
        tx.commit().await?;
        Ok(true)
    }

    /// `queued | running -> failed` with `reason`; false when already finished.
    pub async fn fail(&self, id: &str, reason: &str) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? \
             WHERE id = ? AND status IN ('queued', 'running')",
        )
        .bind(reason)
        .bind(now_ms())
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// `running -> queued` (a retry keeps its place in the queue); `reason` is kept as the last
    /// error. False when the job is not running.
    pub async fn requeue(&self, id: &str, reason: Option<&str>) -> StoreResult<bool> {
        let r = sqlx::query(
            "UPDATE jobs SET status = 'queued', error = COALESCE(?, error) \
             WHERE id = ? AND status = 'running'",
        )
        .bind(reason)
        .bind(id)
        .execute(self.pool())
        .await?;
        Ok(r.rows_affected() == 1)
    }

    /// `queued | running -> cancelled`; the status before, or `None` when it was finished.
    /// (No read-then-write transaction: under WAL that can fail to upgrade its lock.)
    pub async fn cancel(&self, id: &str) -> StoreResult<Option<JobStatus>> {
        let before: Option<String> = sqlx::query_scalar("SELECT status FROM jobs WHERE id = ?")
            .bind(id)
            .fetch_optional(self.pool())
            .await?;
        let r = sqlx::query(
            "UPDATE jobs SET status = 'cancelled', error = 'cancelled by the client', \
             finished_at = ? WHERE id = ? AND status IN ('queued', 'running')",
        )
        .bind(now_ms())
        .bind(id)
        .execute(self.pool())
        .await?;
        match before {
            Some(s) if r.rows_affected() == 1 => Ok(Some(s.parse()?)),
            _ => Ok(None),
        }
    }

    /// Start-up recovery: every `running` job was interrupted by the previous process. Jobs with
    /// attempts left go back to `queued` (keeping their place); the others fail with a reason.
    pub async fn recover(&self, max_attempts: u32) -> StoreResult<Recovery> {
        let mut tx = self.pool().begin().await?;
        let rows = sqlx::query(
            "SELECT id, attempts FROM jobs WHERE status = 'running' ORDER BY queue_order",
        )
        .fetch_all(&mut *tx)
        .await?;
        let mut out = Recovery::default();
        for row in rows {
            let id: String = row.try_get("id")?;
            let attempts = row.try_get::<i64, _>("attempts")? as u32;
            if attempts >= max_attempts {
                let reason = format!(
                    "interrupted {attempts} times (the server stopped while it ran); giving up"
                );
                sqlx::query(
                    "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
                )
                .bind(reason)
                .bind(now_ms())
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                out.failed.push(id);
            } else {
                sqlx::query(
                    "UPDATE jobs SET status = 'queued', \
                     error = 'interrupted by a server restart; run again' WHERE id = ?",
                )
                .bind(&id)
                .execute(&mut *tx)
                .await?;
                out.requeued.push(id);
            }
        }
        let queued: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM jobs WHERE status = 'queued'")
            .fetch_one(&mut *tx)
            .await?;
        tx.commit().await?;
        out.queued = queued as usize;
        Ok(out)
    }

    /// The artifacts of a job, by index then kind.
    pub async fn artifacts(&self, id: &str) -> StoreResult<Vec<ArtifactRow>> {
        let rows = sqlx::query(
            "SELECT job_id, idx, kind, path, sha256, bytes FROM artifacts \
             WHERE job_id = ? ORDER BY idx, kind",
        )
        .bind(id)
        .fetch_all(self.pool())
        .await?;
        rows.iter().map(artifact_from_row).collect()
    }

    /// Finished jobs whose `finished_at` is before `before_ms` (at most `limit`).
    pub async fn expired(&self, before_ms: i64, limit: i64) -> StoreResult<Vec<String>> {
        let ids = sqlx::query_scalar(
            "SELECT id FROM jobs WHERE status IN ('succeeded', 'failed', 'cancelled') \
             AND finished_at < ? ORDER BY finished_at LIMIT ?",
        )
        .bind(before_ms)
        .bind(limit)
        .fetch_all(self.pool())
        .await?;
        Ok(ids)
    }

    /// Deletes a job row and its artifact rows.
    pub async fn delete_job(&self, id: &str) -> StoreResult<()> {
        sqlx::query("DELETE FROM jobs WHERE id = ?")
            .bind(id)
            .execute(self.pool())
            .await?;
        Ok(())
    }
}
