//! Lease-based claiming, for replicas sharing one queue. A replica (its `owner` name, unique per
//! process) claims queued jobs with a lease: `queued -> running` with `lease_owner`, a fresh
//! random `lease_id` and `lease_expires_at`. On PostgreSQL the claim locks its rows with
//! `FOR UPDATE SKIP LOCKED`, so concurrent claimers take disjoint jobs without waiting for each
//! other; on SQLite the claim is one `BEGIN IMMEDIATE` transaction (one file, one writer).
//! Lease times come from the database's clock, so replicas' clocks need not agree.
//! The holder renews its leases while the jobs run ([`JobStore::renew`], which also reports
//! the jobs cancelled or lost meanwhile); a lease nobody renewed returns its job to the queue
//! ([`JobStore::reap_expired`]), or fails it once it used up its attempts. Every transition a
//! holder makes is fenced by its `lease_id`: after its lease was lost (and the job claimed
//! again) a late result is discarded and reported, never recorded twice.
use std::time::Duration;

use serde_json::Value;

use super::db::{Backend, Cols, FromRow, args};
use super::jobs::COLUMNS;
use super::{ArtifactRow, JobRow, JobStatus, JobStore, StoreResult, now_ms, random_hex};

/// A held lease: the job and the claim's fencing token.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Lease {
    pub job_id: String,
    /// New at every claim; only the holder of the current one may change the job.
    pub lease_id: String,
}

/// How much one claim may take.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClaimLimit {
    /// Most jobs.
    pub jobs: usize,
    /// Most images in all. The oldest queued job is claimed only when it fits (pass the whole
    /// capacity when idle), then jobs with its batch key, in queue order, while they fit.
    pub images: usize,
}

/// A claimed job, now `running` under `lease`.
#[derive(Debug, Clone, PartialEq)]
pub struct Claim {
    pub job: JobRow,
    pub lease: Lease,
}

/// What became of a leased job's result.
#[derive(Debug, Clone, PartialEq)]
pub enum Completion {
    /// Recorded: the job succeeded with its artifacts.
    Recorded,
    /// The job was cancelled while it ran: nothing recorded (its files belong to no row).
    Cancelled,
    /// The lease was lost (it expired and the job went back to the queue, ran elsewhere, or
    /// was removed): this late result is discarded. What the row says now, for the log.
    LeaseLost {
        status: Option<JobStatus>,
        holder: Option<String>,
    },
}

/// What a renewal found, per held lease.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Renewal {
    /// Jobs still held, their leases extended.
    pub renewed: Vec<String>,
    /// Jobs cancelled by a client: stop them.
    pub cancelled: Vec<String>,
    /// Jobs no longer held (lease expired and reclaimed, finished elsewhere, removed): stop.
    pub lost: Vec<String>,
}

/// What a reaping of expired leases did.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reaped {
    /// Back in the queue (keeping their place), in queue order.
    pub requeued: Vec<String>,
    /// Failed: they had used up their attempts.
    pub failed: Vec<String>,
}

/// A queued job as the claim sees it.
struct Pick {
    id: String,
    images: usize,
    batch_key: Option<String>,
}

impl FromRow for Pick {
    fn from_row(row: &dyn Cols) -> StoreResult<Self> {
        Ok(Pick {
            id: row.text("id")?,
            images: row.int("images")?.max(0) as usize,
            batch_key: row.opt_text("batch_key")?,
        })
    }
}

/// The lease state of a row.
struct Held {
    id: String,
    status: JobStatus,
    lease_id: Option<String>,
    owner: Option<String>,
    attempts: u32,
}

impl FromRow for Held {
    fn from_row(row: &dyn Cols) -> StoreResult<Self> {
        Ok(Held {
            id: row.text("id")?,
            status: row.text("status")?.parse()?,
            lease_id: row.opt_text("lease_id")?,
            owner: row.opt_text("lease_owner")?,
            attempts: row.int("attempts")?.max(0) as u32,
        })
    }
}

const HELD: &str = "id, status, lease_id, lease_owner, attempts";

fn ms(d: Duration) -> i64 {
    d.as_millis().min(i64::MAX as u128) as i64
}

fn placeholders(n: usize) -> String {
    vec!["?"; n].join(", ")
}

impl JobStore {
    /// The database's clock in unix milliseconds, as SQL. Lease times are taken from it, not
    /// from the replicas' clocks: a replica whose clock runs behind cannot reap a live lease.
    pub(super) fn db_now(&self) -> &'static str {
        match self.backend() {
            Backend::Postgres => "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000 AS BIGINT)",
            Backend::Sqlite => "CAST((julianday('now') - 2440587.5) * 86400000.0 AS INTEGER)",
        }
    }

    /// `FOR UPDATE SKIP LOCKED` where the backend has row locks.
    fn row_lock(&self) -> &'static str {
        match self.backend() {
            Backend::Postgres => " FOR UPDATE SKIP LOCKED",
            Backend::Sqlite => "",
        }
    }

    /// Claims the oldest queued job and more with its batch key, within `limit`, for `owner`,
    /// each with its own lease of `ttl` (one more attempt each). Empty when nothing is queued
    /// or the oldest job does not fit.
    pub async fn claim(
        &self,
        owner: &str,
        limit: ClaimLimit,
        ttl: Duration,
    ) -> StoreResult<Vec<Claim>> {
        if limit.jobs == 0 {
            return Ok(Vec::new());
        }
        let lock = self.row_lock();
        let mut tx = self.db().begin().await?;
        let head: Option<Pick> = tx
            .fetch_optional(
                &format!(
                    "SELECT id, images, batch_key FROM jobs WHERE status = 'queued' \
                     ORDER BY queue_order LIMIT 1{lock}"
                ),
                vec![],
            )
            .await?;
        let Some(head) = head.filter(|h| h.images <= limit.images) else {
            // At once: a lock left on the head would let other claimers skip it (out of order).
            tx.rollback().await?;
            return Ok(Vec::new());
        };
        let mut total = head.images;
        let mut picked = vec![head.id.clone()];
        if let (Some(key), true) = (&head.batch_key, limit.jobs > 1) {
            let more: Vec<Pick> = tx
                .fetch_all(
                    &format!(
                        "SELECT id, images, batch_key FROM jobs WHERE status = 'queued' \
                         AND batch_key = ? AND id <> ? ORDER BY queue_order LIMIT ?{lock}"
                    ),
                    args![key, &head.id, (limit.jobs - 1) as i64],
                )
                .await?;
            for m in more {
                if total.saturating_add(m.images) <= limit.images {
                    total += m.images;
                    picked.push(m.id);
                }
            }
        }
        let claim_sql = format!(
            "UPDATE jobs SET status = 'running', attempts = attempts + 1, started_at = ?, \
             lease_owner = ?, lease_id = ?, lease_expires_at = {} + ?, worker_position = NULL, \
             progress_step = NULL, progress_total = NULL, progress_at = NULL \
             WHERE id = ? AND status = 'queued'",
            self.db_now()
        );
        let mut claims = Vec::with_capacity(picked.len());
        for id in picked {
            let lease_id = random_hex(8)?;
            let n = tx
                .execute(&claim_sql, args![now_ms(), owner, &lease_id, ms(ttl), &id])
                .await?;
            if n != 1 {
                continue;
            }
            let job: Option<JobRow> = tx
                .fetch_optional(
                    &format!("SELECT {COLUMNS} FROM jobs WHERE id = ?"),
                    args![&id],
                )
                .await?;
            if let Some(job) = job {
                claims.push(Claim {
                    job,
                    lease: Lease {
                        job_id: id,
                        lease_id,
                    },
                });
            }
        }
        tx.commit().await?;
        Ok(claims)
    }

    /// Extends the leases `owner` holds among `held` to `ttl` from now, and says which of them
    /// were cancelled or lost meanwhile (the holder stops those).
    pub async fn renew(&self, owner: &str, held: &[Lease], ttl: Duration) -> StoreResult<Renewal> {
        let mut out = Renewal::default();
        if held.is_empty() {
            return Ok(out);
        }
        let marks = placeholders(held.len());
        let mut values = args![ms(ttl), owner];
        values.extend(held.iter().map(|l| l.lease_id.as_str().into()));
        self.db()
            .execute(
                &format!(
                    "UPDATE jobs SET lease_expires_at = {} + ? WHERE status = 'running' \
                     AND lease_owner = ? AND lease_id IN ({marks})",
                    self.db_now()
                ),
                values,
            )
            .await?;
        let rows: Vec<Held> = self
            .db()
            .fetch_all(
                &format!("SELECT {HELD} FROM jobs WHERE id IN ({marks})"),
                held.iter().map(|l| l.job_id.as_str().into()).collect(),
            )
            .await?;
        for lease in held {
            let row = rows.iter().find(|r| r.id == lease.job_id);
            let list = match row {
                Some(r)
                    if r.status == JobStatus::Running
                        && r.lease_id.as_deref() == Some(&lease.lease_id)
                        && r.owner.as_deref() == Some(owner) =>
                {
                    &mut out.renewed
                }
                Some(r) if r.status == JobStatus::Cancelled => &mut out.cancelled,
                _ => &mut out.lost,
            };
            list.push(lease.job_id.clone());
        }
        Ok(out)
    }

    /// Writes a running job's progress, by the lease holder only (false when the lease is no
    /// longer held): `position` images ahead of it in the holder's worker queue (`None` once it
    /// runs), `step` of `total` steps done.
    pub async fn record_progress(
        &self,
        lease: &Lease,
        position: Option<usize>,
        (step, total): (usize, usize),
    ) -> StoreResult<bool> {
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET worker_position = ?, progress_step = ?, progress_total = ?, \
                 progress_at = ? WHERE id = ? AND lease_id = ? AND status = 'running'",
                args![
                    position.map(|p| p as i64),
                    step as i64,
                    total as i64,
                    now_ms(),
                    &lease.job_id,
                    &lease.lease_id
                ],
            )
            .await?;
        Ok(n == 1)
    }

    /// `running -> succeeded` with its artifacts and timings, by the lease holder only.
    pub async fn complete_leased(
        &self,
        lease: &Lease,
        artifacts: &[ArtifactRow],
        timings: &Value,
    ) -> StoreResult<Completion> {
        if self
            .complete_where(&lease.job_id, Some(&lease.lease_id), artifacts, timings)
            .await?
        {
            return Ok(Completion::Recorded);
        }
        let row: Option<Held> = self
            .db()
            .fetch_optional(
                &format!("SELECT {HELD} FROM jobs WHERE id = ?"),
                args![&lease.job_id],
            )
            .await?;
        Ok(match row {
            Some(r) if r.status == JobStatus::Cancelled => Completion::Cancelled,
            r => Completion::LeaseLost {
                status: r.as_ref().map(|r| r.status),
                holder: r.and_then(|r| r.owner),
            },
        })
    }

    /// `running -> queued` by the lease holder (a retry keeps its place; `reason` is kept as
    /// the last error); false when the lease is no longer held.
    pub async fn requeue_leased(&self, lease: &Lease, reason: Option<&str>) -> StoreResult<bool> {
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET status = 'queued', error = COALESCE(?, error), \
                 lease_owner = NULL, lease_id = NULL, lease_expires_at = NULL \
                 WHERE id = ? AND lease_id = ? AND status = 'running'",
                args![reason, &lease.job_id, &lease.lease_id],
            )
            .await?;
        Ok(n == 1)
    }

    /// `running -> failed` by the lease holder; false when the lease is no longer held.
    pub async fn fail_leased(&self, lease: &Lease, reason: &str) -> StoreResult<bool> {
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? \
                 WHERE id = ? AND lease_id = ? AND status = 'running'",
                args![reason, now_ms(), &lease.job_id, &lease.lease_id],
            )
            .await?;
        Ok(n == 1)
    }

    /// Gives a job back unfinished (a draining replica): `running -> queued`, keeping its place,
    /// the attempt not counted; false when the lease is no longer held.
    pub async fn release(&self, lease: &Lease) -> StoreResult<bool> {
        let n = self
            .db()
            .execute(
                "UPDATE jobs SET status = 'queued', \
                 attempts = CASE WHEN attempts > 0 THEN attempts - 1 ELSE 0 END, \
                 lease_owner = NULL, lease_id = NULL, lease_expires_at = NULL \
                 WHERE id = ? AND lease_id = ? AND status = 'running'",
                args![&lease.job_id, &lease.lease_id],
            )
            .await?;
        Ok(n == 1)
    }

    /// Returns the jobs whose lease expired (their replica died, hung or lost the database)
    /// to the queue, keeping their place; a job that used up `max_attempts` fails instead.
    /// Safe to run on every replica at once: each row is taken by one of them.
    pub async fn reap_expired(&self, max_attempts: u32) -> StoreResult<Reaped> {
        let (requeued, failed) = self
            .return_interrupted(
                Some(&format!("lease_expires_at < {}", self.db_now())),
                max_attempts,
                "its lease expired (the replica running it stopped); run again",
            )
            .await?;
        Ok(Reaped { requeued, failed })
    }

    /// `running` jobs matching `cond` (SQL without parameters; `None`: all of them) back to
    /// `queued`, or `failed` past `max_attempts`; the ids (requeued, failed), in queue order.
    /// The attempt that was interrupted was counted when the job was claimed.
    pub(super) async fn return_interrupted(
        &self,
        cond: Option<&str>,
        max_attempts: u32,
        reason: &str,
    ) -> StoreResult<(Vec<String>, Vec<String>)> {
        let now = now_ms();
        let cond = cond.map(|c| format!(" AND ({c})")).unwrap_or_default();
        let mut tx = self.db().begin().await?;
        let rows: Vec<Held> = tx
            .fetch_all(
                &format!(
                    "SELECT {HELD} FROM jobs WHERE status = 'running'{cond} \
                     ORDER BY queue_order{}",
                    self.row_lock()
                ),
                vec![],
            )
            .await?;
        let (mut requeued, mut failed) = (Vec::new(), Vec::new());
        for row in rows {
            if row.attempts >= max_attempts {
                let why = format!(
                    "interrupted {} times (the server running it stopped or lost its lease); \
                     giving up",
                    row.attempts
                );
                tx.execute(
                    "UPDATE jobs SET status = 'failed', error = ?, finished_at = ? \
                     WHERE id = ? AND status = 'running'",
                    args![why, now, &row.id],
                )
                .await?;
                failed.push(row.id);
            } else {
                tx.execute(
                    "UPDATE jobs SET status = 'queued', error = ?, lease_owner = NULL, \
                     lease_id = NULL, lease_expires_at = NULL WHERE id = ? AND status = 'running'",
                    args![reason, &row.id],
                )
                .await?;
                requeued.push(row.id);
            }
        }
        tx.commit().await?;
        Ok((requeued, failed))
    }
}
