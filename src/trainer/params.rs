//! The trainable parameters of the 25 (or however many points the members have) aggregators:
//! one `Var` per tensor, under the official tensor names (`afa-method.md` §9). Fresh parameters
//! follow PyTorch's default init (U(-1/sqrt(fan_in), 1/sqrt(fan_in)) for conv/linear weights and
//! biases, ones/zeros for norm scales/shifts) from a seeded stream, with `conv_out` zero (§6), so
//! every map starts uniform. Aggregators are built over the `Var`s (gradients flow) or over
//! detached views of the same storage (fast inference for validation).
use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Shape, Tensor, Var};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};

use super::{Result, Stream, TrainerError, rng, uniform};
use crate::ensemble::{Aggregator, AggregatorConfig};
use crate::loading::aggregators::AggregatorCheckpoint;

/// Trainable aggregator parameters.
#[derive(Debug, Clone)]
pub struct AggregatorParams {
    configs: Vec<AggregatorConfig>,
    /// `vars[k]`: aggregator k's tensors, sorted by name.
    vars: Vec<Vec<(String, Var)>>,
    device: Device,
}

/// Records the names and shapes an `Aggregator` asks for (values are zeros).
type Recorded = Arc<Mutex<Vec<(String, Vec<usize>)>>>;

struct Recorder(Recorded);

impl SimpleBackend for Recorder {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        if let Ok(mut names) = self.0.lock() {
            names.push((name.to_string(), s.dims().to_vec()));
        }
        Tensor::zeros(s, dtype, dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("recorder: no shape for {name}")
    }

    fn contains_tensor(&self, _: &str) -> bool {
        true
    }
}

/// The tensor names and shapes of an aggregator with `config`, sorted by name.
pub fn parameter_shapes(config: &AggregatorConfig) -> Result<Vec<(String, Vec<usize>)>> {
    let names = Arc::new(Mutex::new(Vec::new()));
    let vb = VarBuilder::from_backend(Box::new(Recorder(names.clone())), DType::F32, Device::Cpu);
    Aggregator::new(config, vb)?;
    let mut out = names
        .lock()
        .map_err(|_| TrainerError::Invalid("parameter recorder poisoned".into()))?
        .clone();
    out.sort();
    out.dedup_by(|a, b| a.0 == b.0);
    Ok(out)
}

/// PyTorch-default init of one tensor. `fan_in` of biases is their weight's.
fn init_values(
    name: &str,
    dims: &[usize],
    fan_in: Option<usize>,
    r: &mut crate::pipeline::noise::ImageRng,
) -> Vec<f32> {
    let count: usize = dims.iter().product();
    let is_norm = dims.len() == 1 && fan_in.is_none();
    if name == "conv_out.weight" {
        return vec![0.0; count];
    }
    if is_norm {
        let v = if name.ends_with("weight") { 1.0 } else { 0.0 };
        return vec![v; count];
    }
    let fan = fan_in.unwrap_or_else(|| dims[1..].iter().product());
    let bound = 1.0 / (fan.max(1) as f64).sqrt();
    (0..count)
        .map(|_| ((2.0 * uniform(r) - 1.0) * bound) as f32)
        .collect()
}

impl AggregatorParams {
    /// Fresh parameters for `configs`, seeded (PyTorch default init, zero `conv_out`).
    pub fn fresh(configs: &[AggregatorConfig], seed: u64, device: &Device) -> Result<Self> {
        let mut tensors = Vec::with_capacity(configs.len());
        for (k, cfg) in configs.iter().enumerate() {
            let shapes = parameter_shapes(cfg)?;
            let weight_fan: HashMap<&str, usize> = shapes
                .iter()
                .filter(|(n, d)| n.ends_with(".weight") && d.len() >= 2)
                .map(|(n, d)| (n.trim_end_matches(".weight"), d[1..].iter().product()))
                .collect();
            let mut r = rng(seed, Stream::Init, k as u64, 0);
            let mut named = Vec::with_capacity(shapes.len());
            for (name, dims) in &shapes {
                let fan_in = match name.strip_suffix(".bias") {
                    Some(stem) => weight_fan.get(stem).copied(),
                    None if dims.len() >= 2 => Some(dims[1..].iter().product()),
                    None => None,
                };
                let values = init_values(name, dims, fan_in, &mut r);
                named.push((
                    name.clone(),
                    Tensor::from_vec(values, dims.as_slice(), &Device::Cpu)?,
                ));
            }
            tensors.push(named);
        }
        Self::from_tensors(configs, tensors, device)
    }

    /// Parameters from named tensors (`tensors[k]`: aggregator k's), checked against the names
    /// and shapes `configs` need.
    pub fn from_tensors(
        configs: &[AggregatorConfig],
        tensors: Vec<Vec<(String, Tensor)>>,
        device: &Device,
    ) -> Result<Self> {
        if tensors.len() != configs.len() {
            return Err(TrainerError::Invalid(format!(
                "{} tensor sets for {} aggregators",
                tensors.len(),
                configs.len()
            )));
        }
        let mut vars = Vec::with_capacity(configs.len());
        for (k, (cfg, named)) in configs.iter().zip(tensors).enumerate() {
            let expected = parameter_shapes(cfg)?;
            let mut given: HashMap<String, Tensor> = named.into_iter().collect();
            let mut set = Vec::with_capacity(expected.len());
            for (name, dims) in &expected {
                let t = given.remove(name).ok_or_else(|| {
                    TrainerError::Invalid(format!("aggregator {k}: missing tensor {name}"))
                })?;
                if t.dims() != dims.as_slice() {
                    return Err(TrainerError::Invalid(format!(
                        "aggregator {k}: {name} has shape {:?}, expected {dims:?}",
                        t.dims()
                    )));
                }
                let t = t.to_dtype(DType::F32)?.to_device(device)?.contiguous()?;
                // A private copy: the Var is updated in place and must not alias the source.
                set.push((name.clone(), Var::from_tensor(&t.copy()?)?));
            }
            if let Some(extra) = given.keys().next() {
                return Err(TrainerError::Invalid(format!(
                    "aggregator {k}: unexpected tensor {extra}"
                )));
            }
            vars.push(set);
        }
        Ok(Self {
            configs: configs.to_vec(),
            vars,
            device: device.clone(),
        })
    }

    /// Parameters from an aggregator checkpoint (our file or an official folder).
    pub fn from_checkpoint(checkpoint: &AggregatorCheckpoint, device: &Device) -> Result<Self> {
        let tensors = (0..checkpoint.configs.len())
            .map(|k| checkpoint.tensors(k))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Self::from_tensors(&checkpoint.configs, tensors, device)
    }

    /// Where the parameters live.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The aggregators' configs.
    pub fn configs(&self) -> &[AggregatorConfig] {
        &self.configs
    }

    /// `vars()[k]`: aggregator k's `(name, Var)`, sorted by name.
    pub fn vars(&self) -> &[Vec<(String, Var)>] {
        &self.vars
    }

    /// Total number of scalar parameters.
    pub fn count(&self) -> usize {
        self.vars
            .iter()
            .flatten()
            .map(|(_, v)| v.as_tensor().elem_count())
            .sum()
    }

    fn build_with(&self, detached: bool) -> Result<Vec<Aggregator>> {
        self.configs
            .iter()
            .zip(&self.vars)
            .map(|(cfg, set)| {
                let map: HashMap<String, Tensor> = set
                    .iter()
                    .map(|(n, v)| {
                        let t = v.as_tensor();
                        (n.clone(), if detached { t.detach() } else { t.clone() })
                    })
                    .collect();
                let vb = VarBuilder::from_tensors(map, DType::F32, &self.device);
                Ok(Aggregator::new(cfg, vb)?)
            })
            .collect()
    }

    /// Aggregators over the `Var`s: a forward through them records the graph for backward.
    pub fn build_trainable(&self) -> Result<Vec<Aggregator>> {
        self.build_with(false)
    }

    /// Aggregators over detached views of the same storage (they see every update; no graph).
    pub fn build_frozen(&self) -> Result<Vec<Aggregator>> {
        self.build_with(true)
    }

    /// Detached copies of every tensor, per aggregator, for writing checkpoints.
    pub fn named_tensors(&self) -> Result<Vec<Vec<(String, Tensor)>>> {
        self.vars
            .iter()
            .map(|set| {
                set.iter()
                    .map(|(n, v)| {
                        Ok((
                            n.clone(),
                            v.as_tensor().detach().to_device(&Device::Cpu)?.copy()?,
                        ))
                    })
                    .collect()
            })
            .collect()
    }
}
