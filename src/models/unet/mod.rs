//! The staged UNet: diffusers' `UNet2DConditionModel` (SD1.x layout) assembled as an ordered
//! list of layers that can be run one at a time, as the AFA method needs (§2.1/§2.4 of
//! `afa-method.md`): conv_in; each down resnet(+attention) and each downsampler; the mid block;
//! each up layer with its skip (the upsampler folded into the last layer of a block); the output
//! head. The caller owns the features between layers and the skip stack, so it can read or
//! replace them; `forward` is the plain pass built from the same steps.
mod config;
mod layers;

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;

pub use config::{BlockKind, PerBlock, UNetConfig};
pub use layers::{LayerModule, layer_plan};

use super::ModelError;
use super::nn::{self, Linear};

/// Which part of the UNet a layer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UNetLayer {
    ConvIn,
    /// Resnet `layer` (+ its transformer) of down block `block`.
    Down {
        block: usize,
        layer: usize,
    },
    /// The downsampler of down block `block`.
    Downsample {
        block: usize,
    },
    Mid,
    /// Layer `layer` of up block `block`: concatenated skip, resnet, transformer, and on the last
    /// layer of a block the upsampler.
    Up {
        block: usize,
        layer: usize,
    },
    /// conv_norm_out, SiLU, conv_out.
    Head,
}

/// Static facts about one layer of the plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LayerInfo {
    pub layer: UNetLayer,
    /// Channels of the layer's output.
    pub out_channels: usize,
    /// The output's spatial size is the latent size divided by this (rounded up per stage).
    pub downscale: usize,
    /// The output goes onto the skip stack.
    pub pushes_skip: bool,
    /// The layer concatenates the top of the skip stack to its input.
    pub pops_skip: bool,
    /// The layer ends with an upsampler.
    pub upsamples: bool,
}

/// Per-call conditioning shared by all layers.
#[derive(Debug, Clone, Copy)]
pub struct Conditioning<'a> {
    /// Time embedding `[B, temb_channels]` from `StagedUNet::time_embedding`.
    pub temb: &'a Tensor,
    /// Text context `[B, S, cross_attention_dim]`.
    pub context: &'a Tensor,
}

/// Input of one layer.
#[derive(Debug, Clone, Copy)]
pub struct LayerInput<'a> {
    /// `[B, C, H, W]`: the previous layer's output (the latent for conv_in).
    pub hidden: &'a Tensor,
    /// The skip for up layers (`[B, Cs, H, W]`).
    pub skip: Option<&'a Tensor>,
    /// Target spatial size of the upsampler (the next skip's size); 2x when `None`.
    pub upsample_to: Option<(usize, usize)>,
}

/// The skip connections of one pass, shared by all experts of an ensemble.
#[derive(Debug, Default, Clone)]
pub struct SkipStack {
    skips: Vec<Tensor>,
}

/// What a layer takes from the skip stack.
#[derive(Debug, Clone, Default)]
pub struct SkipTake {
    pub skip: Option<Tensor>,
    pub upsample_to: Option<(usize, usize)>,
}

impl SkipStack {
    /// Pushes a layer output (call when `LayerInfo::pushes_skip`).
    pub fn push(&mut self, t: Tensor) {
        self.skips.push(t);
    }

    /// Number of stored skips.
    pub fn len(&self) -> usize {
        self.skips.len()
    }

    /// True when empty.
    pub fn is_empty(&self) -> bool {
        self.skips.is_empty()
    }

    /// Pops the skip a layer needs and, for an upsampling layer, the size of the next skip.
    pub fn take(&mut self, info: &LayerInfo) -> Result<SkipTake> {
        let skip = if info.pops_skip {
            Some(self.skips.pop().ok_or_else(|| {
                candle_core::Error::Msg(format!("skip stack empty at {:?}", info.layer))
            })?)
        } else {
            None
        };
        let upsample_to = match (info.upsamples, self.skips.last()) {
            (true, Some(next)) => {
                let (_, _, h, w) = next.dims4()?;
                Some((h, w))
            }
            _ => None,
        };
        Ok(SkipTake { skip, upsample_to })
    }
}

/// diffusers `TimestepEmbedding` (`linear_1`, SiLU, `linear_2`) after the sinusoidal projection.
#[derive(Debug, Clone)]
struct TimeEmbedding {
    linear_1: Linear,
    linear_2: Linear,
    frequencies: Vec<f32>,
    flip_sin_to_cos: bool,
}

impl TimeEmbedding {
    fn new(cfg: &UNetConfig, vb: VarBuilder) -> Result<Self> {
        let c0 = cfg.block_out_channels[0];
        let temb = cfg.temb_channels();
        let half = c0 / 2;
        // Computed in f32 exactly as diffusers' get_timestep_embedding does.
        let denom = half as f32 - cfg.freq_shift as f32;
        let log_max = -(10000f64.ln() as f32);
        let frequencies = (0..half)
            .map(|i| (log_max * i as f32 / denom).exp())
            .collect();
        Ok(Self {
            linear_1: nn::linear(c0, temb, true, vb.pp("linear_1"))?,
            linear_2: nn::linear(temb, temb, true, vb.pp("linear_2"))?,
            frequencies,
            flip_sin_to_cos: cfg.flip_sin_to_cos,
        })
    }

    /// `timesteps`: `[B]` -> `[B, temb_channels]`.
    fn forward(&self, timesteps: &Tensor, dtype: DType) -> Result<Tensor> {
        let b = timesteps.dim(0)?;
        let freqs = Tensor::from_slice(
            &self.frequencies,
            (1, self.frequencies.len()),
            timesteps.device(),
        )?;
        let angles = timesteps
            .to_dtype(DType::F32)?
            .reshape((b, 1))?
            .broadcast_mul(&freqs)?;
        let (sin, cos) = (angles.sin()?, angles.cos()?);
        let emb = if self.flip_sin_to_cos {
            Tensor::cat(&[cos, sin], 1)?
        } else {
            Tensor::cat(&[sin, cos], 1)?
        };
        let h = self.linear_1.forward(&emb.to_dtype(dtype)?)?.silu()?;
        self.linear_2.forward(&h)
    }
}

/// A UNet that runs one layer at a time. See the module docs for the layer order.
#[derive(Debug, Clone)]
pub struct StagedUNet {
    config: UNetConfig,
    time_embedding: TimeEmbedding,
    plan: Vec<LayerInfo>,
    modules: Vec<LayerModule>,
    dtype: DType,
}

impl StagedUNet {
    /// Builds the UNet from diffusers-named weights.
    pub fn new(config: &UNetConfig, vb: VarBuilder) -> std::result::Result<Self, ModelError> {
        config.validate()?;
        let plan = layer_plan(config);
        let modules = layers::build_modules(config, &plan, &vb)?;
        Ok(Self {
            config: config.clone(),
            time_embedding: TimeEmbedding::new(config, vb.pp("time_embedding"))?,
            plan,
            modules,
            dtype: vb.dtype(),
        })
    }

    /// The config the UNet was built from.
    pub fn config(&self) -> &UNetConfig {
        &self.config
    }

    /// Dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// The layers in execution order.
    pub fn plan(&self) -> &[LayerInfo] {
        &self.plan
    }

    /// `timesteps`: `[B]` (any float dtype) -> time embedding `[B, temb_channels]`.
    pub fn time_embedding(&self, timesteps: &Tensor) -> Result<Tensor> {
        self.time_embedding.forward(timesteps, self.dtype)
    }

    /// Runs layer `index` of the plan. Shapes: `input.hidden` `[B, C_in, H, W]` ->
    /// `[B, plan[index].out_channels, H', W']`.
    pub fn run_layer(
        &self,
        index: usize,
        input: &LayerInput,
        cond: &Conditioning,
    ) -> Result<Tensor> {
        let module = self
            .modules
            .get(index)
            .ok_or_else(|| candle_core::Error::Msg(format!("UNet has no layer {index}")))?;
        module.forward(input, cond, self.config.center_input_sample)
    }

    /// The plain forward pass. `sample`: `[B, 4, h, w]`, `timesteps`: `[B]`,
    /// `context`: `[B, S, cross_attention_dim]` -> noise prediction `[B, out_channels, h, w]`.
    pub fn forward(&self, sample: &Tensor, timesteps: &Tensor, context: &Tensor) -> Result<Tensor> {
        let temb = self.time_embedding(timesteps)?;
        let cond = Conditioning {
            temb: &temb,
            context,
        };
        let mut skips = SkipStack::default();
        let mut hidden = sample.clone();
        for (i, info) in self.plan.iter().enumerate() {
            let take = skips.take(info)?;
            let input = LayerInput {
                hidden: &hidden,
                skip: take.skip.as_ref(),
                upsample_to: take.upsample_to,
            };
            hidden = self.run_layer(i, &input, &cond)?;
            if info.pushes_skip {
                skips.push(hidden.clone());
            }
        }
        Ok(hidden)
    }
}
