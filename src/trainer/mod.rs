//! `afa train` and `afa probe` (`afa-method.md` §6, §7.2): training the SABW aggregators of an
//! ensemble with frozen members, text encoders and VAE, and estimating beforehand how much an
//! aggregator could gain for a member set.
//!
//! - [`params`]: the aggregators' trainable parameters (`Var`s), fresh seeded init or loaded;
//! - [`adamw`]: AdamW with saveable state;
//! - [`data`]: image + caption datasets, resize / crop / normalise, skipped-image counting;
//! - [`objective`]: one training micro-batch (latents, noising, caption dropout, MSE);
//! - [`state`]: checkpoints (`OUT/checkpoints/step-N/`) and resume;
//! - [`run`]: the training loop (progress, `log.jsonl`, validation, checkpoints);
//! - [`probe`]: the cross-noise routing gain probe.
//!
//! Every random draw comes from an [`ImageRng`] derived from the seed and the position of the
//! draw (epoch, optimizer step, row), so a run is reproducible and `--resume` continues it
//! exactly from the step counter alone.
pub mod adamw;
pub mod data;
pub mod frozen;
pub mod objective;
pub mod params;
pub mod probe;
pub mod run;
pub mod state;

use std::path::{Path, PathBuf};

use crate::ensemble::EnsembleError;
use crate::loading::LoadError;
use crate::pipeline::noise::ImageRng;
use crate::schedulers::SchedulerError;

pub use frozen::Frozen;
pub use params::AggregatorParams;
pub use run::{InitFrom, TrainOptions, TrainSummary, train};

/// Errors of the trainer.
#[derive(Debug, thiserror::Error)]
pub enum TrainerError {
    #[error("invalid training option: {0}")]
    Invalid(String),
    #[error("dataset {path}: {reason}")]
    Data { path: PathBuf, reason: String },
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot resume from {path}: {reason}")]
    Resume { path: PathBuf, reason: String },
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error(transparent)]
    Ensemble(#[from] EnsembleError),
    #[error(transparent)]
    Scheduler(#[from] SchedulerError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl TrainerError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    pub(crate) fn data(path: &Path, reason: impl Into<String>) -> Self {
        Self::Data {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// Result of the trainer layer.
pub type Result<T> = std::result::Result<T, TrainerError>;

/// What a random stream is for (keeps the streams of one seed independent).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u64)]
pub(crate) enum Stream {
    /// Fresh aggregator weights (per aggregator).
    Init = 1,
    /// The order of the training images in an epoch (per epoch).
    Order = 2,
    /// Crop, caption dropout, timestep and noise of one training row (per step and row).
    Row = 3,
    /// The held-out split and the fixed validation draws.
    Validation = 4,
    /// The probe's images, timesteps and noise draws.
    Probe = 5,
}

/// The generator of stream `what` at position `(a, b)` for `seed`.
pub(crate) fn rng(seed: u64, what: Stream, a: u64, b: u64) -> ImageRng {
    // Mix the parts through xxh3 so nearby positions give unrelated streams.
    let mut bytes = [0u8; 32];
    for (i, v) in [seed, what as u64, a, b].iter().enumerate() {
        bytes[i * 8..i * 8 + 8].copy_from_slice(&v.to_le_bytes());
    }
    ImageRng::new(xxhash_rust::xxh3::xxh3_64(&bytes))
}

/// Uniform in [0, 1) from `rng`.
pub(crate) fn uniform(rng: &mut ImageRng) -> f64 {
    (rng.next_u64() >> 11) as f64 / (1u64 << 53) as f64
}

/// Uniform integer in [0, n) from `rng` (n > 0).
pub(crate) fn below(rng: &mut ImageRng, n: usize) -> usize {
    ((uniform(rng) * n as f64) as usize).min(n.saturating_sub(1))
}
