//! DPM-Solver++ 2M (multistep, second order, midpoint), with linear or Karras sigmas, matching
//! diffusers `DPMSolverMultistepScheduler` (`algorithm_type="dpmsolver++"`, `solver_order=2`):
//! integer timesteps (default "linspace" spacing over `n + 1` points, last dropped), the data
//! prediction x0 kept from the previous step, first-order first step, and a first-order last
//! step when `final_sigmas_type="zero"`, `euler_at_final`, or `lower_order_final` with < 15 steps.
use candle_core::Tensor;

use super::betas::{
    div_scalar, mul_scalar, np_arange, np_interp_unit, np_linspace, np_round, train_sigmas,
    work_dtype,
};
use super::{
    FinalSigmas, NoiseSource, PredictionType, Scheduler, SchedulerConfig, SchedulerError,
    SchedulerKind, TimestepSpacing, alphas_cumprod, check_noise_index, check_step,
};

/// DPM++ 2M sampler for one job. Holds the previous step's x0 prediction.
#[derive(Debug, Clone)]
pub struct DpmSolverMultistep {
    karras: bool,
    timesteps: Vec<f64>,
    /// float32 sigmas, `steps + 1` values.
    sigmas: Vec<f32>,
    prediction: PredictionType,
    /// Whether the last step is first order.
    first_order_last: bool,
    /// x0 prediction of the previous step and the index of the next expected step.
    prev_x0: Option<Tensor>,
    next_step: usize,
}

/// Linear-sigma timesteps (integers, descending).
fn dpm_timesteps(cfg: &SchedulerConfig, spacing: TimestepSpacing, steps: usize) -> Vec<i64> {
    let t = cfg.num_train_timesteps;
    match spacing {
        TimestepSpacing::Linspace => {
            let mut v: Vec<i64> = np_linspace(0.0, (t - 1) as f64, steps + 1)
                .into_iter()
                .rev()
                .map(|v| np_round(v) as i64)
                .collect();
            v.pop();
            v
        }
        TimestepSpacing::Leading => {
            let ratio = t / (steps + 1);
            (1..=steps)
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

/// Karras sigmas (rho 7) from the training sigmas, descending, `steps` values.
fn karras_sigmas(train: &[f64], steps: usize) -> Vec<f64> {
    let (min, max) = (train[0], train[train.len() - 1]);
    let rho = 7.0f64;
    let (min_inv, max_inv) = (min.powf(1.0 / rho), max.powf(1.0 / rho));
    np_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|r| (max_inv + r * (min_inv - max_inv)).powf(rho))
        .collect()
}

/// diffusers `_sigma_to_t`: fractional training timestep of `sigma` by interpolating log-sigmas
/// (`log_sigmas` are float32 logs of the training sigmas, ascending).
fn sigma_to_t(sigma: f64, log_sigmas: &[f64]) -> f64 {
    let ls = sigma.max(1e-10).ln();
    let n = log_sigmas.len();
    let low = log_sigmas
        .iter()
        .rposition(|&l| ls - l >= 0.0)
        .unwrap_or(0)
        .min(n - 2);
    let (lo, hi) = (log_sigmas[low], log_sigmas[low + 1]);
    let w = ((lo - ls) / (lo - hi)).clamp(0.0, 1.0);
    (1.0 - w) * low as f64 + w * (low + 1) as f64
}

/// `(alpha_t, sigma_t, lambda_t)` of a sigma, in float32 as diffusers.
fn alpha_sigma_lambda(sigma: f32) -> (f32, f32, f32) {
    let alpha = 1.0f32 / (sigma * sigma + 1.0).sqrt();
    let s = sigma * alpha;
    (alpha, s, alpha.ln() - s.ln())
}

impl DpmSolverMultistep {
    /// Schedule for `steps` steps (1 ..= num_train_timesteps); `karras` selects Karras sigmas.
    pub fn new(cfg: &SchedulerConfig, steps: usize, karras: bool) -> Result<Self, SchedulerError> {
        let acp = alphas_cumprod(cfg)?;
        let n_train = cfg.num_train_timesteps;
        if steps == 0 || steps > n_train {
            return Err(SchedulerError::InvalidSteps {
                steps,
                max: n_train,
            });
        }
        let train = train_sigmas(&acp);
        let (timesteps, mut sigmas): (Vec<f64>, Vec<f32>) = if karras {
            let log_sigmas: Vec<f64> = train.iter().map(|&s| f64::from((s as f32).ln())).collect();
            let ks = karras_sigmas(&train, steps);
            let ts = ks
                .iter()
                .map(|&s| np_round(sigma_to_t(s, &log_sigmas)))
                .collect();
            (ts, ks.iter().map(|&s| s as f32).collect())
        } else {
            let spacing = cfg.spacing_for(SchedulerKind::DpmPp2m);
            let ts = dpm_timesteps(cfg, spacing, steps);
            if let Some(bad) = ts.iter().find(|&&t| t < 0 || t as usize >= n_train) {
                return Err(SchedulerError::InvalidConfig(format!(
                    "DPM++ timestep {bad} outside 0..{n_train} (steps {steps}, steps_offset {})",
                    cfg.steps_offset
                )));
            }
            let sig = ts
                .iter()
                .map(|&t| np_interp_unit(t as f64, &train) as f32)
                .collect();
            (ts.iter().map(|&t| t as f64).collect(), sig)
        };
        sigmas.push(match cfg.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => train[0] as f32,
        });
        let n = timesteps.len();
        let first_order_last = cfg.euler_at_final
            || (cfg.lower_order_final && n < 15)
            || cfg.final_sigmas_type == FinalSigmas::Zero;
        Ok(Self {
            karras,
            timesteps,
            sigmas,
            prediction: cfg.prediction_type,
            first_order_last,
            prev_x0: None,
            next_step: 0,
        })
    }

    /// The float32 sigmas (`steps + 1` values).
    pub fn sigmas(&self) -> Vec<f64> {
        self.sigmas.iter().map(|&s| f64::from(s)).collect()
    }

    /// The data prediction x0 at step `step_index` from the sample `x` and model output `mo`
    /// (both [B, C, H, W] in the working dtype), as diffusers' `convert_model_output`.
    fn data_prediction(
        &self,
        x: &Tensor,
        mo: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        let (alpha, sigma, _) = alpha_sigma_lambda(self.sigmas[step_index]);
        Ok(match self.prediction {
            PredictionType::Epsilon => div_scalar(&(x - mul_scalar(mo, sigma)?)?, alpha)?,
            PredictionType::VPrediction => (mul_scalar(x, alpha)? - mul_scalar(mo, sigma)?)?,
        })
    }
}

impl Scheduler for DpmSolverMultistep {
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
        if step_index != self.next_step {
            return Err(SchedulerError::InvalidInput(format!(
                "DPM++ 2M steps must run in order: expected step {}, got {step_index}",
                self.next_step
            )));
        }
        let dt_work = work_dtype(sample);
        let x = sample.to_dtype(dt_work)?;
        let mo = model_output.to_dtype(dt_work)?;
        let (_, sigma_s0, lambda_s0) = alpha_sigma_lambda(self.sigmas[step_index]);
        let x0 = self.data_prediction(&x, &mo, step_index)?;
        let (alpha_t, sigma_t, lambda_t) = alpha_sigma_lambda(self.sigmas[step_index + 1]);
        let h = lambda_t - lambda_s0;
        let c_x = sigma_t / sigma_s0;
        let c_d = alpha_t * ((-h).exp() - 1.0);
        let last = step_index + 1 == self.timesteps.len();
        let prev = match (&self.prev_x0, last && self.first_order_last) {
            (Some(m1), false) => {
                let (_, _, lambda_s1) = alpha_sigma_lambda(self.sigmas[step_index - 1]);
                let r0 = (lambda_s0 - lambda_s1) / h;
                let d1 = mul_scalar(&(&x0 - m1)?, 1.0 / r0)?;
                ((mul_scalar(&x, c_x)? - mul_scalar(&x0, c_d)?)? - mul_scalar(&d1, 0.5 * c_d)?)?
            }
            _ => (mul_scalar(&x, c_x)? - mul_scalar(&x0, c_d)?)?,
        };
        self.prev_x0 = Some(x0);
        self.next_step += 1;
        Ok(prev.to_dtype(model_output.dtype())?)
    }

    fn kind(&self) -> SchedulerKind {
        if self.karras {
            SchedulerKind::DpmPp2mKarras
        } else {
            SchedulerKind::DpmPp2m
        }
    }

    /// diffusers: `alpha_t * x + sigma_t * noise` with `alpha_t = 1 / sqrt(sigma^2 + 1)`.
    fn add_noise(
        &self,
        original: &Tensor,
        noise: &Tensor,
        step_index: usize,
    ) -> Result<Tensor, SchedulerError> {
        check_noise_index(step_index, self.timesteps.len())?;
        let (alpha_t, sigma_t, _) = alpha_sigma_lambda(self.sigmas[step_index]);
        let noise = noise.to_dtype(original.dtype())?;
        Ok((mul_scalar(original, alpha_t)? + mul_scalar(&noise, sigma_t)?)?)
    }

    /// The first step taken is first order, as in diffusers after `set_begin_index`.
    fn begin_at(&mut self, step_index: usize) -> Result<(), SchedulerError> {
        if self.next_step != 0 || step_index > self.timesteps.len() {
            return Err(SchedulerError::InvalidInput(format!(
                "DPM++ 2M cannot begin at step {step_index} (next step {}, {} steps)",
                self.next_step,
                self.timesteps.len()
            )));
        }
        self.next_step = step_index;
        Ok(())
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

    fn retain_rows(&mut self, rows: &Tensor) -> Result<(), SchedulerError> {
        if let Some(prev) = self.prev_x0.take() {
            self.prev_x0 = Some(prev.index_select(rows, 0)?);
        }
        Ok(())
    }
}
