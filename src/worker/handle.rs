//! The worker's async-facing side: a handle that async code uses to submit jobs and read
//! counters, and the state it shares with the executor threads (`executor.rs`), one per device,
//! each owning its own resident copy of the models (models never run on the async runtime).
//! Cancellation is the dropping of a job's event receiver: queued images are removed, running
//! ones are dropped at the next step.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

use super::contract::{GenerationJob, ImageResult, JobEvent, JobTimings, SubmitError};
use super::engine::{Catalog, Engine, validate_job};
use super::queue::{Queue, WorkItem};

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
    /// One entry per device, in the order of `--devices`.
    pub devices: Vec<DeviceStats>,
}

/// Where one device's executor stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceState {
    /// Loading its copy of the models, or warming up.
    Loading,
    /// Taking batches from the queue.
    Ready,
    /// Out of service, with the reason: its models failed to load or to warm up.
    Failed(String),
}

impl DeviceState {
    /// `loading`, `ready` or `failed`.
    pub fn name(&self) -> &'static str {
        match self {
            DeviceState::Loading => "loading",
            DeviceState::Ready => "ready",
            DeviceState::Failed(_) => "failed",
        }
    }
}

/// One device's counters.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceStats {
    /// `cpu`, `cuda:0`, ... (or a test's name).
    pub name: String,
    pub state: DeviceState,
    /// Images in the batch it runs now.
    pub running_images: usize,
    pub batches: u64,
    /// Batches that failed (an engine error or a panic) on it; each failed only its own jobs.
    pub failed_batches: u64,
    /// The error of its last failed batch.
    pub last_error: Option<String>,
    pub completed_images: u64,
    /// Its measured throughput (exponentially weighted).
    pub images_per_second: f64,
}

/// A submitted job: its id and its events (`Queued`, `Progress`..., then one `Finished`).
/// Dropping it cancels the job.
#[derive(Debug)]
pub struct JobTicket {
    pub id: u64,
    pub events: UnboundedReceiver<JobEvent>,
}

/// Bookkeeping of an accepted job.
pub(super) struct JobState {
    pub(super) tx: UnboundedSender<JobEvent>,
    pub(super) results: Vec<Option<ImageResult>>,
    pub(super) pending: usize,
    pub(super) timings: JobTimings,
    pub(super) experts: Vec<String>,
    pub(super) accepted_at: Instant,
    /// Previews each of its images asked for (0: none).
    pub(super) partial_images: usize,
}

/// Everything behind the worker's one lock.
pub(super) struct State {
    pub(super) queue: Queue,
    pub(super) jobs: HashMap<u64, JobState>,
    /// `stats.devices[i]` is device i's; the totals are summed over them.
    pub(super) stats: WorkerStats,
    pub(super) catalog: Option<Arc<Catalog>>,
    pub(super) shutdown: bool,
}

impl State {
    /// Images in running batches, all devices together.
    pub(super) fn running(&self) -> usize {
        self.stats.devices.iter().map(|d| d.running_images).sum()
    }

    /// Images per second of the devices in service, together.
    pub(super) fn throughput(&self) -> f64 {
        self.stats
            .devices
            .iter()
            .filter(|d| d.state == DeviceState::Ready)
            .map(|d| d.images_per_second)
            .sum()
    }

    /// Devices that take batches now.
    pub(super) fn ready_devices(&self) -> usize {
        self.stats
            .devices
            .iter()
            .filter(|d| d.state == DeviceState::Ready)
            .count()
    }
}

/// What the handle and the executor threads share.
pub(super) struct Shared {
    pub(super) state: Mutex<State>,
    /// Signalled when work arrives (or shutdown).
    pub(super) work: Condvar,
    /// Signalled when nothing is queued or running.
    pub(super) idle: Condvar,
    /// Every device loaded and warmed up.
    pub(super) ready: AtomicBool,
    pub(super) draining: AtomicBool,
    /// Why the worker will not serve: a device failed to load or to warm up.
    pub(super) failure: Mutex<Option<String>>,
    next_id: AtomicU64,
    pub(super) config: WorkerConfig,
}

impl Shared {
    pub(super) fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether a failure was recorded.
    pub(super) fn has_failed(&self) -> bool {
        self.failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
    }

    /// Records why the worker does not serve (the first reason wins).
    pub(super) fn set_failure(&self, reason: String) {
        let mut failure = self.failure.lock().unwrap_or_else(|p| p.into_inner());
        failure.get_or_insert(reason);
    }
}

/// The async side's view of the worker. Cheap to clone.
#[derive(Clone)]
pub struct WorkerHandle {
    shared: Arc<Shared>,
}

/// Builds the engine on the executor thread.
pub type EngineLoader = Box<dyn FnOnce() -> Result<Box<dyn Engine>, String> + Send>;

/// One device to serve on: its name (`cpu`, `cuda:0`, ...) and how to load its own resident
/// copy of the models there.
pub struct DeviceLoader {
    pub name: String,
    pub load: EngineLoader,
}

/// [`start_workers`] with one device, called `device-0`.
pub fn start_worker(load: EngineLoader, config: WorkerConfig) -> WorkerHandle {
    start_workers(
        vec![DeviceLoader {
            name: "device-0".into(),
            load,
        }],
        config,
    )
}

/// Spawns one executor thread per device, all fed by one queue. Each loads its engine, runs a
/// warm-up batch per ensemble, then takes batches; the worker turns ready when every device
/// has. A failed load or warm-up is logged and leaves the worker not ready, with the reason
/// (naming the device) in `failure()`. A batch that fails on a device fails only its own jobs
/// (with the error); the device keeps serving, and its `failed_batches` and `last_error` say so.
pub fn start_workers(devices: Vec<DeviceLoader>, config: WorkerConfig) -> WorkerHandle {
    assert!(!devices.is_empty(), "a worker needs at least one device");
    let device_stats = devices
        .iter()
        .map(|d| DeviceStats {
            name: d.name.clone(),
            state: DeviceState::Loading,
            running_images: 0,
            batches: 0,
            failed_batches: 0,
            last_error: None,
            completed_images: 0,
            images_per_second: 0.0,
        })
        .collect();
    let shared = Arc::new(Shared {
        state: Mutex::new(State {
            queue: Queue::new(config.queue_capacity),
            jobs: HashMap::new(),
            stats: WorkerStats {
                queue_capacity: config.queue_capacity,
                devices: device_stats,
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
    for (index, device) in devices.into_iter().enumerate() {
        let thread_shared = shared.clone();
        std::thread::Builder::new()
            .name(format!("afa-executor-{index}"))
            .spawn(move || super::executor::run_device(thread_shared, index, device))
            .expect("spawning an executor thread");
    }
    WorkerHandle { shared }
}

/// Seconds until `queued` images are likely done at `rate` images/s (1..=600).
pub(super) fn retry_after(queued: usize, rate: f64) -> Duration {
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
            let ahead = full.queued + state.running();
            return Err(SubmitError::QueueFull {
                retry_after: retry_after(ahead + n, state.throughput()),
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
                partial_images: job.partial_images,
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

    /// Why the worker does not serve: a device's models failed to load or to warm up.
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
        stats.running_images = state.running();
        stats.images_per_second = state.throughput();
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
            if state.queue.is_empty() && state.running() == 0 {
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

    /// Stops the executor threads after their current batches.
    pub fn shutdown(&self) {
        self.shared.lock().shutdown = true;
        self.shared.work.notify_all();
    }
}
