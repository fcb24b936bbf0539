//! Wiring for `afa serve`: registry -> worker (the executor thread loads the models) -> HTTP
//! router -> listener, and the shutdown sequence: on SIGTERM/SIGINT `/ready` turns 503 and new
//! work is refused (503 + Retry-After) while queued and running work finishes within the
//! grace period; then the listener closes and the process exits 0. The job store is opened and
//! recovered before the listener starts: interrupted jobs go back to the queue, and the
//! dispatcher feeds them to the worker once the models are loaded.
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use candle_core::{DType, Device};
use tokio::net::TcpListener;

use crate::api::{self, ApiConfig, ApiKeys, ApiState};
use crate::config::ModelRegistry;
use crate::jobs::{self, JobService, JobsConfig};
use crate::store::{Artifacts, JobStore};
use crate::worker::{
    DeviceLoader, Engine, EngineLoader, RegistryEngine, WorkerConfig, WorkerHandle, device_name,
    start_workers,
};

/// Everything `serve` needs, resolved from flags and environment.
#[derive(Debug, Clone)]
pub struct ServeSettings {
    pub config: PathBuf,
    pub bind: String,
    pub worker: WorkerConfig,
    pub shutdown_grace: Duration,
    pub api_keys: ApiKeys,
    /// One executor (one resident copy of every ensemble) per device.
    pub devices: Vec<Device>,
    /// Overrides every ensemble's dtype when set.
    pub dtype: Option<DType>,
    /// The job database (`sqlite://path`).
    pub database_url: crate::store::DatabaseUrl,
    /// Where job artifacts are written.
    pub data_dir: PathBuf,
    pub jobs: JobsConfig,
    /// Body limit of the routes that carry pictures.
    pub max_upload_bytes: usize,
    /// A folder, or `s3://bucket[/prefix]` for artifacts shared by replicas; `None`: `data_dir`.
    pub artifact_store: Option<String>,
}

/// Runs the server until a shutdown signal (or a failed model load, which is an error).
pub fn serve(settings: ServeSettings) -> anyhow::Result<()> {
    let registry = ModelRegistry::load(&settings.config)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("afa-http")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(serve_registry(settings, registry))
}

/// The `/info` view of the settings (no secrets).
fn settings_json(s: &ServeSettings) -> serde_json::Value {
    serde_json::json!({
        "max_batch": s.worker.max_batch,
        "batch_wait_ms": s.worker.batch_wait.as_millis() as u64,
        "queue_capacity_images": s.worker.queue_capacity,
        "request_timeout_s": s.worker.request_timeout.as_secs(),
        "shutdown_grace_s": s.shutdown_grace.as_secs(),
        "auth": !s.api_keys.is_empty(),
        "result_ttl_s": s.jobs.result_ttl.as_secs(),
        "job_max_attempts": s.jobs.max_attempts,
        "job_lease_s": s.jobs.lease.as_secs(),
        "job_progress_ms": s.jobs.progress_every.as_millis() as u64,
        "devices": s.devices.iter().map(device_name).collect::<Vec<_>>(),
    })
}

/// The artifact store: `--artifact-store` (a folder, or an `s3://` bucket shared by replicas,
/// probed now) or the local data dir.
fn open_artifacts(settings: &ServeSettings) -> anyhow::Result<Artifacts> {
    match &settings.artifact_store {
        Some(spec) => {
            let artifacts = Artifacts::open_spec(spec)
                .with_context(|| format!("opening the artifact store {spec}"))?;
            eprintln!("afa serve: artifacts in {spec}");
            Ok(artifacts)
        }
        None => Artifacts::open(&settings.data_dir)
            .with_context(|| format!("opening the data dir {}", settings.data_dir.display())),
    }
}

/// Opens, migrates and recovers the job store.
async fn open_jobs(settings: &ServeSettings) -> anyhow::Result<Arc<JobService>> {
    let store = JobStore::open(settings.database_url.expose())
        .await
        .with_context(|| format!("opening the job database {}", settings.database_url))?;
    let artifacts = open_artifacts(settings)?;
    let r = store
        .recover(settings.jobs.max_attempts)
        .await
        .context("recovering interrupted jobs")?;
    eprintln!(
        "afa serve: job store ready ({} queued, of which {} interrupted and re-queued; {} failed after too many attempts)",
        r.queued,
        r.requeued.len(),
        r.failed.len()
    );
    Ok(Arc::new(JobService::new(store, artifacts, settings.jobs)))
}

async fn serve_registry(settings: ServeSettings, registry: ModelRegistry) -> anyhow::Result<()> {
    let jobs = open_jobs(&settings).await?;
    let (failed_tx, mut failed_rx) = tokio::sync::mpsc::unbounded_channel::<String>();
    let registry = Arc::new(registry);
    let loaders = settings
        .devices
        .iter()
        .map(|device| {
            let (registry, device, dtype) = (registry.clone(), device.clone(), settings.dtype);
            let failed_tx = failed_tx.clone();
            let name = device_name(&device);
            let load: EngineLoader =
                Box::new(
                    move || match RegistryEngine::load(&registry, &device, dtype) {
                        Ok(engine) => Ok(Box::new(engine) as Box<dyn Engine>),
                        Err(e) => {
                            let _ = failed_tx.send(format!("{}: {e}", device_name(&device)));
                            Err(e)
                        }
                    },
                );
            DeviceLoader { name, load }
        })
        .collect();
    drop(failed_tx);
    let worker = start_workers(loaders, settings.worker);
    let config = ApiConfig {
        api_keys: settings.api_keys.clone(),
        settings: settings_json(&settings),
        max_upload_bytes: settings.max_upload_bytes,
        ..ApiConfig::default()
    };
    let state = ApiState::new(worker.clone(), config).with_jobs(jobs.clone());
    let router = api::router(state.clone());
    let (jobs_stop, jobs_stop_rx) = tokio::sync::watch::channel(false);
    let codec = Arc::new(api::HttpJobCodec::new(state.metrics.clone()));
    tokio::spawn(jobs::run_dispatcher(
        jobs.clone(),
        worker.clone(),
        codec,
        jobs_stop_rx.clone(),
    ));
    tokio::spawn(jobs::run_health_probe(jobs.clone(), jobs_stop_rx.clone()));
    tokio::spawn(jobs::run_sweeper(jobs.clone(), jobs_stop_rx));
    let listener = TcpListener::bind(&settings.bind)
        .await
        .with_context(|| format!("binding {}", settings.bind))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, config = %settings.config.display(), "listening; loading models");
    eprintln!("afa serve: listening on http://{addr} (loading models; /ready turns 200 when done)");
    tokio::spawn(announce_ready(worker.clone(), addr));
    let (stop_tx, stop_rx) = tokio::sync::oneshot::channel::<()>();
    let mut server = tokio::spawn(api::serve_http(listener, router, async move {
        let _ = stop_rx.await;
    }));
    tokio::select! {
        _ = shutdown_signal() => {}
        Some(message) = failed_rx.recv() => {
            anyhow::bail!("loading models failed: {message}");
        }
        result = &mut server => {
            result.context("the server task failed")?.context("serving HTTP")?;
            return Ok(());
        }
    }
    drain(&worker, settings.shutdown_grace).await;
    let _ = jobs_stop.send(true);
    // Let followers record the results of finished jobs; unfinished ones go back to the queue.
    let t = std::time::Instant::now();
    while jobs.in_flight() > 0 && t.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let released = jobs.release_held().await;
    if released > 0 {
        eprintln!("afa serve: {released} unfinished jobs returned to the queue");
    }
    let _ = stop_tx.send(());
    // Responses of finished work are being written; give them a moment, not forever.
    if tokio::time::timeout(Duration::from_secs(5), &mut server)
        .await
        .is_err()
    {
        tracing::warn!("closing connections that were still open");
    }
    worker.shutdown();
    jobs.store.close().await;
    eprintln!("afa serve: stopped");
    Ok(())
}

/// Stops admitting and waits for queued and running work, at most `grace`.
async fn drain(worker: &WorkerHandle, grace: Duration) {
    let stats = worker.stats();
    eprintln!(
        "afa serve: draining ({} queued, {} running images; grace {}s)",
        stats.queued_images,
        stats.running_images,
        grace.as_secs()
    );
    worker.begin_drain();
    let w = worker.clone();
    let idle = tokio::task::spawn_blocking(move || w.wait_idle(grace))
        .await
        .unwrap_or(false);
    if idle {
        tracing::info!("drained: all accepted work finished");
    } else {
        let s = worker.stats();
        tracing::warn!(
            queued = s.queued_images,
            running = s.running_images,
            "grace period over with work in flight; it is abandoned"
        );
    }
    // Let handlers pick up their last results before the listener stops.
    tokio::time::sleep(Duration::from_millis(100)).await;
}

async fn announce_ready(worker: WorkerHandle, addr: SocketAddr) {
    let started = std::time::Instant::now();
    while !worker.is_ready() {
        if worker.is_draining() {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!(
        "afa serve: ready on http://{addr} after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    if let Some(c) = worker.catalog() {
        for e in c.ensembles.iter().filter(|e| e.untrained) {
            eprintln!(
                "afa serve: note: ensemble '{}' has UNTRAINED (random) weights: it draws noise",
                e.name
            );
        }
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {}
        _ = term => {}
    }
    eprintln!("afa serve: shutdown signal received");
}
