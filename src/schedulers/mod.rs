//! Samplers (DDIM, Euler ancestral, DPM++ 2M, DPM++ 2M Karras) reproducing diffusers 0.42.1,
//! their shared configuration ([`SchedulerConfig`], read from a diffusers
//! `scheduler/scheduler_config.json`), the per-job [`Scheduler`] trait the pipeline drives, and
//! the training-time forward process ([`NoiseSchedule`]).
//!
//! Each `build` returns a fresh scheduler for one job; schedules are computed once in f64
//! (holding diffusers' float32 values where diffusers keeps float32) and tensors are updated in
//! the sample's dtype (Euler / DPM++ upcast half precision to f32 like diffusers).
use std::fmt;
use std::str::FromStr;

use candle_core::Tensor;
use serde::Deserialize;

mod betas;
mod ddim;
mod dpm_solver;
mod euler_ancestral;

pub use betas::{NoiseSchedule, alphas_cumprod};
pub use ddim::Ddim;
pub use dpm_solver::DpmSolverMultistep;
pub use euler_ancestral::EulerAncestral;

/// Everything that can go wrong building or stepping a scheduler.
#[derive(Debug, thiserror::Error)]
pub enum SchedulerError {
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error("invalid scheduler config: {0}")]
    InvalidConfig(String),
    #[error("invalid number of inference steps {steps}: must be between 1 and {max}")]
    InvalidSteps { steps: usize, max: usize },
    #[error("unknown scheduler {0:?}; expected one of ddim, euler-a, dpmpp-2m, dpmpp-2m-karras")]
    UnknownKind(String),
    #[error("invalid scheduler input: {0}")]
    InvalidInput(String),
    #[error("scheduler config json: {0}")]
    Json(#[from] serde_json::Error),
}

/// The samplers we offer, named as on the command line / API.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SchedulerKind {
    Ddim,
    EulerAncestral,
    DpmPp2m,
    DpmPp2mKarras,
}

impl SchedulerKind {
    pub const ALL: [SchedulerKind; 4] = [
        SchedulerKind::Ddim,
        SchedulerKind::EulerAncestral,
        SchedulerKind::DpmPp2m,
        SchedulerKind::DpmPp2mKarras,
    ];

    /// The stable name: `ddim`, `euler-a`, `dpmpp-2m`, `dpmpp-2m-karras`.
    pub fn as_str(self) -> &'static str {
        match self {
            SchedulerKind::Ddim => "ddim",
            SchedulerKind::EulerAncestral => "euler-a",
            SchedulerKind::DpmPp2m => "dpmpp-2m",
            SchedulerKind::DpmPp2mKarras => "dpmpp-2m-karras",
        }
    }

    /// The `timestep_spacing` diffusers' class defaults to when the config does not set one.
    pub fn default_spacing(self) -> TimestepSpacing {
        match self {
            SchedulerKind::Ddim => TimestepSpacing::Leading,
            _ => TimestepSpacing::Linspace,
        }
    }
}

impl fmt::Display for SchedulerKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for SchedulerKind {
    type Err = SchedulerError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        SchedulerKind::ALL
            .into_iter()
            .find(|k| k.as_str() == s)
            .ok_or_else(|| SchedulerError::UnknownKind(s.to_string()))
    }
}

/// `beta_schedule` values we support.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    Linear,
    ScaledLinear,
}

/// What the model predicts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    Epsilon,
    VPrediction,
}

/// How inference timesteps are spread over the training range (diffusers `timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    Linspace,
    Leading,
    Trailing,
}

/// Last sigma of the DPM++ schedule (diffusers `final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    Zero,
    SigmaMin,
}

/// Scheduler settings, deserialisable from a diffusers `scheduler_config.json` (unknown fields
/// such as `_class_name` or `skip_prk_steps` are ignored; missing ones take the SD1.5 defaults).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct SchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub steps_offset: usize,
    /// DDIM: the step after t=min uses alpha 1.0 (true) or `alphas_cumprod[0]` (false).
    pub set_alpha_to_one: bool,
    pub prediction_type: PredictionType,
    /// `None`: each sampler's diffusers default (DDIM leading, Euler-a / DPM++ linspace).
    pub timestep_spacing: Option<TimestepSpacing>,
    /// DDIM only: clamp the predicted x0 to `[-clip_sample_range, clip_sample_range]`.
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// DPM++ only.
    pub final_sigmas_type: FinalSigmas,
    /// DPM++ only: first-order last step when fewer than 15 steps.
    pub lower_order_final: bool,
    /// DPM++ only: always first-order last step.
    pub euler_at_final: bool,
}

impl Default for SchedulerConfig {
    /// Stable Diffusion 1.5 (`runwayml/stable-diffusion-v1-5/scheduler/scheduler_config.json`).
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            steps_offset: 1,
            set_alpha_to_one: false,
            prediction_type: PredictionType::Epsilon,
            timestep_spacing: None,
            clip_sample: false,
            clip_sample_range: 1.0,
            final_sigmas_type: FinalSigmas::Zero,
            lower_order_final: true,
            euler_at_final: false,
        }
    }
}

impl SchedulerConfig {
    /// Parses a diffusers `scheduler_config.json`.
    pub fn from_json(json: &str) -> Result<Self, SchedulerError> {
        Ok(serde_json::from_str(json)?)
    }

    /// `alphas_cumprod` of this config (length `num_train_timesteps`).
    pub fn alphas_cumprod(&self) -> Result<Vec<f64>, SchedulerError> {
        alphas_cumprod(self)
    }

    /// The training forward process of this config.
    pub fn noise_schedule(&self) -> Result<NoiseSchedule, SchedulerError> {
        NoiseSchedule::new(self)
    }

    /// The spacing `kind` uses under this config.
    pub fn spacing_for(&self, kind: SchedulerKind) -> TimestepSpacing {
        self.timestep_spacing.unwrap_or(kind.default_spacing())
    }

    /// A fresh scheduler of `kind` for one job of `steps` inference steps.
    pub fn build(
        &self,
        kind: SchedulerKind,
        steps: usize,
    ) -> Result<Box<dyn Scheduler>, SchedulerError> {
        if steps == 0 || steps > self.num_train_timesteps {
            return Err(SchedulerError::InvalidSteps {
                steps,
                max: self.num_train_timesteps,
            });
        }
        Ok(match kind {
            SchedulerKind::Ddim => Box::new(Ddim::new(self, steps)?),
            SchedulerKind::EulerAncestral => Box::new(EulerAncestral::new(self, steps)?),
            SchedulerKind::DpmPp2m => Box::new(DpmSolverMultistep::new(self, steps, false)?),
            SchedulerKind::DpmPp2mKarras => Box::new(DpmSolverMultistep::new(self, steps, true)?),
        })
    }
}

/// Source of the fresh Gaussian noise ancestral samplers inject.
pub trait NoiseSource {
    /// Fresh N(0,1) noise of this shape [B, C, H, W]; row b comes from image b's own generator.
    fn sample(&mut self, shape: &[usize]) -> Result<Tensor, SchedulerError>;
}

/// One job's sampler. Steps are called in order `0..timesteps().len()`.
pub trait Scheduler: Send {
    /// The value passed to the UNet at each step.
    fn timesteps(&self) -> &[f64];
    /// Scale of the initial latent noise (1 unless the sampler works in sigma space).
    fn init_noise_sigma(&self) -> f64 {
        1.0
    }
    /// The UNet input for step `step_index`; `sample` [B, C, H, W] (unchanged by default).
    fn scale_model_input(
        &self,
        sample: &Tensor,
        _step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        Ok(sample.clone())
    }
    /// One denoising step: `model_output` and `sample` [B, C, H, W]; returns the next sample
    /// [B, C, H, W] in `model_output`'s dtype.
    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError>;
    fn kind(&self) -> SchedulerKind;
    /// `original` [B, C, H, W] noised with `noise` (same shape) to the noise level of step
    /// `step_index`'s input, as diffusers' `add_noise` at that step (image-to-image start,
    /// inpainting's re-noised known region). The result is in `original`'s dtype.
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError>;
    /// Starts the run at `step_index` instead of 0 (image-to-image skips the first steps; the
    /// diffusers `set_begin_index`). Call before the first `step`.
    fn begin_at(&mut self, _step_index: usize) -> Result<(), SchedulerError> {
        Ok(())
    }
    /// The clean image x0 the model output predicts at step `step_index` (diffusers'
    /// `pred_original_sample` of that step): `model_output` and `sample` [B, C, H, W], the
    /// same tensors `step` takes; returns [B, C, H, W] in `model_output`'s dtype. Reads no
    /// per-job state and changes none, so calling it never changes the sampled image.
    fn predicted_original(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError>;
    /// Keeps only these batch rows of any per-sample state (images dropped mid-run).
    fn retain_rows(&mut self, _rows: &Tensor) -> Result<(), SchedulerError> {
        Ok(())
    }
}

/// The index check of `add_noise`: `step_index` must name a step of the schedule.
pub(crate) fn check_noise_index(step_index: usize, len: usize) -> Result<(), SchedulerError> {
    if step_index >= len {
        return Err(SchedulerError::InvalidInput(format!(
            "noise level of step {step_index} asked of a schedule of {len} steps"
        )));
    }
    Ok(())
}

/// Checks `step_index` against a schedule of `len` steps and the tensor shapes agree.
pub(crate) fn check_step(
    model_output: &Tensor,
    sample: &Tensor,
    step_index: usize,
    len: usize,
) -> Result<(), SchedulerError> {
    if step_index >= len {
        return Err(SchedulerError::InvalidInput(format!(
            "step index {step_index} out of range for {len} steps"
        )));
    }
    if model_output.dims() != sample.dims() {
        return Err(SchedulerError::InvalidInput(format!(
            "model output shape {:?} differs from sample shape {:?}",
            model_output.dims(),
            sample.dims()
        )));
    }
    Ok(())
}
