//! The worker with a fake engine: batching, FIFO, overload, cancellation (queued and running),
//! panic isolation, readiness and draining.
use std::sync::{Arc, Mutex};
use std::time::Duration;

use afa::ensemble::EnsembleMode;
use afa::pipeline::{ImageSpec, MapsRequest, Observer};
use afa::worker::{
    BatchKey, BatchOutcome, Catalog, Engine, ImageResult, JobError, JobTimings, SubmitError,
    WorkerConfig, WorkerHandle, start_worker,
};

/// Sleeps `step_ms` per step, records batch sizes, panics on the prompt "panic".
mod worker_support;
use worker_support::{catalog, finish, job};

struct FakeEngine {
    step_ms: u64,
    batches: Arc<Mutex<Vec<usize>>>,
}

impl Engine for FakeEngine {
    fn catalog(&self) -> Catalog {
        catalog()
    }

    fn run(
        &mut self,
        key: &BatchKey,
        images: &[ImageSpec],
        observer: &mut dyn Observer,
    ) -> Result<BatchOutcome, JobError> {
        if images.iter().any(|i| i.prompt == "panic") {
            panic!("boom");
        }
        if key.steps > 1 {
            self.batches.lock().unwrap().push(images.len());
        }
        let mut alive = vec![true; images.len()];
        for step in 0..key.steps {
            for (i, a) in alive.iter_mut().enumerate() {
                if observer.is_image_cancelled(i) {
                    *a = false;
                }
            }
            std::thread::sleep(Duration::from_millis(self.step_ms));
            observer.step(step + 1, key.steps);
        }
        Ok(BatchOutcome {
            images: images
                .iter()
                .zip(alive)
                .map(|(s, a)| {
                    a.then(|| ImageResult {
                        seed: s.seed,
                        png: s.seed.to_le_bytes().to_vec(),
                        raster: Default::default(),
                        warnings: vec![],
                        attention_maps: None,
                    })
                })
                .collect(),
            timings: JobTimings::default(),
            experts: vec!["a".into(), "b".into()],
        })
    }
}

fn worker(step_ms: u64, config: WorkerConfig) -> (WorkerHandle, Arc<Mutex<Vec<usize>>>) {
    let batches = Arc::new(Mutex::new(Vec::new()));
    let b = batches.clone();
    let handle = start_worker(
        Box::new(move || {
            Ok(Box::new(FakeEngine {
                step_ms,
                batches: b,
            }) as Box<dyn Engine>)
        }),
        config,
    );
    for _ in 0..200 {
        if handle.is_ready() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    assert!(handle.is_ready());
    (handle, batches)
}

#[test]
fn compatible_jobs_share_batches_and_large_jobs_are_split() {
    let config = WorkerConfig {
        max_batch: 4,
        batch_wait: Duration::from_millis(200),
        ..Default::default()
    };
    let (w, batches) = worker(5, config);
    let a = w.submit(job("a", 2, 10)).unwrap();
    let b = w.submit(job("b", 1, 20)).unwrap();
    let c = w.submit(job("c", 6, 30)).unwrap();
    let (a, b, c) = (finish(a).unwrap(), finish(b).unwrap(), finish(c).unwrap());
    assert_eq!(
        a.images.iter().map(|i| i.seed).collect::<Vec<_>>(),
        vec![10, 11]
    );
    assert_eq!(b.images[0].seed, 20);
    assert_eq!(
        c.images.iter().map(|i| i.seed).collect::<Vec<_>>(),
        (30..36).collect::<Vec<_>>()
    );
    let sizes = batches.lock().unwrap().clone();
    assert_eq!(sizes.iter().sum::<usize>(), 9);
    assert!(sizes.iter().all(|&s| s <= 4), "{sizes:?}");
    assert_eq!(
        sizes[0], 4,
        "the first batch waits for compatible work: {sizes:?}"
    );
}

#[test]
fn overload_is_refused_with_retry_after_and_accepted_work_completes() {
    let config = WorkerConfig {
        max_batch: 2,
        queue_capacity: 4,
        batch_wait: Duration::from_millis(1),
        ..Default::default()
    };
    let (w, _) = worker(10, config);
    let mut accepted = Vec::new();
    let mut refused = 0;
    for i in 0..20 {
        match w.submit(job("x", 1, i)) {
            Ok(t) => accepted.push(t),
            Err(SubmitError::QueueFull { retry_after }) => {
                assert!(retry_after >= Duration::from_secs(1));
                refused += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(refused > 0);
    let n = accepted.len();
    let done = accepted
        .into_iter()
        .map(finish)
        .filter(|r| r.is_ok())
        .count();
    assert_eq!(done, n, "every accepted job completes");
    assert!(w.stats().rejected_full >= refused as u64);
}

#[test]
fn dropping_a_ticket_cancels_queued_and_running_work() {
    let config = WorkerConfig {
        max_batch: 1,
        batch_wait: Duration::from_millis(1),
        ..Default::default()
    };
    let (w, _) = worker(40, config);
    let running = w.submit(job("r", 1, 1)).unwrap();
    let queued = w.submit(job("q", 1, 2)).unwrap();
    let keep = w.submit(job("k", 1, 3)).unwrap();
    std::thread::sleep(Duration::from_millis(60));
    drop(running);
    drop(queued);
    let out = finish(keep).unwrap();
    assert_eq!(out.images[0].seed, 3);
    assert!(w.wait_idle(Duration::from_secs(5)));
    assert_eq!(w.stats().cancelled_images, 2);
}

#[test]
fn a_panicking_batch_fails_only_its_jobs() {
    let config = WorkerConfig {
        max_batch: 1,
        batch_wait: Duration::from_millis(1),
        ..Default::default()
    };
    let (w, _) = worker(1, config);
    let bad = w.submit(job("panic", 1, 1)).unwrap();
    let good = w.submit(job("fine", 1, 2)).unwrap();
    match finish(bad) {
        Err(JobError::Failed(m)) => assert!(m.contains("boom"), "{m}"),
        other => panic!("{other:?}"),
    }
    assert!(finish(good).is_ok());
    assert!(finish(w.submit(job("after", 1, 3)).unwrap()).is_ok());
}

#[test]
fn validation_not_ready_and_draining() {
    let loading = start_worker(
        Box::new(|| {
            std::thread::sleep(Duration::from_millis(300));
            Ok(Box::new(FakeEngine {
                step_ms: 1,
                batches: Arc::default(),
            }) as Box<dyn Engine>)
        }),
        WorkerConfig::default(),
    );
    assert!(!loading.is_ready());
    assert!(matches!(
        loading.submit(job("x", 1, 1)),
        Err(SubmitError::NotReady { .. })
    ));

    let (w, _) = worker(1, WorkerConfig::default());
    let mut unknown = job("x", 1, 1);
    unknown.ensemble = "nope".into();
    assert!(matches!(
        w.submit(unknown),
        Err(SubmitError::UnknownEnsemble(_))
    ));
    let mut bad_mode = job("x", 1, 1);
    bad_mode.mode = EnsembleMode::Merge;
    match w.submit(bad_mode) {
        Err(SubmitError::Invalid { field, .. }) => assert_eq!(field, "ensemble_mode"),
        other => panic!("{other:?}"),
    }
    let mut bad_size = job("x", 1, 1);
    bad_size.width = 100;
    match w.submit(bad_size) {
        Err(SubmitError::Invalid { field, .. }) => assert_eq!(field, "width"),
        other => panic!("{other:?}"),
    }
    let inflight = w.submit(job("x", 2, 1)).unwrap();
    w.begin_drain();
    assert!(!w.is_ready());
    assert!(matches!(
        w.submit(job("x", 1, 1)),
        Err(SubmitError::Draining { .. })
    ));
    assert!(
        finish(inflight).is_ok(),
        "in-flight work finishes while draining"
    );
    assert!(w.wait_idle(Duration::from_secs(5)));
}

#[test]
fn the_catalog_reports_the_precision_each_ensemble_really_runs_in() {
    let registry =
        afa::config::ModelRegistry::load(std::path::Path::new("tests/fixtures/tiny-models.toml"))
            .unwrap();
    for (override_dtype, name) in [(None, "f32"), (Some(candle_core::DType::F16), "f16")] {
        let engine =
            afa::worker::RegistryEngine::load(&registry, &candle_core::Device::Cpu, override_dtype)
                .unwrap();
        let catalog = engine.catalog();
        assert_eq!(catalog.dtype, name);
        assert!(
            catalog.ensembles.iter().all(|e| e.dtype == name),
            "{catalog:?}"
        );
    }
}

#[test]
fn the_registry_engine_serves_the_committed_tiny_ensemble() {
    let registry =
        afa::config::ModelRegistry::load(std::path::Path::new("tests/fixtures/tiny-models.toml"))
            .unwrap();
    let handle = start_worker(
        Box::new(move || {
            afa::worker::RegistryEngine::load(&registry, &candle_core::Device::Cpu, None)
                .map(|e| Box::new(e) as Box<dyn Engine>)
        }),
        WorkerConfig::default(),
    );
    for _ in 0..600 {
        if handle.is_ready() {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(handle.is_ready());
    let catalog = handle.catalog().unwrap();
    let tiny = catalog.ensemble("tiny-afa").unwrap();
    assert_eq!(tiny.members.len(), 2);
    assert!(
        tiny.modes.contains(&"merge".to_string())
            && tiny.modes.contains(&"single:tiny-b".to_string())
    );
    let mut j = job("a photo of a cat", 2, 5);
    j.ensemble = "tiny-afa".into();
    j.width = 128;
    j.height = 128;
    j.steps = 2;
    j.attention_maps = MapsRequest::Averaged(afa::pipeline::MapPoints::ALL);
    let out = finish(handle.submit(j.clone()).unwrap()).unwrap();
    assert_eq!(out.images.len(), 2);
    assert_eq!(
        out.experts,
        vec!["tiny-a".to_string(), "tiny-b".to_string()]
    );
    for image in &out.images {
        assert!(image.png.starts_with(b"\x89PNG"));
        let maps = image.attention_maps.as_ref().unwrap();
        assert_eq!(maps.len(), 25);
        assert_eq!(maps[0].shape, [2, 16, 16]);
        let sum: f32 = (0..256)
            .map(|p| maps[0].values[p] + maps[0].values[256 + p])
            .sum::<f32>()
            / 256.0;
        assert!((sum - 1.0).abs() < 1e-4);
    }
    // Same seeds alone -> same PNG bytes (seed reproducible across batch sizes).
    let mut alone = j.clone();
    alone.images.remove(0);
    alone.attention_maps = MapsRequest::Off;
    let again = finish(handle.submit(alone).unwrap()).unwrap();
    assert_eq!(again.images[0].seed, 6);
    assert!(again.images[0].png.len() > 100);
}
