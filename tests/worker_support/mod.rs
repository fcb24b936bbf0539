//! What the worker tests share: the fake ensemble's catalog, a job of it, and waiting for a
//! job's result.
#![allow(dead_code)]
use afa::ensemble::EnsembleMode;
use afa::pipeline::{ImageSpec, Limits, MapsRequest};
use afa::schedulers::SchedulerKind;
use afa::worker::{Catalog, EnsembleCatalog, GenerationJob, JobError, JobEvent};

/// The fake ensemble `fake` (members a and b, modes afa and mean, 25 map points).
pub fn catalog() -> Catalog {
    Catalog {
        ensembles: vec![EnsembleCatalog {
            name: "fake".into(),
            description: None,
            untrained: true,
            members: vec![("a".into(), "0".into()), ("b".into(), "1".into())],
            modes: vec!["afa".into(), "mean".into()],
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

/// A job of `n` images of `prompt` at 64x64, 4 steps, seeds `seed..seed + n`.
pub fn job(prompt: &str, n: usize, seed: u64) -> GenerationJob {
    GenerationJob {
        ensemble: "fake".into(),
        mode: EnsembleMode::Afa,
        images: (0..n)
            .map(|i| ImageSpec {
                prompt: prompt.into(),
                negative_prompt: String::new(),
                seed: seed + i as u64,
                guidance_scale: 7.5,
                init: None,
            })
            .collect(),
        width: 64,
        height: 64,
        steps: 4,
        scheduler: SchedulerKind::Ddim,
        strength: None,
        attention_maps: MapsRequest::Off,
        partial_images: 0,
    }
}

/// Waits for the job's `Finished` event.
pub fn finish(mut ticket: afa::worker::JobTicket) -> Result<afa::worker::JobOutput, JobError> {
    loop {
        match ticket.events.blocking_recv() {
            Some(JobEvent::Finished(r)) => return r,
            Some(_) => continue,
            None => panic!("events ended without Finished"),
        }
    }
}
