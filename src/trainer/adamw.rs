//! AdamW exactly as PyTorch's `torch.optim.AdamW` (decoupled weight decay, bias-corrected
//! moments, `eps` added after the square root), over the aggregator parameters only, with
//! state that can be written to and read from a checkpoint.
use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};

use super::params::AggregatorParams;
use super::{Result, TrainerError};

/// AdamW hyper-parameters (the paper's: lr 1e-4, betas 0.9/0.999, eps 1e-8, weight decay 0.01).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamWConfig {
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
}

impl Default for AdamWConfig {
    fn default() -> Self {
        Self {
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
        }
    }
}

/// The optimizer: first and second moments per parameter, aligned with
/// `AggregatorParams::vars()`, and the number of steps taken.
#[derive(Debug, Clone)]
pub struct AdamW {
    config: AdamWConfig,
    steps: u64,
    exp_avg: Vec<Vec<Tensor>>,
    exp_avg_sq: Vec<Vec<Tensor>>,
}

fn state_name(k: usize, name: &str, which: &str) -> String {
    format!("aggregator_{k}.{name}.{which}")
}

impl AdamW {
    /// Zero moments for `params`.
    pub fn new(params: &AggregatorParams, config: AdamWConfig) -> Result<Self> {
        let zeros = || -> Result<Vec<Vec<Tensor>>> {
            params
                .vars()
                .iter()
                .map(|set| {
                    set.iter()
                        .map(|(_, v)| Ok(v.as_tensor().zeros_like()?))
                        .collect()
                })
                .collect()
        };
        Ok(Self {
            config,
            steps: 0,
            exp_avg: zeros()?,
            exp_avg_sq: zeros()?,
        })
    }

    /// Steps taken so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// One update with learning rate `lr`. `grads[k][i]` is the gradient of
    /// `params.vars()[k][i]` (same shape).
    pub fn step(
        &mut self,
        params: &AggregatorParams,
        grads: &[Vec<Tensor>],
        lr: f64,
    ) -> Result<()> {
        let c = self.config;
        self.steps += 1;
        let t = self.steps as i32;
        let bias1 = 1.0 - c.beta1.powi(t);
        let bias2 = 1.0 - c.beta2.powi(t);
        for (k, set) in params.vars().iter().enumerate() {
            for (i, (_, var)) in set.iter().enumerate() {
                let g = &grads[k][i];
                let m = ((&self.exp_avg[k][i] * c.beta1)? + (g * (1.0 - c.beta1))?)?;
                let v = ((&self.exp_avg_sq[k][i] * c.beta2)? + (g.sqr()? * (1.0 - c.beta2))?)?;
                let p = var.as_tensor().detach();
                let decayed = (&p * (1.0 - lr * c.weight_decay))?;
                let denom = ((v.sqrt()? / bias2.sqrt())? + c.eps)?;
                let update = ((&m / &denom)? * (lr / bias1))?;
                var.set(&(decayed - update)?)?;
                self.exp_avg[k][i] = m;
                self.exp_avg_sq[k][i] = v;
            }
        }
        Ok(())
    }

    /// Writes the moments to `path` (safetensors; the step count goes in the run state).
    pub fn save(&self, params: &AggregatorParams, path: &Path) -> Result<()> {
        let mut named: Vec<(String, Tensor)> = Vec::new();
        for (k, set) in params.vars().iter().enumerate() {
            for (i, (name, _)) in set.iter().enumerate() {
                named.push((
                    state_name(k, name, "exp_avg"),
                    self.exp_avg[k][i].to_device(&Device::Cpu)?,
                ));
                named.push((
                    state_name(k, name, "exp_avg_sq"),
                    self.exp_avg_sq[k][i].to_device(&Device::Cpu)?,
                ));
            }
        }
        let meta: HashMap<String, String> = [("steps".to_string(), self.steps.to_string())].into();
        safetensors::serialize_to_file(named.iter().map(|(n, t)| (n.as_str(), t)), Some(meta), path)
            .map_err(|e| TrainerError::Invalid(format!("writing {}: {e}", path.display())))
    }

    /// Reads moments written by [`AdamW::save`] for the same parameters.
    pub fn load(params: &AggregatorParams, config: AdamWConfig, path: &Path) -> Result<Self> {
        let bad = |reason: String| TrainerError::Resume {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| TrainerError::io(path, e))?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes)
            .map_err(|e| bad(format!("bad optimizer file: {e}")))?;
        let steps: u64 = header
            .metadata()
            .as_ref()
            .and_then(|m| m.get("steps"))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| bad("optimizer file has no step count".into()))?;
        let mut tensors = candle_core::safetensors::load_buffer(&bytes, params.device())?;
        let mut take = |k: usize, name: &str, which: &str, like: &Tensor| -> Result<Tensor> {
            let key = state_name(k, name, which);
            let t = tensors
                .remove(&key)
                .ok_or_else(|| bad(format!("optimizer file lacks {key}")))?;
            if t.dims() != like.dims() {
                return Err(bad(format!(
                    "{key} has shape {:?}, expected {:?}",
                    t.dims(),
                    like.dims()
                )));
            }
            Ok(t)
        };
        let (mut exp_avg, mut exp_avg_sq) = (Vec::new(), Vec::new());
        for (k, set) in params.vars().iter().enumerate() {
            let (mut m, mut v) = (Vec::new(), Vec::new());
            for (name, var) in set {
                m.push(take(k, name, "exp_avg", var.as_tensor())?);
                v.push(take(k, name, "exp_avg_sq", var.as_tensor())?);
            }
            exp_avg.push(m);
            exp_avg_sq.push(v);
        }
        Ok(Self {
            config,
            steps,
            exp_avg,
            exp_avg_sq,
        })
    }
}
