//! Noise-schedule numerics shared by every sampler: betas, `alphas_cumprod`, training sigmas,
//! timestep spacings and the DDPM forward process ([`NoiseSchedule::add_noise`]) for training.
//!
//! diffusers computes these in float32 torch and float64 numpy; the helpers here reproduce that
//! arithmetic exactly (torch's fused `linspace`, double-accumulated `cumprod`, numpy's `linspace`,
//! `arange`, `interp` and round-half-to-even) so timesteps and sigmas match bit for bit. Values are
//! returned as `f64` holding the float32 results where diffusers keeps float32.
use candle_core::{DType, Tensor};

use super::{BetaSchedule, SchedulerConfig, SchedulerError};

/// `torch.linspace(start, end, n, dtype=float32)` as the CPU kernel computes it: a float32 step
/// and one fused multiply-add per element, counted from `start` for the first half and from `end`
/// for the second.
pub(crate) fn torch_linspace_f32(start: f64, end: f64, n: usize) -> Vec<f32> {
    let (a, b) = (start as f32, end as f32);
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f32;
    let half = n / 2;
    (0..n)
        .map(|i| {
            if i < half {
                step.mul_add(i as f32, a)
            } else {
                (-step).mul_add((n - 1 - i) as f32, b)
            }
        })
        .collect()
}

/// `alphas_cumprod` exactly as diffusers builds it (float32 betas, `torch.cumprod` accumulating in
/// double and storing float32), widened to f64. Length `num_train_timesteps`.
pub fn alphas_cumprod(cfg: &SchedulerConfig) -> Result<Vec<f64>, SchedulerError> {
    let n = cfg.num_train_timesteps;
    if n < 2 {
        return Err(SchedulerError::InvalidConfig(format!(
            "num_train_timesteps must be at least 2, got {n}"
        )));
    }
    let betas: Vec<f32> = match &cfg.trained_betas {
        Some(b) if b.len() != n => {
            return Err(SchedulerError::InvalidConfig(format!(
                "trained_betas has {} values but num_train_timesteps is {n}",
                b.len()
            )));
        }
        Some(b) => b.iter().map(|&v| v as f32).collect(),
        None => match cfg.beta_schedule {
            BetaSchedule::Linear => torch_linspace_f32(cfg.beta_start, cfg.beta_end, n),
            BetaSchedule::ScaledLinear => {
                torch_linspace_f32(cfg.beta_start.sqrt(), cfg.beta_end.sqrt(), n)
                    .into_iter()
                    .map(|v| v * v)
                    .collect()
            }
        },
    };
    if let Some(bad) = betas
        .iter()
        .find(|b| !(b.is_finite() && **b > 0.0 && **b < 1.0))
    {
        return Err(SchedulerError::InvalidConfig(format!(
            "betas must lie in (0, 1); got {bad} (beta_start {}, beta_end {})",
            cfg.beta_start, cfg.beta_end
        )));
    }
    let mut acc = 1.0f64;
    Ok(betas
        .iter()
        .map(|&b| {
            acc *= f64::from(1.0f32 - b);
            f64::from(acc as f32)
        })
        .collect())
}

/// Training sigmas `((1 - acp) / acp) ** 0.5` in float32 (as diffusers), ascending in t.
pub(crate) fn train_sigmas(acp: &[f64]) -> Vec<f64> {
    acp.iter()
        .map(|&a| {
            let a = a as f32;
            f64::from(((1.0f32 - a) / a).sqrt())
        })
        .collect()
}

/// `np.linspace(start, stop, num)` (endpoint included), in f64.
pub(crate) fn np_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut v: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    v[num - 1] = stop;
    v
}

/// `np.arange(start, stop, step)` for float arguments, in f64 (numpy's fill: `start + i * delta`
/// with `delta = (start + step) - start`).
pub(crate) fn np_arange(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    if len == 0 {
        return Vec::new();
    }
    let delta = (start + step) - start;
    (0..len)
        .map(|i| match i {
            0 => start,
            1 => start + step,
            _ => start + i as f64 * delta,
        })
        .collect()
}

/// `np.interp(x, arange(len(fp)), fp)`.
pub(crate) fn np_interp_unit(x: f64, fp: &[f64]) -> f64 {
    let last = fp.len() - 1;
    if x <= 0.0 {
        return fp[0];
    }
    if x >= last as f64 {
        return fp[last];
    }
    let j = x.floor() as usize;
    if x == j as f64 {
        return fp[j];
    }
    let slope = (fp[j + 1] - fp[j]) / 1.0;
    slope * (x - j as f64) + fp[j]
}

/// Round half to even, as `np.round`.
pub(crate) fn np_round(x: f64) -> f64 {
    x.round_ties_even()
}

/// DDPM forward process for training: `x_t = sqrt(acp_t) * x0 + sqrt(1 - acp_t) * eps`.
#[derive(Debug, Clone)]
pub struct NoiseSchedule {
    alphas_cumprod: Vec<f64>,
}

impl NoiseSchedule {
    /// Builds the schedule of `cfg` (same `alphas_cumprod` as the samplers).
    pub fn new(cfg: &SchedulerConfig) -> Result<Self, SchedulerError> {
        Ok(Self {
            alphas_cumprod: alphas_cumprod(cfg)?,
        })
    }

    /// `alphas_cumprod`, length `num_train_timesteps`.
    pub fn alphas_cumprod(&self) -> &[f64] {
        &self.alphas_cumprod
    }

    /// Noises `x0` [B, ...] with `eps` [B, ...] (same shape) at per-sample timesteps `t` (len B).
    /// Result has the dtype of `x0`.
    pub fn add_noise(
        &self,
        x0: &Tensor,
        eps: &Tensor,
        t: &[usize],
    ) -> Result<Tensor, SchedulerError> {
        let dims = x0.dims();
        if dims.is_empty() || dims[0] != t.len() {
            return Err(SchedulerError::InvalidInput(format!(
                "add_noise: {} timesteps for a batch of shape {dims:?}",
                t.len()
            )));
        }
        if eps.dims() != dims {
            return Err(SchedulerError::InvalidInput(format!(
                "add_noise: noise shape {:?} differs from sample shape {dims:?}",
                eps.dims()
            )));
        }
        let mut coef_shape = vec![1usize; dims.len()];
        coef_shape[0] = t.len();
        let (mut a, mut s) = (Vec::with_capacity(t.len()), Vec::with_capacity(t.len()));
        for &ti in t {
            let acp = *self.alphas_cumprod.get(ti).ok_or_else(|| {
                SchedulerError::InvalidInput(format!(
                    "add_noise: timestep {ti} >= num_train_timesteps {}",
                    self.alphas_cumprod.len()
                ))
            })?;
            a.push(acp.sqrt());
            s.push((1.0 - acp).sqrt());
        }
        let dev = x0.device();
        let a = Tensor::from_vec(a, coef_shape.as_slice(), dev)?.to_dtype(x0.dtype())?;
        let s = Tensor::from_vec(s, coef_shape.as_slice(), dev)?.to_dtype(x0.dtype())?;
        let eps = eps.to_dtype(x0.dtype())?;
        Ok((x0.broadcast_mul(&a)? + eps.broadcast_mul(&s)?)?)
    }
}

/// Float32 scalar helpers mirroring torch's `tensor * 0-d tensor` and `tensor / 0-d tensor`.
pub(crate) fn mul_scalar(t: &Tensor, s: f32) -> Result<Tensor, SchedulerError> {
    Ok(t.affine(f64::from(s), 0.0)?)
}

/// `t / s` as a true division (not a multiplication by the reciprocal), any shape.
pub(crate) fn div_scalar(t: &Tensor, s: f32) -> Result<Tensor, SchedulerError> {
    let s = Tensor::new(s, t.device())?.to_dtype(t.dtype())?;
    Ok(t.broadcast_div(&s)?)
}

/// The dtype the Euler / DPM++ updates run in: f64 stays f64, everything else is upcast to f32
/// (diffusers upcasts half-precision samples to float32 inside `step`).
pub(crate) fn work_dtype(t: &Tensor) -> DType {
    if t.dtype() == DType::F64 {
        DType::F64
    } else {
        DType::F32
    }
}
