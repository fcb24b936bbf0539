//! The job service behind `/v1/jobs`: the store, the artifact files, live progress of running
//! jobs, the dispatcher task that feeds queued rows to the worker in submission order (on a
//! full worker queue it waits and retries; the row stays `queued`), one follower task per
//! dispatched job that records its progress and result, and the expiry sweeper.
use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::sync::{Notify, watch};

use super::ApiState;
use super::error::ApiError;
use super::output::{render_maps, timings_json};
use super::request::{MapsOutput, NativeRequest, Validated, validate};

use crate::store::{ArtifactFile, Artifacts, JobRow, JobStore, now_ms};
use crate::telemetry::Metrics;
use crate::worker::{JobError, JobEvent, JobOutput, JobTicket, SubmitError, legend_text};

/// Settings of the job service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobsConfig {
    /// A job handed to the worker this many times without finishing ends `failed`.
    pub max_attempts: u32,
    /// Finished jobs (rows and files) are removed this long after they finished.
    pub result_ttl: Duration,
    /// How long `response_format: "url"` waits for its job.
    pub url_wait: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            result_ttl: Duration::from_secs(24 * 3600),
            url_wait: Duration::from_secs(600),
        }
    }
}

/// Live progress of a dispatched job (not stored: it is worthless after a restart).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    /// Images ahead of it in the worker's queue; `None` once it runs.
    pub position: Option<usize>,
    pub step: usize,
    pub total: usize,
}

struct LiveEntry {
    tx: watch::Sender<Live>,
    cancel: Arc<Notify>,
}

/// Store + files + live state, shared by the routes, the dispatcher and the followers.
pub struct JobService {
    pub store: JobStore,
    pub artifacts: Artifacts,
    pub config: JobsConfig,
    live: Mutex<HashMap<String, LiveEntry>>,
    /// A job was queued.
    wake: Notify,
    /// A dispatched job finished (worker capacity freed).
    freed: Notify,
    in_flight: AtomicUsize,
    in_flight_images: AtomicUsize,
}

impl JobService {
    pub fn new(store: JobStore, artifacts: Artifacts, config: JobsConfig) -> Self {
        Self {
            store,
            artifacts,
            config,
            live: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            freed: Notify::new(),
            in_flight: AtomicUsize::new(0),
            in_flight_images: AtomicUsize::new(0),
        }
    }

    fn live_map(&self) -> std::sync::MutexGuard<'_, HashMap<String, LiveEntry>> {
        self.live.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Tells the dispatcher that a job was queued.
    pub fn wake(&self) {
        self.wake.notify_one();
    }

    /// Progress of a dispatched job.
    pub fn live(&self, id: &str) -> Option<Live> {
        self.live_map().get(id).map(|e| e.tx.borrow().clone())
    }

    /// Progress updates of a dispatched job (closed when it finishes).
    pub fn subscribe(&self, id: &str) -> Option<watch::Receiver<Live>> {
        self.live_map().get(id).map(|e| e.tx.subscribe())
    }

    /// Drops a running job from the worker (its row is already `cancelled`).
    pub fn cancel_running(&self, id: &str) {
        if let Some(e) = self.live_map().get(id) {
            e.cancel.notify_one();
        }
    }

    /// Jobs handed to the worker and not yet recorded.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    fn start_live(&self, id: &str) -> Arc<Notify> {
        let (tx, _) = watch::channel(Live {
            position: Some(0),
            ..Live::default()
        });
        let cancel = Arc::new(Notify::new());
        self.live_map().insert(
            id.to_string(),
            LiveEntry {
                tx,
                cancel: cancel.clone(),
            },
        );
        cancel
    }

    fn publish(&self, id: &str, f: impl FnOnce(&mut Live)) {
        if let Some(e) = self.live_map().get(id) {
            e.tx.send_modify(f);
        }
    }
}

/// The stored form of a validated request: every default and the seed resolved, so that
/// validating it again (after a restart) gives the same job and the same images.
pub fn resolved_params(v: &Validated, req: &NativeRequest) -> Value {
    let mut params = super::output::parameters_json(v);
    params["return_attention_maps"] = json!(req.return_attention_maps);
    params
}

/// Validates a stored job again against what is served now.
fn rebuild(state: &ApiState, row: &JobRow) -> Result<Validated, String> {
    let catalog = state
        .worker
        .catalog()
        .ok_or_else(|| "models are not loaded".to_string())?;
    let req: NativeRequest = serde_json::from_value(row.params.clone())
        .map_err(|e| format!("stored parameters are unreadable: {e}"))?;
    let capacity = state.worker.stats().queue_capacity;
    validate(
        &req,
        &catalog,
        capacity,
        row.seeds.first().copied().unwrap_or(0),
    )
    .map_err(|e| format!("the job is no longer valid: {e}"))
}

/// Feeds queued jobs to the worker, oldest first, until `stop` turns true.
pub async fn run_dispatcher(state: ApiState, jobs: Arc<JobService>, stop: watch::Receiver<bool>) {
    let pause = |ms| tokio::time::sleep(Duration::from_millis(ms));
    // Keep part of the worker queue for the synchronous routes.
    let budget = (state.worker.stats().queue_capacity / 2).max(1);
    while !*stop.borrow() {
        if !state.worker.is_ready() {
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
        let validated = match rebuild(&state, &row) {
            Ok(v) => v,
            Err(reason) => {
                record(jobs.store.fail(&row.id, &reason).await, &row.id);
                continue;
            }
        };
        match state.worker.submit(validated.job.clone()) {
            Ok(ticket) => dispatched(&jobs, &state.metrics, row, (ticket, validated)).await,
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
async fn dispatched(
    jobs: &Arc<JobService>,
    metrics: &Arc<Metrics>,
    row: JobRow,
    (ticket, v): (JobTicket, Validated),
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
    let metrics = metrics.clone();
    tokio::spawn(async move {
        let images = row.images;
        let id = row.id.clone();
        follow(&jobs, &metrics, row, (ticket, v), cancel).await;
        jobs.live_map().remove(&id);
        jobs.in_flight_images.fetch_sub(images, Ordering::SeqCst);
        jobs.in_flight.fetch_sub(1, Ordering::SeqCst);
        jobs.freed.notify_one();
    });
}

/// Follows one dispatched job to its end and records the outcome.
async fn follow(
    jobs: &JobService,
    metrics: &Metrics,
    row: JobRow,
    (mut ticket, v): (JobTicket, Validated),
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
            Some(JobEvent::Finished(Ok(output))) => {
                super::generate::record_timings(metrics, &output);
                store_output(jobs, &id, output, v.maps).await;
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

/// Writes the images (and map bundles) to disk and marks the job succeeded.
async fn store_output(jobs: &JobService, id: &str, output: JobOutput, maps: Option<MapsOutput>) {
    let artifacts = jobs.artifacts.clone();
    let job_id = id.to_string();
    let timings = timings_json(&output.timings);
    let written = super::output::render_blocking(move || {
        let files = artifact_files(&output, maps.as_ref()).map_err(ApiError::Internal)?;
        artifacts
            .write(&job_id, &files)
            .map_err(|e| ApiError::Internal(e.to_string()))
    })
    .await
    .map_err(|e| match e {
        ApiError::Internal(detail) => detail,
        other => other.to_string(),
    });
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

/// One PNG per image, plus its attention-map bundle (JSON) when maps were asked for.
fn artifact_files(
    output: &JobOutput,
    maps: Option<&MapsOutput>,
) -> Result<Vec<ArtifactFile>, String> {
    let legend = legend_text(&output.experts);
    let mut files = Vec::new();
    for (index, img) in output.images.iter().enumerate() {
        files.push(ArtifactFile {
            index,
            kind: "png",
            bytes: img.png.clone(),
        });
        if let (Some(opts), Some(m)) = (maps, &img.attention_maps) {
            let rendered = render_maps(m, opts, &legend).map_err(|e| e.to_string())?;
            let bundle = super::schema::MapsBundle {
                index,
                seed: img.seed,
                experts: output.experts.clone(),
                attention_maps: rendered,
            };
            files.push(ArtifactFile {
                index,
                kind: "maps",
                bytes: serde_json::to_vec(&bundle).map_err(|e| e.to_string())?,
            });
        }
    }
    Ok(files)
}

/// Removes finished jobs older than the TTL, files first, then rows, until `stop` turns true.
pub async fn run_sweeper(jobs: Arc<JobService>, mut stop: watch::Receiver<bool>) {
    let ttl = jobs.config.result_ttl;
    let every = (ttl / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
    while !*stop.borrow() {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        }
        let before = now_ms() - ttl.as_millis() as i64;
        match sweep(&jobs, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired jobs removed"),
            Err(e) => tracing::error!("sweeping expired jobs: {e}"),
        }
    }
}

/// Removes the jobs that finished before `before_ms`; how many.
pub async fn sweep(jobs: &JobService, before_ms: i64) -> Result<usize, String> {
    let ids = jobs
        .store
        .expired(before_ms, 200)
        .await
        .map_err(|e| e.to_string())?;
    for id in &ids {
        let artifacts = jobs.artifacts.clone();
        let job_id = id.clone();
        tokio::task::spawn_blocking(move || artifacts.remove_job(&job_id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        jobs.store.delete_job(id).await.map_err(|e| e.to_string())?;
    }
    Ok(ids.len())
}
