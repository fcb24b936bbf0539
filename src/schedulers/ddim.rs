//! DDIM (eta 0, deterministic), matching diffusers `DDIMScheduler`: integer timesteps (default
//! "leading" spacing: `t_i = i * (T // S) + steps_offset`), previous timestep `t - T // S`, and
//! `final_alpha_cumprod` (1.0 or `alphas_cumprod[0]`) once that goes negative.
use candle_core::Tensor;

use super::betas::{div_scalar, mul_scalar, np_arange, np_linspace, np_round};
use super::{
    NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerError, SchedulerKind,
    TimestepSpacing, alphas_cumprod, check_noise_index, check_step,
};

/// Deterministic DDIM sampler for one job.
#[derive(Debug, Clone)]
pub struct Ddim {
    timesteps: Vec<f64>,
    /// Per step: (alpha_prod_t, alpha_prod_t_prev) as float32.
    alphas: Vec<(f32, f32)>,
    prediction: PredictionType,
    clip: Option<f32>,
}

/// DDIM timesteps (integers, descending) for `steps` steps.
pub(crate) fn ddim_timesteps(
    cfg: &SchedulerConfig,
    spacing: TimestepSpacing,
    steps: usize,
) -> Vec<i64> {
    let t = cfg.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => np_linspace(0.0, (t - 1) as f64, steps)
            .into_iter()
            .rev()
            .map(|v| np_round(v) as i64)
            .collect(),
        TimestepSpacing::Leading => {
            let ratio = t / steps;
            (0..steps)
                .rev()
                .map(|i| (i * ratio + cfg.steps_offset) as i64)
                .collect()
        }
        TimestepSpacing::Trailing => np_arange(t as f64, 0.0, -(t as f64 / steps as f64))
            .into_iter()
            .map(|v| np_round(v) as i64 - 1)
            .collect(),
    }
}

impl Ddim {
    /// Schedule for `steps` steps (1 ..= num_train_timesteps).
    pub fn new(cfg: &SchedulerConfig, steps: usize) -> Result<Self, SchedulerError> {
        let acp = alphas_cumprod(cfg)?;
        let n_train = cfg.num_train_timesteps;
        if steps == 0 || steps > n_train {
            return Err(SchedulerError::InvalidSteps {
                steps,
                max: n_train,
            });
        }
        let ts = ddim_timesteps(cfg, cfg.spacing_for(SchedulerKind::Ddim), steps);
        let final_acp = if cfg.set_alpha_to_one {
            1.0
        } else {
            acp[0] as f32
        };
        let ratio = (n_train / steps) as i64;
        let mut alphas = Vec::with_capacity(ts.len());
        for &t in &ts {
            if t < 0 || t as usize >= n_train {
                return Err(SchedulerError::InvalidConfig(format!(
                    "DDIM timestep {t} outside 0..{n_train} (steps {steps}, steps_offset {})",
                    cfg.steps_offset
                )));
            }
            let prev = t - ratio;
            let a_prev = if prev >= 0 {
                acp[prev as usize] as f32
            } else {
                final_acp
            };
            alphas.push((acp[t as usize] as f32, a_prev));
        }
        Ok(Self {
            timesteps: ts.iter().map(|&t| t as f64).collect(),
            alphas,
            prediction: cfg.prediction_type,
            clip: cfg.clip_sample.then_some(cfg.clip_sample_range as f32),
        })
    }
}

impl Scheduler for Ddim {
    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn step(
        &mut self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
        _noise: &mut dyn NoiseSource,
    ) -> Result<Tensor, SchedulerError> {
        check_step(model_output, sample, step_index, self.timesteps.len())?;
        let a_prev = self.alphas[step_index].1;
        let mo = model_output.to_dtype(sample.dtype())?;
        let (x0, eps) = self.x0_and_eps(sample, mo, step_index)?;
        // eta = 0: std_dev_t = 0, no noise.
        let dir = mul_scalar(&eps, (1.0f32 - a_prev).sqrt())?;
        let prev = (mul_scalar(&x0, a_prev.sqrt())? + dir)?;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn kind(&self) -> SchedulerKind {
        SchedulerKind::Ddim
    }

    /// diffusers: `sqrt(acp[t]) * x + sqrt(1 - acp[t]) * noise`, `acp` in float32.
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        check_noise_index(step_index, self.timesteps.len())?;
        let a_t = self.alphas[step_index].0;
        let noise = noise.to_dtype(original.dtype())?;
        Ok((mul_scalar(original, a_t.sqrt())? + mul_scalar(&noise, (1.0f32 - a_t).sqrt())?)?)
    }

    fn predicted_original(
        &self,
        model_output: &Tensor,
        step_index: usize,
        sample: &Tensor,
    ) -> Result<Tensor, SchedulerError> {
        check_step(model_output, sample, step_index, self.timesteps.len())?;
        let mo = model_output.to_dtype(sample.dtype())?;
        let (x0, _) = self.x0_and_eps(sample, mo, step_index)?;
        Ok(x0.to_dtype(model_output.dtype())?)
    }
}

impl Ddim {
    /// The predicted x0 (clipped when the config says so) and noise at step `step_index`, from
    /// `sample` and the model output `mo` in the sample's dtype (both [B, C, H, W]).
    fn x0_and_eps(
        &self,
        sample: &Tensor,
        mo: Tensor,
        step_index: usize,
    ) -> Result<(Tensor, Tensor), SchedulerError> {
        let a_t = self.alphas[step_index].0;
        let (sa, sb) = (a_t.sqrt(), (1.0f32 - a_t).sqrt());
        let (mut x0, eps) = match self.prediction {
            PredictionType::Epsilon => (div_scalar(&(sample - mul_scalar(&mo, sb)?)?, sa)?, mo),
            PredictionType::VPrediction => {
                let x0 = (mul_scalar(sample, sa)? - mul_scalar(&mo, sb)?)?;
                let eps = (mul_scalar(&mo, sa)? + mul_scalar(sample, sb)?)?;
                (x0, eps)
            }
        };
        if let Some(r) = self.clip {
            x0 = x0.clamp(-r, r)?;
        }
        Ok((x0, eps))
    }
}
