//! The worker: a handle that async code uses to submit jobs, and the executor thread that owns
//! the engine (models never run on the async runtime). Cancellation is the dropping of a job's
//! event receiver: queued images are removed, running ones are dropped at the next step.
use std::collections::HashMap;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::contract::{
    GenerationJob, ImageResult, JobError, JobEvent, JobOutput, JobTimings, SubmitError,
};
use super::engine::{Catalog, Engine, validate_job};
use super::queue::{Queue, WorkItem};
use crate::pipeline::Observer;

/// Worker settings.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct WorkerConfig {
    /// Most images per batch.
    pub max_batch: usize,
    /// How long a batch waits for compatible work before it starts.
    pub batch_wait: Duration,
    /// Queue capacity, in images.
    pub queue_capacity: usize,
    /// A job still unfinished after this fails with `TimedOut`.
    pub request_timeout: Duration,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            max_batch: 4,
            batch_wait: Duration::from_millis(50),
            queue_capacity: 64,
            request_timeout: Duration::from_secs(600),
        }
    }
}

/// Counters and recent measurements.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct WorkerStats {
    pub queued_images: usize,
    pub running_images: usize,
    pub queue_capacity: usize,
    /// Measured throughput (exponentially weighted).
    pub images_per_second: f64,
    pub completed_images: u64,
    pub failed_jobs: u64,
    pub cancelled_images: u64,
    pub rejected_full: u64,
    pub rejected_not_ready: u64,
    pub rejected_draining: u64,
    pub last_batch_size: usize,
    pub batches: u64,
    /// Recent queue waits in seconds (at most 256).
    pub queue_wait_seconds: Vec<f64>,
    /// Summed stage times of completed images.
    pub stage_seconds: JobTimings,
}

/// A submitted job: its id and its events (`Queued`, `Progress`..., then one `Finished`).
/// Dropping it cancels the job.
#[derive(Debug)]
pub struct JobTicket {
    pub id: u64,
    pub events: UnboundedReceiver<JobEvent>,
}

/// Bookkeeping of an accepted job.
struct JobState {
    tx: UnboundedSender<JobEvent>,
    results: Vec<Option<ImageResult>>,
    pending: usize,
    timings: JobTimings,
    experts: Vec<String>,
    accepted_at: Instant,
}

struct State {
    queue: Queue,
    jobs: HashMap<u64, JobState>,
    running: usize,
    stats: WorkerStats,
    catalog: Option<Arc<Catalog>>,
    shutdown: bool,
}

struct Shared {
    state: Mutex<State>,
    work: Condvar,
    idle: Condvar,
    ready: AtomicBool,
    draining: AtomicBool,
    /// Why the worker will never turn ready (loading or warm-up failed).
    failure: Mutex<Option<String>>,
    next_id: AtomicU64,
    config: WorkerConfig,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The async side's view of the worker. Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
}

/// Builds the engine on the executor thread.
pub type EngineLoader = Box<dyn FnOnce() -> Result<Box<dyn Engine>, String> + Send>;

/// Spawns the executor thread; `load` runs on it, then a warm-up batch per ensemble, then the
/// worker turns ready. A failed load or warm-up is logged and leaves the worker not ready, with
/// the reason in `failure()`.
pub fn start_worker(load: EngineLoader, config: WorkerConfig) -> WorkerHandle {
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: Queue::new(config.queue_capacity),
            jobs: HashMap::new(),
            running: 0,
            stats: WorkerStats {
                queue_capacity: config.queue_capacity,
                ..Default::default()
            },
            catalog: None,
            shutdown: false,
        }),
        work: Condvar::new(),
        idle: Condvar::new(),
        ready: AtomicBool::new(false),
        draining: AtomicBool::new(false),
        failure: Mutex::new(None),
        next_id: AtomicU64::new(1),
        config,
    });
    let thread_shared = shared.clone();
    std::thread::Builder::new()
        .name("afa-executor".into())
        .spawn(move || executor(thread_shared, load))
        .expect("spawning the executor thread");
    WorkerHandle { shared }
}

/// Seconds until `queued` images are likely done at `rate` images/s (1..=600).
fn retry_after(queued: usize, rate: f64) -> Duration {
    let secs = if rate > 0.0 {
        (queued as f64 / rate).ceil()
    } else {
        10.0
    };
    Duration::from_secs(secs.clamp(1.0, 600.0) as u64)
}

impl WorkerHandle {
    /// Validates and queues a job.
    pub fn submit(&self, job: GenerationJob) -> Result<JobTicket, SubmitError> {
        let s = &self.shared;
        let mut state = s.lock();
        if s.draining.load(Ordering::SeqCst) {
            state.stats.rejected_draining += 1;
            return Err(SubmitError::Draining {
                retry_after: Duration::from_secs(5),
            });
        }
        let Some(catalog) = state
            .catalog
            .clone()
            .filter(|_| s.ready.load(Ordering::SeqCst))
        else {
            state.stats.rejected_not_ready += 1;
            return Err(SubmitError::NotReady {
                retry_after: Duration::from_secs(5),
            });
        };
        validate_job(&catalog, &job)?;
        let id = s.next_id.fetch_add(1, Ordering::SeqCst);
        let key = job.batch_key();
        let now = Instant::now();
        let items: Vec<WorkItem> = job
            .images
            .iter()
            .enumerate()
            .map(|(i, spec)| WorkItem {
                job_id: id,
                image_index: i,
                key: key.clone(),
                spec: spec.clone(),
                enqueued_at: now,
            })
            .collect();
        let n = items.len();
        if let Err(full) = state.queue.push_job(items) {
            state.stats.rejected_full += 1;
            let ahead = full.queued + state.running;
            return Err(SubmitError::QueueFull {
                retry_after: retry_after(ahead + n, state.stats.images_per_second),
            });
        }
        let (tx, rx) = unbounded_channel();
        let position = state.queue.position(id).unwrap_or(0);
        let _ = tx.send(JobEvent::Queued { position });
        state.jobs.insert(
            id,
            JobState {
                tx,
                results: vec![None; n],
                pending: n,
                timings: JobTimings::default(),
                experts: Vec::new(),
                accepted_at: now,
            },
        );
        drop(state);
        s.work.notify_all();
        Ok(JobTicket { id, events: rx })
    }

    /// Models loaded and warmed up, and not draining.
    pub fn is_ready(&self) -> bool {
        self.shared.ready.load(Ordering::SeqCst) && !self.is_draining()
    }

    /// Why the worker will never turn ready (models failed to load or to warm up).
    pub fn failure(&self) -> Option<String> {
        self.shared
            .failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Shutting down: no new work is admitted.
    pub fn is_draining(&self) -> bool {
        self.shared.draining.load(Ordering::SeqCst)
    }

    /// What is served; `None` until loaded.
    pub fn catalog(&self) -> Option<Arc<Catalog>> {
        self.shared.lock().catalog.clone()
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> WorkerStats {
        let state = self.shared.lock();
        let mut stats = state.stats.clone();
        stats.queued_images = state.queue.len();
        stats.running_images = state.running;
        stats
    }

    /// Stops admitting new work; queued and running work goes on.
    pub fn begin_drain(&self) {
        self.shared.draining.store(true, Ordering::SeqCst);
    }

    /// Blocks until nothing is queued or running, or `timeout` passes; true when idle.
    pub fn wait_idle(&self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        let mut state = self.shared.lock();
        loop {
            if state.queue.is_empty() && state.running == 0 {
                return true;
            }
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            state = self
                .shared
                .idle
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }

    /// Stops the executor thread after the current batch (queued work is failed).
    pub fn shutdown(&self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
    }
}

/// The executor thread: load, warm up, then run batches until shut down.
fn executor(shared: Arc<Shared>, load: EngineLoader) {
    let fail = |public: String, detail: String| {
        tracing::error!("{public}: {detail}");
        eprintln!("error: {public}: {detail}");
        *shared.failure.lock().unwrap_or_else(|p| p.into_inner()) = Some(public);
    };
    let mut engine = match load() {
        Ok(e) => e,
        Err(e) => return fail("loading models failed (see the server log)".into(), e),
    };
    let catalog = Arc::new(engine.catalog());
    if let Err((ensemble, e)) = warm_up(engine.as_mut(), &catalog) {
        return fail(
            format!("the warm-up of ensemble '{ensemble}' failed (see the server log)"),
            e.to_string(),
        );
    }
    shared.lock().catalog = Some(catalog);
    shared.ready.store(true, Ordering::SeqCst);
    tracing::info!("models loaded; ready");
    while let Some(batch) = next_batch(&shared) {
        run_batch(&shared, engine.as_mut(), batch);
    }
}

/// One tiny generation per ensemble, so the first request does not pay for lazy set-up and an
/// ensemble that cannot generate is found before the server turns ready.
fn warm_up(engine: &mut dyn Engine, catalog: &Catalog) -> Result<(), (String, JobError)> {
    for e in &catalog.ensembles {
        let min = catalog.limits.min_side;
        let key = super::BatchKey {
            ensemble: e.name.clone(),
            mode: if e.modes.contains(&e.default_mode) {
                e.default_mode.clone()
            } else {
                "mean".into()
            },
            width: e.allowed_sizes.first().map(|s| s.0).unwrap_or(min),
            height: e.allowed_sizes.first().map(|s| s.1).unwrap_or(min),
            steps: 1,
            scheduler: crate::schedulers::SchedulerKind::Ddim,
            attention_maps: crate::pipeline::MapsRequest::Off,
        };
        let image = crate::pipeline::ImageSpec {
            prompt: "warm-up".into(),
            negative_prompt: String::new(),
            seed: 0,
            guidance_scale: 1.0,
        };
        engine
            .run(&key, &[image], &mut ())
            .map_err(|e| (key.ensemble.clone(), e))?;
    }
    Ok(())
}

/// Waits for work, then takes a batch (waiting up to `batch_wait` for more compatible images).
fn next_batch(shared: &Shared) -> Option<Vec<WorkItem>> {
    let cfg = shared.config;
    let mut state = shared.lock();
    'wait_for_work: loop {
        if state.shutdown {
            return None;
        }
        drop_cancelled_and_expired(&mut state, cfg.request_timeout);
        if state.queue.is_empty() {
            shared.idle.notify_all();
            state = shared.work.wait(state).unwrap_or_else(|p| p.into_inner());
            continue;
        }
        let deadline = Instant::now() + cfg.batch_wait;
        while state.queue.ready_for_next(cfg.max_batch) < cfg.max_batch && !state.shutdown {
            let now = Instant::now();
            if now >= deadline {
                break;
            }
            state = shared
                .work
                .wait_timeout(state, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
            drop_cancelled_and_expired(&mut state, cfg.request_timeout);
            if state.queue.is_empty() {
                // Everything waiting was cancelled meanwhile: wait for new work.
                continue 'wait_for_work;
            }
        }
        break;
    }
    let batch = state.queue.take_batch(cfg.max_batch);
    state.running = batch.len();
    for id in state.queue.waiting_jobs() {
        if let (Some(position), Some(job)) = (state.queue.position(id), state.jobs.get(&id)) {
            let _ = job.tx.send(JobEvent::Queued { position });
        }
    }
    Some(batch)
}

/// Removes queued images of jobs whose receiver is gone, and fails jobs past the timeout.
fn drop_cancelled_and_expired(state: &mut State, timeout: Duration) {
    let ids: Vec<u64> = state.queue.waiting_jobs();
    for id in ids {
        let Some(job) = state.jobs.get(&id) else {
            continue;
        };
        if job.tx.is_closed() {
            let n = state.queue.remove_job(id) as u64;
            state.stats.cancelled_images += n;
            state.jobs.remove(&id);
        } else if job.accepted_at.elapsed() > timeout {
            state.queue.remove_job(id);
            if let Some(job) = state.jobs.remove(&id) {
                let _ = job
                    .tx
                    .send(JobEvent::Finished(Err(JobError::TimedOut(timeout))));
                state.stats.failed_jobs += 1;
            }
        }
    }
}

/// Forwards batch progress to the jobs in it and reports their cancellation.
struct BatchObserver<'a> {
    shared: &'a Shared,
    items: &'a [WorkItem],
    timeout: Duration,
}

impl Observer for BatchObserver<'_> {
    fn step(&mut self, done: usize, total: usize) {
        let state = self.shared.lock();
        let mut seen = Vec::new();
        for item in self.items {
            if seen.contains(&item.job_id) {
                continue;
            }
            seen.push(item.job_id);
            if let Some(job) = state.jobs.get(&item.job_id) {
                let _ = job.tx.send(JobEvent::Progress { step: done, total });
            }
        }
    }

    fn is_image_cancelled(&self, index: usize) -> bool {
        let state = self.shared.lock();
        match state.jobs.get(&self.items[index].job_id) {
            None => true,
            Some(job) => job.tx.is_closed() || job.accepted_at.elapsed() > self.timeout,
        }
    }
}

/// Runs one batch, isolating panics, and delivers results.
fn run_batch(shared: &Shared, engine: &mut dyn Engine, batch: Vec<WorkItem>) {
    let key = batch[0].key.clone();
    let specs: Vec<_> = batch.iter().map(|i| i.spec.clone()).collect();
    let started = Instant::now();
    let mut observer = BatchObserver {
        shared,
        items: &batch,
        timeout: shared.config.request_timeout,
    };
    let outcome =
        std::panic::catch_unwind(AssertUnwindSafe(|| engine.run(&key, &specs, &mut observer)))
            .unwrap_or_else(|panic| {
                let message = panic
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_else(|| "unknown panic".into());
                tracing::error!("batch for {} panicked: {message}", key.ensemble);
                Err(JobError::Failed(format!("the batch panicked: {message}")))
            });
    let elapsed = started.elapsed();
    let mut state = shared.lock();
    state.running = 0;
    state.stats.batches += 1;
    state.stats.last_batch_size = batch.len();
    match outcome {
        Ok(outcome) => deliver(
            &mut state,
            &batch,
            outcome,
            elapsed,
            shared.config.request_timeout,
        ),
        Err(error) => {
            for id in unique_jobs(&batch) {
                state.queue.remove_job(id);
                if let Some(job) = state.jobs.remove(&id) {
                    let _ = job.tx.send(JobEvent::Finished(Err(error.clone())));
                    state.stats.failed_jobs += 1;
                }
            }
        }
    }
    if state.queue.is_empty() {
        shared.idle.notify_all();
    }
}

fn unique_jobs(batch: &[WorkItem]) -> Vec<u64> {
    let mut ids: Vec<u64> = batch.iter().map(|i| i.job_id).collect();
    ids.sort_unstable();
    ids.dedup();
    ids
}

/// Stores each image's result in its job, finishing jobs whose last image arrived.
fn deliver(
    state: &mut State,
    batch: &[WorkItem],
    outcome: super::engine::BatchOutcome,
    elapsed: Duration,
    timeout: Duration,
) {
    let done = outcome.images.iter().filter(|i| i.is_some()).count();
    if done > 0 {
        let rate = done as f64 / elapsed.as_secs_f64().max(1e-6);
        let s = &mut state.stats;
        s.images_per_second = if s.images_per_second == 0.0 {
            rate
        } else {
            0.7 * s.images_per_second + 0.3 * rate
        };
    }
    for (item, result) in batch.iter().zip(outcome.images) {
        let wait = item.enqueued_at.elapsed().saturating_sub(elapsed);
        let Some(job) = state.jobs.get_mut(&item.job_id) else {
            continue;
        };
        let Some(image) = result else {
            // Cancelled (receiver gone) or timed out mid-run.
            let timed_out = job.accepted_at.elapsed() > timeout;
            let tx = job.tx.clone();
            state.queue.remove_job(item.job_id);
            state.jobs.remove(&item.job_id);
            if timed_out {
                let _ = tx.send(JobEvent::Finished(Err(JobError::TimedOut(timeout))));
                state.stats.failed_jobs += 1;
            } else {
                state.stats.cancelled_images += 1;
            }
            continue;
        };
        job.results[item.image_index] = Some(image);
        job.pending -= 1;
        job.experts = outcome.experts.clone();
        let share = batch.len() as u32;
        let t = &mut job.timings;
        t.queue = t.queue.max(wait);
        t.text_encode += outcome.timings.text_encode / share;
        t.denoise += outcome.timings.denoise / share;
        t.decode += outcome.timings.decode / share;
        t.png_encode += outcome.timings.png_encode / share;
        state.stats.completed_images += 1;
        let waits = &mut state.stats.queue_wait_seconds;
        waits.push(wait.as_secs_f64());
        if waits.len() > 256 {
            waits.remove(0);
        }
        if job.pending == 0 {
            let job = state.jobs.remove(&item.job_id).expect("present");
            let s = &mut state.stats.stage_seconds;
            s.text_encode += job.timings.text_encode;
            s.denoise += job.timings.denoise;
            s.decode += job.timings.decode;
            s.png_encode += job.timings.png_encode;
            let output = JobOutput {
                images: job
                    .results
                    .into_iter()
                    .map(|r| r.expect("every image delivered"))
                    .collect(),
                timings: job.timings,
                experts: job.experts,
            };
            let _ = job.tx.send(JobEvent::Finished(Ok(output)));
        }
    }
}
