//! The executor threads, one per device: each loads its own resident copy of the models, warms
//! up, then takes batches from the shared queue (waiting up to `batch_wait` for compatible
//! work), runs them with panics isolated, and delivers each image to its job. A batch that fails
//! on a device (an error or a panic) fails only its own jobs; the device goes on serving.
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use super::contract::{JobError, JobEvent, JobOutput};
use super::engine::{BatchOutcome, Catalog, Engine};
use super::handle::{DeviceLoader, DeviceState, Shared, State};
use super::queue::WorkItem;
use crate::pipeline::preview::preview_steps;
use crate::pipeline::{Observer, Raster};

/// Device `index`'s thread: load, warm up, then run batches until shut down.
pub(super) fn run_device(shared: Arc<Shared>, index: usize, device: DeviceLoader) {
    let name = device.name;
    let fail = |public: String, detail: String| {
        tracing::error!(device = %name, "{public}: {detail}");
        eprintln!("error: {public}: {detail}");
        shared.lock().stats.devices[index].state = DeviceState::Failed(public.clone());
        shared.set_failure(public);
    };
    let mut engine = match (device.load)() {
        Ok(e) => e,
        Err(e) => {
            return fail(
                format!("loading models on {name} failed (see the server log)"),
                e,
            );
        }
    };
    let catalog = Arc::new(engine.catalog());
    if let Err((ensemble, e)) = warm_up(engine.as_mut(), &catalog) {
        return fail(
            format!("the warm-up of ensemble '{ensemble}' on {name} failed (see the server log)"),
            e.to_string(),
        );
    }
    {
        let mut state = shared.lock();
        state.catalog.get_or_insert(catalog);
        state.stats.devices[index].state = DeviceState::Ready;
        let all = state.stats.devices.len();
        if state.ready_devices() == all && !shared.has_failed() {
            shared.ready.store(true, Ordering::SeqCst);
            tracing::info!(devices = all, "models loaded; ready");
        }
    }
    tracing::info!(device = %name, "models loaded and warmed up");
    while let Some(batch) = next_batch(&shared, index) {
        run_batch(&shared, index, engine.as_mut(), batch);
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
            strength: None,
            attention_maps: crate::pipeline::MapsRequest::Off,
        };
        let image = crate::pipeline::ImageSpec {
            prompt: "warm-up".into(),
            negative_prompt: String::new(),
            seed: 0,
            guidance_scale: 1.0,
            init: None,
        };
        engine
            .run(&key, &[image], &mut ())
            .map_err(|e| (key.ensemble.clone(), e))?;
    }
    Ok(())
}

/// Waits for work, then takes a batch for device `index` (waiting up to `batch_wait` for more
/// compatible images).
fn next_batch(shared: &Shared, index: usize) -> Option<Vec<WorkItem>> {
    let cfg = shared.config;
    let mut state = shared.lock();
    'wait_for_work: loop {
        if state.shutdown {
            return None;
        }
        drop_cancelled_and_expired(&mut state, cfg.request_timeout);
        if state.queue.is_empty() {
            if state.running() == 0 {
                shared.idle.notify_all();
            }
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
                // Everything waiting was cancelled, or another device took it: wait again.
                continue 'wait_for_work;
            }
        }
        break;
    }
    let batch = state.queue.take_batch(cfg.max_batch);
    state.stats.devices[index].running_images = batch.len();
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

    fn previews_wanted(&self, done: usize, total: usize) -> Vec<usize> {
        let state = self.shared.lock();
        self.items
            .iter()
            .enumerate()
            .filter(|(_, item)| {
                state
                    .jobs
                    .get(&item.job_id)
                    .is_some_and(|job| preview_steps(job.partial_images, total).contains(&done))
            })
            .map(|(p, _)| p)
            .collect()
    }

    fn preview(&mut self, index: usize, done: usize, total: usize, rgb: Vec<u8>) {
        let item = &self.items[index];
        let state = self.shared.lock();
        if let Some(job) = state.jobs.get(&item.job_id) {
            let raster = Raster {
                width: item.key.width,
                height: item.key.height,
                rgb,
                parameters: String::new(),
            };
            let _ = job.tx.send(JobEvent::Preview {
                index: item.image_index,
                step: done,
                total,
                raster,
            });
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

/// Runs one batch on device `index`, isolating panics, and delivers results (a failure fails
/// the batch's jobs and is counted on the device).
fn run_batch(shared: &Shared, index: usize, engine: &mut dyn Engine, batch: Vec<WorkItem>) {
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
    state.stats.batches += 1;
    state.stats.last_batch_size = batch.len();
    let device = &mut state.stats.devices[index];
    device.running_images = 0;
    device.batches += 1;
    match outcome {
        Ok(outcome) => {
            let timeout = shared.config.request_timeout;
            deliver(&mut state, index, &batch, outcome, elapsed, timeout);
        }
        Err(error) => {
            let device = &mut state.stats.devices[index];
            tracing::warn!(device = %device.name, %error, "a batch failed");
            device.failed_batches += 1;
            device.last_error = Some(error.to_string());
            for id in unique_jobs(&batch) {
                state.queue.remove_job(id);
                if let Some(job) = state.jobs.remove(&id) {
                    let _ = job.tx.send(JobEvent::Finished(Err(error.clone())));
                    state.stats.failed_jobs += 1;
                }
            }
        }
    }
    if state.queue.is_empty() && state.running() == 0 {
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
    index: usize,
    batch: &[WorkItem],
    outcome: BatchOutcome,
    elapsed: Duration,
    timeout: Duration,
) {
    let done = outcome.images.iter().filter(|i| i.is_some()).count();
    if done > 0 {
        let rate = done as f64 / elapsed.as_secs_f64().max(1e-6);
        let d = &mut state.stats.devices[index];
        d.completed_images += done as u64;
        d.images_per_second = if d.images_per_second == 0.0 {
            rate
        } else {
            0.7 * d.images_per_second + 0.3 * rate
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
