//! The contract between the HTTP layer and the worker: what a job is, what comes back, and
//! how submission can fail. Plain data; the queue, batcher and executor live beside it.
use std::time::Duration;

use crate::ensemble::EnsembleMode;
use crate::pipeline::{ImageSpec, MapsRequest, Raster, Strength};
use crate::schedulers::SchedulerKind;

/// One validated generation request: `images.len()` images (n) of one ensemble, with every
/// seed already resolved. Images of one job may be split over several batches.
#[derive(Debug, Clone)]
pub struct GenerationJob {
    /// Ensemble name (as in `models.toml`).
    pub ensemble: String,
    pub mode: EnsembleMode,
    pub images: Vec<ImageSpec>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    /// Image-to-image / inpainting: every image carries an init image.
    pub strength: Option<Strength>,
    pub attention_maps: MapsRequest,
    /// Previews per image while it denoises (0..=3; `JobEvent::Preview`). Not part of the
    /// batch key: images with and without previews share batches.
    pub partial_images: usize,
}

impl GenerationJob {
    /// What must be equal for two jobs' images to run in one batch.
    pub fn batch_key(&self) -> BatchKey {
        BatchKey {
            ensemble: self.ensemble.clone(),
            mode: self.mode.to_string(),
            width: self.width,
            height: self.height,
            steps: self.steps,
            scheduler: self.scheduler,
            strength: self.strength,
            attention_maps: self.attention_maps,
        }
    }
}

/// Jobs with equal keys may share a batch; prompts, seeds and guidance may differ inside one.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct BatchKey {
    pub ensemble: String,
    pub mode: String,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    pub strength: Option<Strength>,
    pub attention_maps: MapsRequest,
}

/// Expert weights of one image at one aggregation point: `[N, h, w]` f32 row-major, for the
/// conditional half (per step or averaged over steps).
#[derive(Debug, Clone, PartialEq)]
pub struct ImageMap {
    pub point: usize,
    /// `None` when averaged over steps.
    pub step: Option<usize>,
    pub shape: [usize; 3],
    pub values: Vec<f32>,
}

impl ImageMap {
    /// The composite heat map as PNG bytes, at the pixel scale of [`heatmap_scale`], with the
    /// `legend` in a text chunk.
    pub fn heatmap_png(&self, legend: &str) -> Result<Vec<u8>, String> {
        let scale = crate::pipeline::maps::heatmap_scale(self.shape[2]);
        crate::pipeline::maps::heatmap_png_from_values(&self.values, self.shape, scale, legend)
            .map_err(|e| e.to_string())
    }
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct ImageResult {
    pub seed: u64,
    pub png: Vec<u8>,
    /// The pixels and parameters text behind `png`, for the other formats (encoded off the
    /// executor, by whoever answers).
    pub raster: Raster,
    pub warnings: Vec<String>,
    /// Present when the job asked for attention maps and the mode has them.
    pub attention_maps: Option<Vec<ImageMap>>,
}

/// Time spent per stage, summed over the batches that served the job.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct JobTimings {
    pub queue: Duration,
    pub text_encode: Duration,
    pub denoise: Duration,
    pub decode: Duration,
    pub png_encode: Duration,
}

/// A finished job, images in request order.
#[derive(Debug, Clone)]
pub struct JobOutput {
    pub images: Vec<ImageResult>,
    pub timings: JobTimings,
    /// Member names of the ensemble, in order (the legend of the maps).
    pub experts: Vec<String>,
}

/// Why a job failed after it was accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum JobError {
    /// The request was wrong in a way only the engine could see (names the field).
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    #[error("timed out after {0:?}")]
    TimedOut(Duration),
    /// The engine failed (the message is for logs; clients get a generic 500).
    #[error("generation failed: {0}")]
    Failed(String),
}

/// Progress of an accepted job.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEvent {
    /// Waiting; `position` images are ahead of this job's first image.
    Queued {
        position: usize,
    },
    /// Step `step` of `total` finished for the batch running this job's images.
    Progress {
        step: usize,
        total: usize,
    },
    /// A preview of image `index` of the job after step `step` of `total` (the predicted clean
    /// image; `raster.parameters` is empty).
    Preview {
        index: usize,
        step: usize,
        total: usize,
        raster: Raster,
    },
    Finished(Result<JobOutput, JobError>),
}

impl PartialEq for JobOutput {
    fn eq(&self, other: &Self) -> bool {
        self.images.len() == other.images.len()
            && self
                .images
                .iter()
                .zip(&other.images)
                .all(|(a, b)| a.seed == b.seed && a.png == b.png)
    }
}

/// Why a job was not accepted.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum SubmitError {
    #[error("the queue is full")]
    QueueFull { retry_after: Duration },
    #[error("models are still loading")]
    NotReady { retry_after: Duration },
    #[error("the server is shutting down")]
    Draining { retry_after: Duration },
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// Asks for more than the server's budget (a pixel count beyond the limit).
    #[error("{field} too large: {reason}")]
    TooLarge { field: String, reason: String },
    #[error("unknown model '{0}'")]
    UnknownEnsemble(String),
}

impl From<crate::pipeline::PipelineError> for SubmitError {
    /// A request the pipeline's validation refused: the caller's mistake, by field (anything
    /// else is reported against `request`).
    fn from(e: crate::pipeline::PipelineError) -> Self {
        use crate::pipeline::PipelineError;
        match e {
            PipelineError::Invalid { field, reason } => SubmitError::Invalid {
                field: field.into(),
                reason,
            },
            PipelineError::TooLarge { field, reason } => SubmitError::TooLarge {
                field: field.into(),
                reason,
            },
            other => SubmitError::Invalid {
                field: "request".into(),
                reason: other.to_string(),
            },
        }
    }
}
