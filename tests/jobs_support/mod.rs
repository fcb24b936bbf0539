//! The job-service test harness: a fake-engine server (failing every batch whose first prompt
//! contains "fail") with the dispatcher and sweeper, on a fresh job database (SQLite in a temp
//! folder, or the URL given), and small client helpers.
#![allow(dead_code)]
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use afa::api::{ApiConfig, ApiState, HttpJobCodec, router};
use afa::jobs::{JobService, JobsConfig, run_dispatcher, run_health_probe, run_sweeper};
use afa::pipeline::{ImageSpec, Observer};
use afa::store::{Artifacts, JobStore};
use afa::worker::{BatchKey, BatchOutcome, Catalog, Engine, EngineLoader, JobError, start_worker};
use serde_json::Value;

use super::http_support::*;

/// A fake engine that fails every batch whose first prompt contains "fail".
struct Flaky(FakeEngine);

impl Engine for Flaky {
    fn catalog(&self) -> Catalog {
        self.0.catalog()
    }
    fn run(
        &mut self,
        key: &BatchKey,
        images: &[ImageSpec],
        observer: &mut dyn Observer,
    ) -> Result<BatchOutcome, JobError> {
        if images.iter().any(|i| i.prompt.contains("fail")) {
            return Err(JobError::Failed("injected failure".into()));
        }
        self.0.run(key, images, observer)
    }
}

pub struct JobServer {
    pub server: Server,
    pub jobs: Arc<JobService>,
    pub control: Arc<FakeControl>,
    _tmp: TmpDir,
}

struct TmpDir(std::path::PathBuf);
impl Drop for TmpDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A fake-engine server with a job store in a fresh temp folder.
pub fn start_jobs(step_ms: u64, ttl: Duration, api: ApiConfig) -> JobServer {
    start_jobs_on(None, step_ms, ttl, api)
}

/// A fake-engine server on the job database `url` (default: SQLite in its temp folder), with
/// its files in a fresh temp folder.
pub fn start_jobs_on(
    url: Option<String>,
    step_ms: u64,
    ttl: Duration,
    api: ApiConfig,
) -> JobServer {
    let tmp = std::env::temp_dir().join(format!("afa-jobs-{}", afa::store::random_hex(8).unwrap()));
    std::fs::create_dir_all(&tmp).unwrap();
    let control = Arc::new(FakeControl::default());
    control.step_ms.store(step_ms, Ordering::SeqCst);
    control.release_load.store(true, Ordering::SeqCst);
    let c = control.clone();
    let loader: EngineLoader =
        Box::new(move || Ok(Box::new(Flaky(FakeEngine { control: c })) as Box<dyn Engine>));
    let worker = start_worker(loader, worker_config(1, 8));
    let url = url.unwrap_or_else(|| format!("sqlite://{}", tmp.join("jobs.db").display()));
    let data = tmp.join("data");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let store = JobStore::open(&url).await.unwrap();
            let config = JobsConfig {
                max_attempts: 3,
                result_ttl: ttl,
                url_wait: Duration::from_secs(60),
                lease: Duration::from_secs(30),
                progress_every: Duration::from_millis(100),
            };
            let jobs = Arc::new(JobService::new(
                store,
                Artifacts::open(data).unwrap(),
                config,
            ));
            let state = ApiState::new(worker.clone(), api).with_jobs(jobs.clone());
            let (_stop, stop_rx) = tokio::sync::watch::channel(false);
            let codec = Arc::new(HttpJobCodec::new(state.metrics.clone()));
            tokio::spawn(run_dispatcher(
                jobs.clone(),
                state.worker.clone(),
                codec,
                stop_rx.clone(),
            ));
            tokio::spawn(run_health_probe(jobs.clone(), stop_rx.clone()));
            tokio::spawn(run_sweeper(jobs.clone(), stop_rx));
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let server = Server {
                addr: listener.local_addr().unwrap(),
                worker,
                state: state.clone(),
            };
            tx.send((server, jobs)).unwrap();
            afa::api::serve_http(listener, router(state), std::future::pending())
                .await
                .unwrap();
        });
    });
    let (server, jobs) = rx.recv().unwrap();
    wait_ready(&server, Duration::from_secs(30));
    JobServer {
        server,
        jobs,
        control,
        _tmp: TmpDir(tmp),
    }
}

pub fn client() -> reqwest::Client {
    reqwest::Client::new()
}

pub async fn submit(s: &JobServer, body: Value, key: Option<&str>) -> reqwest::Response {
    let mut r = client().post(s.server.url("/v1/jobs")).json(&body);
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

pub async fn get(s: &JobServer, path: &str, key: Option<&str>) -> reqwest::Response {
    let mut r = client().get(s.server.url(path));
    if let Some(k) = key {
        r = r.bearer_auth(k);
    }
    r.send().await.unwrap()
}

/// Polls the job until it is finished (at most 30 s).
pub async fn finished(s: &JobServer, id: &str, key: Option<&str>) -> Value {
    let t = Instant::now();
    loop {
        let v: Value = get(s, &format!("/v1/jobs/{id}"), key)
            .await
            .json()
            .await
            .unwrap();
        if ["succeeded", "failed", "cancelled"].contains(&v["status"].as_str().unwrap()) {
            return v;
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "job never finished: {v}"
        );
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
}
