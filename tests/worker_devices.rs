//! One worker, several devices (fake ones): each device's executor takes batches from the one
//! queue at the same time and counts its own work; a batch failing on one device fails only its
//! own jobs, with the error, and every device goes on serving; a device that cannot load keeps
//! the worker from turning ready and is named.
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use afa::pipeline::{ImageSpec, Observer};
use afa::worker::{
    BatchKey, BatchOutcome, Catalog, DeviceLoader, DeviceState, Engine, ImageResult, JobError,
    JobTimings, SubmitError, WorkerConfig, WorkerHandle, start_workers,
};

mod worker_support;
use worker_support::{catalog, finish, job};

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

#[test]
fn every_device_takes_batches_from_the_one_queue_at_the_same_time() {
    let (w, overlap) = workers(&[Behaviour::Works, Behaviour::Works], 2);
    let tickets: Vec<_> = (0..8)
        .map(|i| w.submit(job("x", 1, 100 + i)).unwrap())
        .collect();
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
fn a_batch_failing_on_one_device_fails_only_its_jobs_and_every_device_serves_on() {
    let (w, _) = workers(&[Behaviour::Broken, Behaviour::Works], 1);
    let tickets: Vec<_> = (0..20).map(|i| w.submit(job("x", 1, i)).unwrap()).collect();
    let (mut failed, mut done) = (0u64, 0u64);
    for ticket in tickets {
        match finish(ticket) {
            Ok(out) => {
                assert_eq!(out.images[0].png, b"dev-1");
                done += 1;
            }
            Err(JobError::Failed(m)) => {
                assert!(m.contains("dev-0 was lost"), "{m}");
                failed += 1;
            }
            Err(e) => panic!("{e}"),
        }
    }
    assert!(
        failed > 0 && done > 0,
        "both devices took work: {failed} {done}"
    );
    let stats = w.stats();
    let (broken, working) = (&stats.devices[0], &stats.devices[1]);
    assert_eq!(
        (broken.failed_batches, broken.completed_images),
        (failed, 0)
    );
    let last_error = broken.last_error.as_deref().unwrap();
    assert!(last_error.contains("dev-0 was lost"), "{last_error}");
    assert_eq!(
        (working.failed_batches, working.completed_images),
        (0, done)
    );
    assert!(stats.devices.iter().all(|d| d.state == DeviceState::Ready));
    assert_eq!(stats.failed_jobs, failed);
    assert!(w.is_ready() && w.failure().is_none());
    // Both devices still take work.
    let more: Vec<_> = (0..10)
        .map(|i| w.submit(job("x", 1, 50 + i)).unwrap())
        .collect();
    more.into_iter().for_each(|t| drop(finish(t)));
    assert!(w.stats().devices[0].failed_batches > failed);
    assert!(w.stats().devices[1].completed_images > done);
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
        w.submit(job("x", 1, 1)),
        Err(SubmitError::NotReady { .. })
    ));
}
