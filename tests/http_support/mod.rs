//! Helpers of the HTTP tests: a server on a real listener (port 0) over the committed tiny
//! ensemble or over a fake engine that is slow and controllable, and small client helpers.
#![allow(dead_code)]
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afa::api::{ApiConfig, ApiState, router, serve_http};
use afa::pipeline::{ImageSpec, Limits, Observer, Raster};
use afa::schedulers::SchedulerKind;
use afa::worker::{
    BatchKey, BatchOutcome, Catalog, Engine, EngineLoader, EnsembleCatalog, ImageResult, JobError,
    JobTimings, WorkerConfig, WorkerHandle, start_worker,
};

/// A running server: its address and worker. The server lives on its own thread (and
/// runtime) for the rest of the test binary.
#[derive(Clone)]
pub struct Server {
    pub addr: SocketAddr,
    pub worker: WorkerHandle,
    pub state: ApiState,
}

impl Server {
    /// `GET path` (no key) as JSON.
    pub async fn get_json(&self, path: &str) -> serde_json::Value {
        reqwest::get(self.url(path))
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }
}

/// Starts the API over `loader` on 127.0.0.1:0 in a background thread.
pub fn start(loader: EngineLoader, worker: WorkerConfig, config: ApiConfig) -> Server {
    let handle = start_worker(loader, worker);
    let state = ApiState::new(handle.clone(), config);
    let app = router(state.clone());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            tx.send(listener.local_addr().unwrap()).unwrap();
            serve_http(listener, app, std::future::pending())
                .await
                .unwrap();
        });
    });
    let addr = rx.recv().unwrap();
    Server {
        addr,
        worker: handle,
        state,
    }
}

/// The committed tiny ensemble (`tests/fixtures/tiny-models.toml`), loaded for real on the CPU.
pub fn start_tiny(max_batch: usize, api: ApiConfig) -> Server {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-models.toml");
    let registry = afa::config::ModelRegistry::load(&path).unwrap();
    let loader: EngineLoader = Box::new(move || {
        let engine = afa::worker::RegistryEngine::load(&registry, &candle_core::Device::Cpu, None)?;
        Ok(Box::new(engine) as Box<dyn Engine>)
    });
    let config = WorkerConfig {
        max_batch,
        batch_wait: Duration::from_millis(200),
        queue_capacity: 64,
        request_timeout: Duration::from_secs(600),
    };
    let server = start(loader, config, api);
    wait_ready(&server, Duration::from_secs(300));
    server
}

pub fn wait_ready(server: &Server, limit: Duration) {
    let t = std::time::Instant::now();
    while !server.worker.is_ready() {
        assert!(t.elapsed() < limit, "the server did not get ready");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Controls and observations of a [`FakeEngine`].
#[derive(Default)]
pub struct FakeControl {
    /// Milliseconds per denoising step.
    pub step_ms: AtomicU64,
    /// Images started (per batch entry).
    pub started_images: AtomicUsize,
    /// Images dropped because the observer said they were cancelled.
    pub cancelled_images: AtomicUsize,
    /// Images finished.
    pub finished_images: AtomicUsize,
    /// Batch sizes seen.
    pub batches: Mutex<Vec<usize>>,
    /// While false, loading blocks.
    pub release_load: AtomicBool,
    /// While true, every batch fails (the engine is broken).
    pub fail_runs: AtomicBool,
}

impl FakeControl {
    /// Forgets what the warm-up did.
    pub fn reset(&self) {
        self.started_images.store(0, Ordering::SeqCst);
        self.cancelled_images.store(0, Ordering::SeqCst);
        self.finished_images.store(0, Ordering::SeqCst);
        self.batches.lock().unwrap().clear();
    }
}

/// An engine without models: each step sleeps `step_ms`; images are 8x8 PNGs.
pub struct FakeEngine {
    pub control: Arc<FakeControl>,
}

pub fn fake_catalog() -> Catalog {
    Catalog {
        ensembles: vec![EnsembleCatalog {
            name: "fake".into(),
            description: Some("test engine".into()),
            untrained: true,
            members: vec![("a".into(), "h1".into()), ("b".into(), "h2".into())],
            modes: ["afa", "mean", "single:a", "single:b"]
                .map(String::from)
                .to_vec(),
            schedulers: SchedulerKind::ALL.iter().map(|k| k.to_string()).collect(),
            default_steps: 4,
            default_guidance: 7.5,
            default_scheduler: "ddim".into(),
            default_width: 64,
            default_height: 64,
            default_mode: "afa".into(),
            allowed_sizes: vec![],
            created: 1,
            dtype: "f32".into(),
            map_downscales: vec![
                1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1,
            ],
        }],
        default_ensemble: "fake".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        limits: Limits::default(),
    }
}

impl Engine for FakeEngine {
    fn catalog(&self) -> Catalog {
        fake_catalog()
    }

    fn run(
        &mut self,
        key: &BatchKey,
        images: &[ImageSpec],
        observer: &mut dyn Observer,
    ) -> Result<BatchOutcome, JobError> {
        let c = &self.control;
        if c.fail_runs.load(Ordering::SeqCst) {
            return Err(JobError::Failed("the device fell off the bus".into()));
        }
        c.batches.lock().unwrap().push(images.len());
        c.started_images.fetch_add(images.len(), Ordering::SeqCst);
        let mut alive = vec![true; images.len()];
        for step in 0..key.steps {
            for (i, a) in alive.iter_mut().enumerate() {
                if *a && observer.is_image_cancelled(i) {
                    *a = false;
                    c.cancelled_images.fetch_add(1, Ordering::SeqCst);
                }
            }
            if !alive.iter().any(|a| *a) {
                break;
            }
            std::thread::sleep(Duration::from_millis(c.step_ms.load(Ordering::SeqCst)));
            observer.step(step + 1, key.steps);
            // Previews as the executor asks for them: a flat grey of the batch's size.
            for i in observer.previews_wanted(step + 1, key.steps) {
                let rgb = vec![(step * 10) as u8; key.width * key.height * 3];
                observer.preview(i, step + 1, key.steps, rgb);
            }
        }
        let out = images
            .iter()
            .zip(&alive)
            .map(|(spec, a)| {
                a.then(|| {
                    c.finished_images.fetch_add(1, Ordering::SeqCst);
                    let rgb = vec![(spec.seed % 251) as u8; 8 * 8 * 3];
                    ImageResult {
                        seed: spec.seed,
                        png: afa::pipeline::png::encode_rgb_png(&rgb, 8, 8, None).unwrap(),
                        raster: Raster {
                            width: 8,
                            height: 8,
                            rgb,
                            parameters: format!("{}\nSeed: {}", spec.prompt, spec.seed),
                        },
                        warnings: vec![],
                        attention_maps: None,
                    }
                })
            })
            .collect();
        Ok(BatchOutcome {
            images: out,
            timings: JobTimings {
                denoise: Duration::from_millis(1),
                ..Default::default()
            },
            experts: vec!["a".into(), "b".into()],
        })
    }
}

/// A fake-engine server; loading waits for `control.release_load` when `gated`.
pub fn start_fake(
    worker: WorkerConfig,
    config: ApiConfig,
    gated: bool,
) -> (Server, Arc<FakeControl>) {
    let control = Arc::new(FakeControl::default());
    control.release_load.store(!gated, Ordering::SeqCst);
    let c = control.clone();
    let loader: EngineLoader = Box::new(move || {
        while !c.release_load.load(Ordering::SeqCst) {
            std::thread::sleep(Duration::from_millis(10));
        }
        Ok(Box::new(FakeEngine { control: c }) as Box<dyn Engine>)
    });
    (start(loader, worker, config), control)
}

pub fn worker_config(max_batch: usize, queue_capacity: usize) -> WorkerConfig {
    WorkerConfig {
        max_batch,
        batch_wait: Duration::from_millis(5),
        queue_capacity,
        request_timeout: Duration::from_secs(120),
    }
}

/// Checks the error envelope and returns (status, param).
pub async fn envelope(resp: reqwest::Response) -> (u16, Option<String>, serde_json::Value) {
    let status = resp.status().as_u16();
    assert!(
        resp.headers().contains_key("x-request-id"),
        "no x-request-id on a {status}"
    );
    let body: serde_json::Value = resp.json().await.expect("an error body in JSON");
    let e = &body["error"];
    for key in ["message", "type", "param", "code"] {
        assert!(e.get(key).is_some(), "envelope lacks {key}: {body}");
    }
    assert!(
        e["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    (status, e["param"].as_str().map(String::from), body)
}

/// Decodes a PNG: (width, height, `parameters` text chunk).
pub fn decode_png(bytes: &[u8]) -> (u32, u32, Option<String>) {
    let decoder = png::Decoder::new(std::io::Cursor::new(bytes));
    let mut reader = decoder.read_info().expect("a valid PNG");
    let mut buf = vec![0; reader.output_buffer_size().unwrap()];
    let frame = reader.next_frame(&mut buf).expect("PNG pixels");
    let info = reader.info();
    let mut params = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "parameters")
        .map(|c| c.text.clone());
    if params.is_none() {
        params = info
            .utf8_text
            .iter()
            .find(|c| c.keyword == "parameters")
            .and_then(|c| c.get_text().ok());
    }
    (frame.width, frame.height, params)
}

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct Sse {
    pub event: String,
    pub data: String,
}

/// Splits an event-stream body into events (comments dropped).
pub fn parse_sse(text: &str) -> Vec<Sse> {
    text.split("\n\n")
        .filter_map(|block| {
            let mut event = String::from("message");
            let mut data = Vec::new();
            for line in block.lines() {
                if let Some(v) = line.strip_prefix("event:") {
                    event = v.trim().to_string();
                } else if let Some(v) = line.strip_prefix("data:") {
                    data.push(v.strip_prefix(' ').unwrap_or(v).to_string());
                }
            }
            (!data.is_empty()).then(|| Sse {
                event,
                data: data.join("\n"),
            })
        })
        .collect()
}

/// Starts the real `afa serve` binary on the tests' tiny registry at 127.0.0.1:0 with
/// `--device cpu --max-batch 1` plus `extra` arguments; returns the child and its address
/// (read from the "listening on" log line).
pub fn spawn_serve(extra: &[String]) -> (std::process::Child, String) {
    spawn_serve_with_env(extra, &[])
}

/// [`spawn_serve`] with these environment variables set for the server.
pub fn spawn_serve_with_env(
    extra: &[String],
    env: &[(String, String)],
) -> (std::process::Child, String) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    let root = env!("CARGO_MANIFEST_DIR");
    let mut child = Command::new(env!("CARGO_BIN_EXE_afa"))
        .envs(env.iter().map(|(k, v)| (k, v)))
        .args([
            "serve",
            "--config",
            &format!("{root}/tests/fixtures/tiny-models.toml"),
        ])
        .args([
            "--bind",
            "127.0.0.1:0",
            "--device",
            "cpu",
            "--max-batch",
            "1",
        ])
        .args(extra)
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let stderr = BufReader::new(child.stderr.take().unwrap());
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in stderr.lines().map_while(Result::ok) {
            if let Some(rest) = line.split("listening on http://").nth(1) {
                let _ = tx.send(rest.split_whitespace().next().unwrap().to_string());
            }
        }
    });
    let addr = rx
        .recv_timeout(Duration::from_secs(60))
        .expect("the server did not start");
    (child, addr)
}

/// Polls `/ready` until it answers 200 (at most two minutes).
pub async fn wait_ready_at(client: &reqwest::Client, addr: &str) {
    let t = std::time::Instant::now();
    while client
        .get(format!("http://{addr}/ready"))
        .send()
        .await
        .map(|r| r.status() != 200)
        .unwrap_or(true)
    {
        assert!(t.elapsed() < Duration::from_secs(120), "never ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
