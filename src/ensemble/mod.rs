//! The AFA ensemble (`afa-method.md`): N staged UNets stepped in lockstep with one SABW
//! aggregator per aggregation point, attention-map capture, and the baselines users compare
//! against on the same members (uniform mean, a single member, a weighted merge, MagicFusion).
pub mod aggregator;
mod denoiser;
pub mod magicfusion;
mod mode;
pub mod points;

pub use aggregator::{Aggregator, AggregatorConfig};
pub use denoiser::{Ensemble, EnsembleContext, EnsembleDenoiser, Member};
pub use magicfusion::MagicFusionConfig;
pub use mode::EnsembleMode;

/// Errors of the ensemble layer.
#[derive(Debug, thiserror::Error)]
pub enum EnsembleError {
    #[error("invalid ensemble: {0}")]
    Invalid(String),
    #[error("unknown ensemble mode '{0}' (one of: afa, mean, single:<member>, merge, magicfusion)")]
    UnknownMode(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}
