//! The dispatcher task that claims queued rows with a lease (the oldest, with more of its batch
//! key, up to the free worker capacity) and feeds them to the worker (on a full worker queue it
//! releases them back to the queue, waits and retries), and one follower task per dispatched
//! job that records its progress, its retries and its result as the lease holder (a result
//! whose lease was lost is discarded and logged). The heartbeat is in `heartbeat.rs`. How a stored row
//! becomes a worker job again and how a result becomes files is the [`JobCodec`]'s (the HTTP
//! layer's, which owns the request and response formats).
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::service::{JobService, LivePreview};
use crate::store::{ArtifactFile, Claim, ClaimLimit, Completion, JobRow, Lease};
use crate::worker::{
    Catalog, GenerationJob, JobError, JobEvent, JobOutput, JobTicket, SubmitError, WorkerHandle,
};

/// The formats of stored jobs: how a row's parameters become a worker job (validated against
/// what is served now), and how a finished job's output becomes its files.
pub trait JobCodec: Send + Sync + 'static {
    /// What `files` needs besides the output (for example which map encodings were asked for).
    type Extra: Send + 'static;
    /// The worker job of `row`, validated against `catalog`; the error is the row's failure
    /// reason.
    fn rebuild(
        &self,
        row: &JobRow,
        catalog: &Catalog,
        queue_capacity: usize,
    ) -> Result<(GenerationJob, Self::Extra), String>;
    /// The files of a finished job (images, map bundles); runs on a blocking thread.
    fn files(&self, output: &JobOutput, extra: &Self::Extra) -> Result<Vec<ArtifactFile>, String>;
    /// The stage timings stored with the row.
    fn timings(&self, output: &JobOutput) -> Value;
    /// Called with every finished output (metrics).
    fn finished(&self, output: &JobOutput);
}

/// Validates a stored job again against what is served now.
fn rebuild<C: JobCodec>(
    worker: &WorkerHandle,
    codec: &C,
    row: &JobRow,
) -> Result<(GenerationJob, C::Extra), String> {
    let catalog = worker
        .catalog()
        .ok_or_else(|| "models are not loaded".to_string())?;
    codec.rebuild(row, &catalog, worker.stats().queue_capacity)
}

/// Most jobs one claim takes (the image limit is the free capacity).
const CLAIM_JOBS: usize = 8;

/// Feeds queued jobs to the worker, oldest first, until `stop` turns true; renews their leases
/// meanwhile (the heartbeat task, started here).
pub async fn run_dispatcher<C: JobCodec>(
    jobs: Arc<JobService>,
    worker: WorkerHandle,
    codec: Arc<C>,
    stop: watch::Receiver<bool>,
) {
    tokio::spawn(super::heartbeat::run_heartbeat(jobs.clone(), stop.clone()));
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    // Keep part of the worker queue for the synchronous routes.
    let budget = (worker.stats().queue_capacity / 2).max(1);
    while !*stop.borrow() {
        if !worker.is_ready() {
            pause(100).await;
            continue;
        }
        // Idle, the oldest job is taken whatever its size (its size was validated against the
        // worker queue at submission); otherwise only what fits beside the jobs in flight.
        let held = jobs.in_flight_images.load(Ordering::SeqCst);
        let images = if held == 0 {
            usize::MAX
        } else {
            budget.saturating_sub(held)
        };
        if images == 0 {
            wait_freed(&jobs).await;
            continue;
        }
        let limit = ClaimLimit {
            jobs: CLAIM_JOBS,
            images,
        };
        let claims = match jobs
            .store
            .claim(&jobs.replica, limit, jobs.config.lease)
            .await
        {
            Ok(c) => c,
            Err(e) => {
                tracing::error!("claiming queued jobs: {e}");
                pause(1000).await;
                continue;
            }
        };
        if claims.is_empty() {
            tokio::select! {
                _ = jobs.wake.notified() => {}
                _ = jobs.freed.notified() => {}
                _ = pause(500) => {}
            }
            continue;
        }
        submit_claims(&jobs, &worker, &codec, claims).await;
    }
}

/// Hands claimed jobs to the worker; on a full (or not ready) worker the rest go back to the
/// queue, their attempts not counted.
async fn submit_claims<C: JobCodec>(
    jobs: &Arc<JobService>,
    worker: &WorkerHandle,
    codec: &Arc<C>,
    claims: Vec<Claim>,
) {
    let mut claims = claims.into_iter();
    while let Some(Claim { job: row, lease }) = claims.next() {
        let (job, extra) = match rebuild(worker, codec.as_ref(), &row) {
            Ok(r) => r,
            Err(reason) => {
                record(jobs.store.fail_leased(&lease, &reason).await, &row.id);
                continue;
            }
        };
        let full = match worker.submit(job) {
            Ok(ticket) => {
                dispatched(jobs, codec, row, lease, (ticket, extra));
                continue;
            }
            Err(SubmitError::QueueFull { .. }) => true,
            Err(SubmitError::NotReady { .. } | SubmitError::Draining { .. }) => false,
            Err(e) => {
                record(
                    jobs.store.fail_leased(&lease, &e.to_string()).await,
                    &row.id,
                );
                continue;
            }
        };
        for lease in std::iter::once(lease).chain(claims.by_ref().map(|c| c.lease)) {
            record(jobs.store.release(&lease).await, &lease.job_id);
        }
        if full {
            wait_freed(jobs).await;
        } else {
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        return;
    }
}

async fn wait_freed(jobs: &JobService) {
    tokio::select! {
        _ = jobs.freed.notified() => {}
        _ = tokio::time::sleep(Duration::from_millis(250)) => {}
    }
}

fn record(result: crate::store::StoreResult<bool>, id: &str) {
    if let Err(e) = result {
        tracing::error!(job = %id, "updating the job store: {e}");
    }
}

/// Starts the follower of a claimed job that the worker accepted.
fn dispatched<C: JobCodec>(
    jobs: &Arc<JobService>,
    codec: &Arc<C>,
    row: JobRow,
    lease: Lease,
    (ticket, extra): (JobTicket, C::Extra),
) {
    let cancel = jobs.start_live(&lease);
    if let Some(updates) = jobs.subscribe(&lease.job_id) {
        tokio::spawn(super::progress::write_progress(
            jobs.clone(),
            lease.clone(),
            updates,
        ));
    }
    jobs.in_flight.fetch_add(1, Ordering::SeqCst);
    jobs.in_flight_images
        .fetch_add(row.images, Ordering::SeqCst);
    tracing::info!(job = %row.id, attempt = row.attempts, replica = %jobs.replica, "job dispatched");
    let jobs = jobs.clone();
    let codec = codec.clone();
    tokio::spawn(async move {
        let images = row.images;
        let held = Held { row, lease };
        let lease = held.lease.clone();
        follow(&jobs, &codec, held, (ticket, extra), cancel).await;
        jobs.end_live(&lease);
        jobs.in_flight_images.fetch_sub(images, Ordering::SeqCst);
        jobs.in_flight.fetch_sub(1, Ordering::SeqCst);
        jobs.freed.notify_one();
    });
}

/// A dispatched job: its row as claimed (attempt counted) and its lease.
struct Held {
    row: JobRow,
    lease: Lease,
}

/// Follows one dispatched job to its end and records the outcome.
async fn follow<C: JobCodec>(
    jobs: &JobService,
    codec: &Arc<C>,
    held: Held,
    (mut ticket, extra): (JobTicket, C::Extra),
    cancel: Arc<Notify>,
) {
    let id = held.row.id.clone();
    loop {
        let event = tokio::select! {
            e = ticket.events.recv() => e,
            _ = cancel.notified() => {
                tracing::info!(job = %id, "job cancelled (by a client, or its lease was lost)");
                return; // dropping the ticket drops the job from its batch
            }
        };
        match event {
            Some(JobEvent::Queued { position }) => {
                jobs.publish(&id, |l| l.position = Some(position))
            }
            Some(JobEvent::Progress { step, total }) => jobs.publish(&id, |l| {
                l.position = None;
                l.step = step;
                l.total = total;
            }),
            Some(JobEvent::Preview {
                index,
                step,
                total,
                raster,
            }) => jobs.publish(&id, |l| {
                let seq = l.preview.as_ref().map_or(0, |p| p.seq) + 1;
                l.preview = Some(LivePreview {
                    seq,
                    index,
                    step,
                    total,
                    raster: Arc::new(raster),
                });
            }),
            Some(JobEvent::Finished(Ok(output))) => {
                codec.finished(&output);
                store_output(jobs, codec.clone(), &held.lease, output, extra).await;
                return;
            }
            Some(JobEvent::Finished(Err(e))) => {
                job_failed(jobs, &held, e).await;
                return;
            }
            None => {
                job_failed(
                    jobs,
                    &held,
                    JobError::Failed("the worker dropped the job".into()),
                )
                .await;
                return;
            }
        }
    }
}

/// Records a failure: a retry while attempts are left, else `failed` with a reason (both only
/// while the lease is held).
async fn job_failed(jobs: &JobService, held: &Held, e: JobError) {
    let attempt = held.row.attempts;
    let (id, lease) = (&held.row.id, &held.lease);
    let result = match e {
        JobError::Failed(detail) if attempt < jobs.config.max_attempts => {
            tracing::warn!(job = %id, attempt, "job failed, will retry: {detail}");
            let r = jobs
                .store
                .requeue_leased(lease, Some("generation failed; retrying"))
                .await;
            jobs.wake();
            r
        }
        JobError::Failed(detail) => {
            tracing::error!(job = %id, attempt, "job failed for good: {detail}");
            let reason = format!("generation failed {attempt} times (details in the server log)");
            jobs.store.fail_leased(lease, &reason).await
        }
        other => jobs.store.fail_leased(lease, &other.to_string()).await,
    };
    record(result, id);
}

/// Writes the job's files (rendered by the codec on a blocking thread) and records it
/// succeeded, if the lease is still held.
async fn store_output<C: JobCodec>(
    jobs: &JobService,
    codec: Arc<C>,
    lease: &Lease,
    output: JobOutput,
    extra: C::Extra,
) {
    let id = lease.job_id.as_str();
    let artifacts = jobs.artifacts.clone();
    let job_id = id.to_string();
    let timings = codec.timings(&output);
    let written = tokio::task::spawn_blocking(move || {
        let files = codec.files(&output, &extra)?;
        artifacts.write(&job_id, &files).map_err(|e| e.to_string())
    })
    .await
    .unwrap_or_else(|e| Err(format!("the file writer stopped: {e}")));
    let rows = match written {
        Ok(rows) => rows,
        Err(e) => {
            tracing::error!(job = %id, "storing the result: {e}");
            record(
                jobs.store
                    .fail_leased(
                        lease,
                        "storing the result failed (details in the server log)",
                    )
                    .await,
                id,
            );
            return;
        }
    };
    match jobs.store.complete_leased(lease, &rows, &timings).await {
        Ok(Completion::Recorded) => tracing::info!(job = %id, "job succeeded"),
        Ok(Completion::Cancelled) => {
            // Cancelled while it ran: the files belong to no row.
            let artifacts = jobs.artifacts.clone();
            let job_id = id.to_string();
            let _ = tokio::task::spawn_blocking(move || artifacts.remove_job(&job_id)).await;
        }
        // The files stay: the job's paths are shared with the run that holds it now (same
        // seeds, same bytes), which may already have recorded them.
        Ok(Completion::LeaseLost { status, holder }) => tracing::warn!(
            job = %id,
            ?status,
            holder = holder.as_deref().unwrap_or("none"),
            "late result discarded: this replica's lease on the job was lost"
        ),
        Err(e) => tracing::error!(job = %id, "recording the result: {e}"),
    }
}
