//! The job service: the store, the artifact files and the live progress (and lease) of
//! dispatched jobs, shared by the HTTP routes, the dispatcher, the followers and the heartbeat.
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{Notify, watch};

use crate::store::{Artifacts, JobStore, Lease};
use crate::worker::Raster;

/// Settings of the job service.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct JobsConfig {
    /// A job handed to the worker this many times without finishing ends `failed`.
    pub max_attempts: u32,
    /// Finished jobs (rows and files) are removed this long after they finished.
    pub result_ttl: Duration,
    /// How long `response_format: "url"` waits for its job.
    pub url_wait: Duration,
    /// A dispatched job's lease: renewed every third of it while the job runs; a replica that
    /// stops renewing loses its jobs to the queue this long after its last renewal.
    pub lease: Duration,
    /// A running job's progress is written to its row at most this often (`progress.rs`).
    pub progress_every: Duration,
}

impl Default for JobsConfig {
    fn default() -> Self {
        Self {
            max_attempts: 3,
            result_ttl: Duration::from_secs(24 * 3600),
            url_wait: Duration::from_secs(600),
            lease: Duration::from_secs(30),
            progress_every: PROGRESS_EVERY,
        }
    }
}

/// The default of [`JobsConfig::progress_every`]: at most two progress writes a second per
/// running job.
pub const PROGRESS_EVERY: Duration = Duration::from_millis(500);

/// Live progress of a dispatched job, in the memory of the replica running it (its position and
/// step are also written to the row: `progress.rs`; previews are not).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Live {
    /// Images ahead of it in the worker's queue; `None` once it runs.
    pub position: Option<usize>,
    pub step: usize,
    pub total: usize,
    /// The latest preview (`partial_images`), if any came.
    pub preview: Option<LivePreview>,
}

/// A preview of a running job's image: the predicted clean image after step `step`.
#[derive(Debug, Clone, PartialEq)]
pub struct LivePreview {
    /// Counts the job's previews from 1, so a follower sees which it has sent.
    pub seq: usize,
    /// The image's index in the job.
    pub index: usize,
    pub step: usize,
    pub total: usize,
    pub raster: Arc<Raster>,
}

struct LiveEntry {
    tx: watch::Sender<Live>,
    cancel: Arc<Notify>,
    lease: Lease,
}

/// Store + files + live state, shared by the routes, the dispatcher and the followers.
pub struct JobService {
    pub store: JobStore,
    pub artifacts: Artifacts,
    pub config: JobsConfig,
    /// This process's name as a lease owner (unique per process).
    pub replica: String,
    live: Mutex<HashMap<String, LiveEntry>>,
    /// A job was queued.
    pub(super) wake: Notify,
    /// A dispatched job finished (worker capacity freed).
    pub(super) freed: Notify,
    pub(super) in_flight: AtomicUsize,
    pub(super) in_flight_images: AtomicUsize,
    /// Whether the database answered the last health probe (`health.rs`).
    pub(super) database_ok: AtomicBool,
}

impl JobService {
    /// Whether the job database answered the last health probe (true until one fails).
    pub fn database_ok(&self) -> bool {
        self.database_ok.load(Ordering::SeqCst)
    }

    pub fn new(store: JobStore, artifacts: Artifacts, config: JobsConfig) -> Self {
        let replica = format!(
            "replica-{}",
            crate::store::random_hex(6).unwrap_or_else(|_| std::process::id().to_string())
        );
        Self {
            store,
            artifacts,
            config,
            replica,
            live: Mutex::new(HashMap::new()),
            wake: Notify::new(),
            freed: Notify::new(),
            in_flight: AtomicUsize::new(0),
            in_flight_images: AtomicUsize::new(0),
            database_ok: AtomicBool::new(true),
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

    /// Gives the jobs still dispatched here back to the queue (a draining server whose grace
    /// period is over): another replica runs them now, not when their leases expire; the
    /// attempt is not counted. Results that still arrive here are discarded (lease lost).
    /// How many were released.
    pub async fn release_held(&self) -> usize {
        let mut released = 0;
        for lease in self.held_leases() {
            match self.store.release(&lease).await {
                Ok(true) => released += 1,
                Ok(false) => {}
                Err(e) => tracing::error!(job = %lease.job_id, "releasing the job's lease: {e}"),
            }
        }
        released
    }

    /// The leases of the dispatched jobs (for the heartbeat).
    pub(super) fn held_leases(&self) -> Vec<Lease> {
        self.live_map().values().map(|e| e.lease.clone()).collect()
    }

    pub(super) fn start_live(&self, lease: &Lease) -> Arc<Notify> {
        let id = &lease.job_id;
        let (tx, _) = watch::channel(Live {
            position: Some(0),
            ..Live::default()
        });
        let cancel = Arc::new(Notify::new());
        let older = self.live_map().insert(
            id.to_string(),
            LiveEntry {
                tx,
                cancel: cancel.clone(),
                lease: lease.clone(),
            },
        );
        // Claimed again while an older attempt still ran here (its lease had expired): that
        // attempt's result would be discarded anyway; stop it.
        if let Some(older) = older {
            older.cancel.notify_one();
        }
        cancel
    }

    /// Forgets a finished job's live progress (its followers see the channel close), unless a
    /// newer attempt of the job took its place.
    pub(super) fn end_live(&self, lease: &Lease) {
        let mut live = self.live_map();
        if live.get(&lease.job_id).is_some_and(|e| e.lease == *lease) {
            live.remove(&lease.job_id);
        }
    }

    pub(super) fn publish(&self, id: &str, f: impl FnOnce(&mut Live)) {
        if let Some(e) = self.live_map().get(id) {
            e.tx.send_modify(f);
        }
    }
}
