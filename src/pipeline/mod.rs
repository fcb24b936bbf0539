//! Synchronous text -> image (and image -> image, inpainting: `init_image.rs`) for one
//! homogeneous batch: validated parameters, per-image seeded noise, classifier-free guidance
//! batched as [uncond; cond], the sampler loop, VAE decode, PNG encoding with A1111-style
//! metadata (JPEG/WebP in `encode.rs`), and partial-image previews (`preview.rs`). Knows
//! nothing of HTTP or async code.
mod denoiser;
pub mod encode;
mod generate;
pub mod image_input;
mod init_image;
pub mod maps;
pub mod noise;
mod params;
pub mod png;
pub mod preview;

pub use denoiser::{DenoiseStep, Denoiser, SingleUNet};
pub use encode::{Encoding, ImageFormat, Raster};
pub use generate::{BatchOutput, GeneratedImage, Observer, SdPipeline, StageTimings, to_rgb8};
pub use init_image::{InitImage, Strength};
pub use maps::CollectedMaps;
pub use noise::{BatchNoise, ImageRng};
pub use params::{BatchRequest, ImageSpec, Limits, MapPoints, MapsRequest, sampler_display_name};

use crate::models::ModelError;
use crate::schedulers::SchedulerError;

/// Errors of the pipeline layer.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A caller mistake: names the offending field.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// A caller mistake that asks for more than the server's budget (HTTP 413).
    #[error("{field} too large: {reason}")]
    TooLarge { field: &'static str, reason: String },
    /// Every image of the batch was cancelled.
    #[error("cancelled")]
    Cancelled,
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Ensemble(#[from] crate::ensemble::EnsembleError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("{0}")]
    Internal(String),
}

impl PipelineError {
    /// Shorthand for an invalid-field error.
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        PipelineError::Invalid {
            field,
            reason: reason.into(),
        }
    }
}
