//! The dispatcher task that feeds queued rows to the worker in submission order (on a full
//! worker queue it waits and retries; the row stays `queued`), and one follower task per
//! dispatched job that records its progress, its retries and its result. How a stored row
//! becomes a worker job again and how a result becomes files is the [`JobCodec`]'s (the HTTP
//! layer's, which owns the request and response formats).
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use serde_json::Value;
use tokio::sync::{Notify, watch};

use super::service::{JobService, LivePreview};
use crate::store::{ArtifactFile, JobRow};
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

/// Feeds queued jobs to the worker, oldest first, until `stop` turns true.
pub async fn run_dispatcher<C: JobCodec>(
    jobs: Arc<JobService>,
    worker: WorkerHandle,
    codec: Arc<C>,
    stop: watch::Receiver<bool>,
) {
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    // Keep part of the worker queue for the synchronous routes.
    let budget = (worker.stats().queue_capacity / 2).max(1);
    while !*stop.borrow() {
        if !worker.is_ready() {
            pause(100).await;
            continue;
        }
        let row = match jobs.store.next_queued().await {
            Ok(Some(row)) => row,
            Ok(None) => {
                tokio::select! {
                    _ = jobs.wake.notified() => {}
                    _ = pause(500) => {}
                }
                continue;
            }
            Err(e) => {
                tracing::error!("reading the job queue: {e}");
                pause(1000).await;
                continue;
            }
        };
        let held = jobs.in_flight_images.load(Ordering::SeqCst);
        if held > 0 && held + row.images > budget {
            wait_freed(&jobs).await;
            continue;
        }
        let (job, extra) = match rebuild(&worker, codec.as_ref(), &row) {
            Ok(r) => r,
            Err(reason) => {
                record(jobs.store.fail(&row.id, &reason).await, &row.id);
                continue;
            }
        };
        match worker.submit(job) {
            Ok(ticket) => dispatched(&jobs, &codec, row, (ticket, extra)).await,
            Err(SubmitError::QueueFull { .. }) => wait_freed(&jobs).await,
            Err(SubmitError::NotReady { .. } | SubmitError::Draining { .. }) => pause(200).await,
            Err(e) => record(jobs.store.fail(&row.id, &e.to_string()).await, &row.id),
        }
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

/// Marks the row running and starts its follower (or drops the ticket when it was cancelled).
async fn dispatched<C: JobCodec>(
    jobs: &Arc<JobService>,
    codec: &Arc<C>,
    row: JobRow,
    (ticket, extra): (JobTicket, C::Extra),
) {
    match jobs.store.mark_running(&row.id).await {
        Ok(true) => {}
        Ok(false) => return, // cancelled between reading and dispatching: the ticket drops
        Err(e) => {
            tracing::error!(job = %row.id, "marking the job running: {e}");
            return;
        }
    }
    let cancel = jobs.start_live(&row.id);
    jobs.in_flight.fetch_add(1, Ordering::SeqCst);
    jobs.in_flight_images
        .fetch_add(row.images, Ordering::SeqCst);
    tracing::info!(job = %row.id, attempt = row.attempts + 1, "job dispatched");
    let jobs = jobs.clone();
    let codec = codec.clone();
    tokio::spawn(async move {
        let images = row.images;
        let id = row.id.clone();
        follow(&jobs, &codec, row, (ticket, extra), cancel).await;
        jobs.end_live(&id);
        jobs.in_flight_images.fetch_sub(images, Ordering::SeqCst);
        jobs.in_flight.fetch_sub(1, Ordering::SeqCst);
        jobs.freed.notify_one();
    });
}

/// Follows one dispatched job to its end and records the outcome.
async fn follow<C: JobCodec>(
    jobs: &JobService,
    codec: &Arc<C>,
    row: JobRow,
    (mut ticket, extra): (JobTicket, C::Extra),
    cancel: Arc<Notify>,
) {
    let id = row.id.clone();
    loop {
        let event = tokio::select! {
            e = ticket.events.recv() => e,
            _ = cancel.notified() => {
                tracing::info!(job = %id, "job cancelled by the client");
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
                store_output(jobs, codec.clone(), &id, output, extra).await;
                return;
            }
            Some(JobEvent::Finished(Err(e))) => {
                job_failed(jobs, &row, e).await;
                return;
            }
            None => {
                job_failed(
                    jobs,
                    &row,
                    JobError::Failed("the worker dropped the job".into()),
                )
                .await;
                return;
            }
        }
    }
}

/// Records a failure: a retry while attempts are left, else `failed` with a reason.
async fn job_failed(jobs: &JobService, row: &JobRow, e: JobError) {
    let attempt = row.attempts + 1;
    let id = &row.id;
    let result = match e {
        JobError::Failed(detail) if attempt < jobs.config.max_attempts => {
            tracing::warn!(job = %id, attempt, "job failed, will retry: {detail}");
            let r = jobs
                .store
                .requeue(id, Some("generation failed; retrying"))
                .await;
            jobs.wake();
            r
        }
        JobError::Failed(detail) => {
            tracing::error!(job = %id, attempt, "job failed for good: {detail}");
            let reason = format!("generation failed {attempt} times (details in the server log)");
            jobs.store.fail(id, &reason).await
        }
        other => jobs.store.fail(id, &other.to_string()).await,
    };
    record(result, id);
}

/// Writes the job's files (rendered by the codec on a blocking thread) and marks it succeeded.
async fn store_output<C: JobCodec>(
    jobs: &JobService,
    codec: Arc<C>,
    id: &str,
    output: JobOutput,
    extra: C::Extra,
) {
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
                    .fail(id, "storing the result failed (details in the server log)")
                    .await,
                id,
            );
            return;
        }
    };
    match jobs.store.complete(id, &rows, &timings).await {
        Ok(true) => tracing::info!(job = %id, "job succeeded"),
        Ok(false) => {
            // Cancelled while it ran: the files belong to no row.
            let artifacts = jobs.artifacts.clone();
            let job_id = id.to_string();
            let _ = tokio::task::spawn_blocking(move || artifacts.remove_job(&job_id)).await;
        }
        Err(e) => tracing::error!(job = %id, "recording the result: {e}"),
    }
}
