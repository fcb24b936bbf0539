//! Euler ancestral sampler, matching diffusers `EulerAncestralDiscreteScheduler`: float32
//! timesteps (default "linspace" spacing, fractional), sigmas interpolated from the training
//! sigmas plus a final 0, input scaling by `1 / sqrt(sigma^2 + 1)`, and one fresh noise draw per
//! step (including the last, whose noise has weight 0, so generator streams stay in sync).
use candle_core::Tensor;

use super::betas::{
    div_scalar, mul_scalar, np_arange, np_interp_unit, np_linspace, np_round, train_sigmas,
    work_dtype,
};
use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind,
    TimestepSpacing, alphas_cumprod, check_noise_index, check_step,
};

/// Euler ancestral sampler for one job.
#[derive(Debug, Clone)]
pub struct EulerAncestral {
    timesteps: Vec<f64>,
    /// float32 sigmas, `steps + 1` values ending in 0.
    sigmas: Vec<f32>,
    init_noise_sigma: f32,
    prediction: PredictionType,
}

/// Euler timesteps (float32 values, descending).
fn euler_timesteps(cfg: &SchedulerConfig, spacing: TimestepSpacing, steps: usize) -> Vec<f32> {
    let t = cfg.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|v| v as f32)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio) as f32 + cfg.steps_offset as f32)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / steps as f64))
            .into_iter()
            .map(|v| np_round(v) as f32 - 1.0)
            .collect(),
    }
}

impl EulerAncestral {
    /// Schedule for `steps` steps (1 ..= num_train_timesteps).
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let acp = alphas_cumprod(cfg)?;
        if steps == 0 || steps > cfg.num_train_timesteps {
            return Err(SchedulerError::InvalidSteps {
                steps,
                max: cfg.num_train_timesteps,
            });
        }
        let spacing = cfg.spacing_for(SchedulerKind::EulerAncestral);
        let ts = euler_timesteps(cfg, spacing, steps);
        let train = train_sigmas(&acp);
        let mut sigmas: Vec<f32> = ts
            .iter()
            .map(|&t| np_interp_unit(f64::from(t), &train) as f32)
            .collect();
        sigmas.push(0.0);
        let max = sigmas.iter().copied().fold(f32::MIN, f32::max);
        let init_noise_sigma = match spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => max,
            TimestepSpacing::Leading => (max * max + 1.0).sqrt(),
        };
        Ok(Self {
            timesteps: ts.iter().map(|&t| f64::from(t)).collect(),
            sigmas,
            init_noise_sigma,
            prediction: cfg.prediction_type,
        })
    }

    /// The float32 sigmas (`steps + 1` values, last 0).
    pub fn sigmas(&self) -> Vec<f64> {
        self.sigmas.iter().map(|&s| f64::from(s)).collect()
    }
}

impl Scheduler for EulerAncestral {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        f64::from(self.init_noise_sigma)
    }

    fn scale_model_input(
        &self,
        sample: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        let sigma = *self.sigmas.get(step_index).ok_or_else(|| {
            SchedulerError::InvalidInput(format!("step index {step_index} out of range"))
        })?;
        div_scalar(sample, (sigma * sigma + 1.0).sqrt())
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        check_step(model_output, sample, step_index, self.timesteps.len())?;
        let dt_work = work_dtype(sample);
        let x = sample.to_dtype(dt_work)?;
        let mo = model_output.to_dtype(dt_work)?;
        let sigma = self.sigmas[step_index];
        let x0 = self.data_prediction(&x, &mo, step_index)?;
        let (from, to) = (sigma, self.sigmas[step_index + 1]);
        let sigma_up = ((to * to) * (from * from - to * to) / (from * from)).sqrt();
        let sigma_down = (to * to - sigma_up * sigma_up).max(0.0).sqrt();
        let derivative = div_scalar(&(&x - x0)?, sigma)?;
        let prev = (&x + mul_scalar(&derivative, sigma_down - sigma)?)?;
        let n = noise.sample(x.dims())?.to_dtype(dt_work)?;
        let prev = (prev + mul_scalar(&n, sigma_up)?)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::EulerAncestral
    }

    /// diffusers: `x + noise * sigma` (sigma space; the input is scaled at each step).
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        check_noise_index(step_index, self.timesteps.len())?;
        let noise = noise.to_dtype(original.dtype())?;
        Ok((original + mul_scalar(&noise, self.sigmas[step_index])?)?)
    }

    fn predicted_original(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        check_step(model_output, sample, step_index, self.timesteps.len())?;
        let dt_work = work_dtype(sample);
        let x = sample.to_dtype(dt_work)?;
        let mo = model_output.to_dtype(dt_work)?;
        let x0 = self.data_prediction(&x, &mo, step_index)?;
        Ok(x0.to_dtype(model_output.dtype())?)
    }
}

impl EulerAncestral {
    /// x0 at step `step_index` from the sample `x` and model output `mo` (both [B, C, H, W] in
    /// the working dtype): what `step` moves towards and `predicted_original` reports.
    fn data_prediction(
        &self,
        x: &Tensor,
        mo: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        let sigma = self.sigmas[step_index];
        Ok(match self.prediction {
            PredictionType::Epsilon => (x - mul_scalar(mo, sigma)?)?,
            PredictionType::VPrediction => {
                let s2 = sigma * sigma + 1.0;
                (mul_scalar(mo, -sigma / s2.sqrt())? + div_scalar(x, s2)?)?
            }
        })
    }
}
