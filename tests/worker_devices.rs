//! One worker, several devices (fake ones): each device's executor takes batches from the one
//! queue at the same time, counts its own work, and a device whose batches keep failing goes
//! out of service while the others serve; when none is left, queued work fails clearly.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use afa::ensemble::EnsembleMode;
use afa::pipeline::{ImageSpec, Limits, MapsRequest, Observer};
use afa::schedulers::SchedulerKind;
use afa::worker::{
    BatchKey, BatchOutcome, Catalog, DeviceLoader, DeviceState, Engine, EnsembleCatalog,
    GenerationJob, ImageResult, JobError, JobEvent, JobOutput, JobTicket, JobTimings,
    MAX_CONSECUTIVE_FAILURES, SubmitError, WorkerConfig, WorkerHandle, start_workers,
};

/// How a fake device behaves.
#[derive(Clone, Copy, PartialEq)]
enum Behaviour {
    /// Sleeps a little per step and returns images.
    Works,
    /// Every real batch (not the warm-up) fails, like a GPU in a broken state.
    Broken,
}

/// Counts batches running at once across devices, and the most ever seen.
#[derive(Default)]
struct Overlap {
    running: Mutex<usize>,
    changed: Condvar,
    most: AtomicUsize,
}

impl Overlap {
    /// Marks a batch as running and waits (at most a second) until `want` batches run at once.
    fn enter_and_wait_for(&self, want: usize) {
        let mut running = self.running.lock().unwrap();
        *running += 1;
        self.most.fetch_max(*running, Ordering::SeqCst);
        self.changed.notify_all();
        let deadline = Instant::now() + Duration::from_secs(1);
        while *running < want && Instant::now() < deadline {
            running = self
                .changed
                .wait_timeout(running, Duration::from_millis(10))
                .unwrap()
                .0;
        }
    }

    fn leave(&self) {
        *self.running.lock().unwrap() -= 1;
        self.changed.notify_all();
    }
}

struct FakeDevice {
    name: String,
    behaviour: Behaviour,
    overlap: Arc<Overlap>,
    /// How many batches should be seen running at once before one finishes.
    wait_for: usize,
}

fn catalog() -> Catalog {
    Catalog {
        ensembles: vec![EnsembleCatalog {
            name: "fake".into(),
            description: None,
            untrained: true,
            members: vec![("a".into(), "0".into()), ("b".into(), "1".into())],
            modes: vec!["afa".into()],
            schedulers: vec!["ddim".into()],
            default_steps: 4,
            default_guidance: 7.5,
            default_scheduler: "ddim".into(),
            default_width: 64,
            default_height: 64,
            default_mode: "afa".into(),
            allowed_sizes: vec![],
            created: 0,
            dtype: "f32".into(),
            map_downscales: vec![],
        }],
        default_ensemble: "fake".into(),
        device: "cpu".into(),
        dtype: "f32".into(),
        limits: Limits::default(),
    }
}

impl Engine for FakeDevice {
    fn catalog(&self) -> Catalog {
        catalog()
    }

    fn run(
        &mut self,
        key: &BatchKey,
        images: &[ImageSpec],
        observer: &mut dyn Observer,
    ) -> Result<BatchOutcome, JobError> {
        let warm_up = key.steps == 1;
        if !warm_up && self.behaviour == Behaviour::Broken {
            // Not instantly, so a test can submit all its jobs before the device gives up.
            std::thread::sleep(Duration::from_millis(20));
            return Err(JobError::Failed(format!("{} was lost", self.name)));
        }
        if !warm_up {
            self.overlap.enter_and_wait_for(self.wait_for);
        }
        for step in 0..key.steps {
            std::thread::sleep(Duration::from_millis(2));
            observer.step(step + 1, key.steps);
        }
        if !warm_up {
            self.overlap.leave();
        }
        Ok(BatchOutcome {
            images: images
                .iter()
                .map(|s| {
                    Some(ImageResult {
                        seed: s.seed,
                        // Which device drew it, so tests can tell.
                        png: self.name.as_bytes().to_vec(),
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

fn config() -> WorkerConfig {
    WorkerConfig {
        max_batch: 1,
        batch_wait: Duration::from_millis(1),
        queue_capacity: 64,
        ..Default::default()
    }
}

/// A worker over fake devices named `dev-0`, `dev-1`, ... behaving as listed.
fn workers(behaviours: &[Behaviour], wait_for: usize) -> (WorkerHandle, Arc<Overlap>) {
    let overlap = Arc::new(Overlap::default());
    let devices = behaviours
        .iter()
        .enumerate()
        .map(|(i, &behaviour)| {
            let (name, overlap) = (format!("dev-{i}"), overlap.clone());
            DeviceLoader {
                name: name.clone(),
                load: Box::new(move || {
                    Ok(Box::new(FakeDevice {
                        name,
                        behaviour,
                        overlap,
                        wait_for,
                    }) as Box<dyn Engine>)
                }),
            }
        })
        .collect();
    let handle = start_workers(devices, config());
    wait_until(|| handle.is_ready());
    (handle, overlap)
}

fn wait_until(mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn job(seed: u64) -> GenerationJob {
    GenerationJob {
        ensemble: "fake".into(),
        mode: EnsembleMode::Afa,
        images: vec![ImageSpec {
            prompt: "x".into(),
            negative_prompt: String::new(),
            seed,
            guidance_scale: 7.5,
        }],
        width: 64,
        height: 64,
        steps: 3,
        scheduler: SchedulerKind::Ddim,
        attention_maps: MapsRequest::Off,
    }
}

fn finish(mut ticket: JobTicket) -> Result<JobOutput, JobError> {
    loop {
        match ticket.events.blocking_recv() {
            Some(JobEvent::Finished(r)) => return r,
            Some(_) => continue,
            None => panic!("events ended without Finished"),
        }
    }
}

#[test]
fn every_device_takes_batches_from_the_one_queue_at_the_same_time() {
    let (w, overlap) = workers(&[Behaviour::Works, Behaviour::Works], 2);
    let tickets: Vec<_> = (0..8).map(|i| w.submit(job(100 + i)).unwrap()).collect();
    let outputs: Vec<_> = tickets.into_iter().map(|t| finish(t).unwrap()).collect();
    for (i, out) in outputs.iter().enumerate() {
        assert_eq!(
            out.images[0].seed,
            100 + i as u64,
            "each job keeps its seed"
        );
    }
    assert_eq!(
        overlap.most.load(Ordering::SeqCst),
        2,
        "both devices ran a batch at once"
    );
    let drawn_by = |name: &str| {
        outputs
            .iter()
            .filter(|o| o.images[0].png == name.as_bytes())
            .count()
    };
    let stats = w.stats();
    let names: Vec<_> = stats.devices.iter().map(|d| d.name.as_str()).collect();
    assert_eq!(names, ["dev-0", "dev-1"]);
    for d in &stats.devices {
        assert_eq!(d.state, DeviceState::Ready);
        assert!(d.completed_images > 0, "{} got no work: {stats:?}", d.name);
        assert_eq!(d.completed_images as usize, drawn_by(&d.name));
        assert_eq!((d.batches, d.failed_batches), (d.completed_images, 0));
        assert_eq!(d.running_images, 0);
    }
    assert_eq!(stats.completed_images, 8);
    assert!(w.wait_idle(Duration::from_secs(1)));
}

#[test]
fn a_device_whose_batches_keep_failing_goes_out_of_service_and_the_others_serve() {
    let (w, _) = workers(&[Behaviour::Broken, Behaviour::Works], 1);
    let tickets: Vec<_> = (0..20).map(|i| w.submit(job(i)).unwrap()).collect();
    let mut failed = 0;
    for ticket in tickets {
        match finish(ticket) {
            Ok(out) => assert_eq!(out.images[0].png, b"dev-1"),
            Err(JobError::Failed(m)) => {
                assert!(m.contains("dev-0 was lost"), "{m}");
                failed += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(failed, MAX_CONSECUTIVE_FAILURES);
    let stats = w.stats();
    match &stats.devices[0].state {
        DeviceState::Failed(reason) => {
            assert!(
                reason.contains("3 batches in a row failed on dev-0"),
                "{reason}"
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(stats.devices[0].failed_batches, 3);
    assert_eq!(stats.devices[1].state, DeviceState::Ready);
    assert!(w.is_ready(), "one healthy device keeps the worker serving");
    assert_eq!(w.failure(), None);
    for i in 0..5 {
        let out = finish(w.submit(job(50 + i)).unwrap()).unwrap();
        assert_eq!(out.images[0].png, b"dev-1");
    }
}

#[test]
fn when_every_device_is_out_of_service_queued_work_fails_and_the_worker_is_not_ready() {
    let (w, _) = workers(&[Behaviour::Broken, Behaviour::Broken], 1);
    let tickets: Vec<_> = (0..12).map(|i| w.submit(job(i)).unwrap()).collect();
    let mut lost = 0;
    for ticket in tickets {
        match finish(ticket) {
            Err(JobError::Failed(m)) if m.contains("was lost") => lost += 1,
            Err(JobError::Failed(m)) => assert!(m.contains("no device is left"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
    assert_eq!(lost, 2 * MAX_CONSECUTIVE_FAILURES);
    assert!(!w.is_ready());
    let failure = w.failure().unwrap();
    assert!(failure.contains("every device"), "{failure}");
    assert!(matches!(
        w.submit(job(99)),
        Err(SubmitError::NotReady { .. })
    ));
    assert!(w.wait_idle(Duration::from_secs(1)));
}

#[test]
fn a_device_that_cannot_load_keeps_the_worker_not_ready_and_is_named() {
    let good = DeviceLoader {
        name: "cuda:0".into(),
        load: Box::new(|| {
            Ok(Box::new(FakeDevice {
                name: "cuda:0".into(),
                behaviour: Behaviour::Works,
                overlap: Arc::default(),
                wait_for: 1,
            }) as Box<dyn Engine>)
        }),
    };
    let bad = DeviceLoader {
        name: "cuda:1".into(),
        load: Box::new(|| Err("out of memory".into())),
    };
    let w = start_workers(vec![good, bad], config());
    wait_until(|| w.failure().is_some() && w.stats().devices[0].state == DeviceState::Ready);
    let failure = w.failure().unwrap();
    assert!(failure.contains("cuda:1"), "{failure}");
    assert!(!w.is_ready());
    assert!(matches!(
        w.stats().devices[1].state,
        DeviceState::Failed(ref r) if r.contains("loading models on cuda:1 failed")
    ));
    assert!(matches!(
        w.submit(job(1)),
        Err(SubmitError::NotReady { .. })
    ));
}
