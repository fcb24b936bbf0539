//! The SABW aggregator of the AFA method (`afa-method.md` §3): from the N experts' features at
//! one aggregation point it predicts a per-pixel softmax weight over experts and returns the
//! weighted sum. Built only from operations whose backward pass is correct (composed softmax
//! over experts, the differentiable norm/attention paths of `models::nn`), so `afa train` can
//! train it. Tensor names follow the official checkpoints (§9).
use candle_core::{DType, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::{Deserialize, Serialize};

use crate::models::blocks::{ResnetBlock2D, ResnetSpec, Transformer2D, TransformerSpec};
use crate::models::nn::{self, Conv2d, ConvSpec};

/// Hyper-parameters of one aggregator (the official `aggregator_{k}/config.json`, plus
/// `norm_num_groups`, which the official code fixes at 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct AggregatorConfig {
    /// Channels of each expert's feature map at this point.
    pub in_channels: usize,
    /// Width D of the aggregator (128 in the paper).
    pub hidden_size: usize,
    pub num_experts: usize,
    /// Transformer blocks L (2 effective in the paper, §8).
    pub num_layers: usize,
    pub num_attn_heads: usize,
    /// Width of the text embedding the transformer cross-attends to.
    pub cross_attn_dim: usize,
    /// Width of the time embedding (4 x block_out_channels[0]).
    pub temb_channels: usize,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
}

fn default_groups() -> usize {
    32
}

impl AggregatorConfig {
    /// Checks divisibility constraints, naming the offending value.
    pub fn validate(&self) -> std::result::Result<(), String> {
        let c = self;
        if c.num_experts == 0 || c.in_channels == 0 || c.hidden_size == 0 || c.num_layers == 0 {
            return Err(format!("aggregator sizes must be positive: {c:?}"));
        }
        if c.num_attn_heads == 0 || !c.hidden_size.is_multiple_of(c.num_attn_heads) {
            return Err(format!(
                "hidden_size {} does not split into {} heads",
                c.hidden_size, c.num_attn_heads
            ));
        }
        if c.norm_num_groups == 0 || !c.hidden_size.is_multiple_of(c.norm_num_groups) {
            return Err(format!(
                "hidden_size {} is not divisible by norm_num_groups {}",
                c.hidden_size, c.norm_num_groups
            ));
        }
        Ok(())
    }
}

/// One SABW aggregator.
#[derive(Debug, Clone)]
pub struct Aggregator {
    conv_in: Conv2d,
    res_block: ResnetBlock2D,
    transformer: Transformer2D,
    conv_out: Conv2d,
    config: AggregatorConfig,
}

impl Aggregator {
    /// Builds the aggregator from `vb` (names `conv_in`, `res_block`, `transformer`, `conv_out`).
    pub fn new(config: &AggregatorConfig, vb: VarBuilder) -> Result<Self> {
        config.validate().map_err(candle_core::Error::Msg)?;
        let d = config.hidden_size;
        let res_spec = ResnetSpec {
            in_channels: d,
            out_channels: d,
            temb_channels: Some(config.temb_channels),
            groups: config.norm_num_groups,
            eps: 1e-6,
            output_scale_factor: 1.0,
        };
        let transformer_spec = TransformerSpec {
            channels: d,
            heads: config.num_attn_heads,
            head_dim: d / config.num_attn_heads,
            context_dim: config.cross_attn_dim,
            layers: config.num_layers,
            groups: config.norm_num_groups,
            linear_projection: false,
        };
        let no_bias = ConvSpec {
            bias: false,
            ..ConvSpec::POINTWISE
        };
        Ok(Self {
            conv_in: nn::conv2d(
                config.num_experts * config.in_channels,
                d,
                1,
                ConvSpec::POINTWISE,
                vb.pp("conv_in"),
            )?,
            res_block: ResnetBlock2D::new(res_spec, vb.pp("res_block"))?,
            transformer: Transformer2D::new(transformer_spec, vb.pp("transformer"))?,
            conv_out: nn::conv2d(d, config.num_experts, 1, no_bias, vb.pp("conv_out"))?,
            config: *config,
        })
    }

    /// Its hyper-parameters.
    pub fn config(&self) -> &AggregatorConfig {
        &self.config
    }

    /// The per-pixel expert weights. `features`: N tensors `[B, C, h, w]`, `temb`: `[B, T]`,
    /// `context`: `[B, S, cross_attn_dim]` -> `[B, N, h, w]`, summing to 1 over N (f32 when the
    /// weights are f16/bf16, else their dtype).
    pub fn weights(&self, features: &[Tensor], temb: &Tensor, context: &Tensor) -> Result<Tensor> {
        if features.len() != self.config.num_experts {
            candle_core::bail!(
                "aggregator expects {} experts, got {}",
                self.config.num_experts,
                features.len()
            );
        }
        // Expert-major channel order: channels 0..C are expert 0, then expert 1, ...
        let stacked = Tensor::cat(features, 1)?;
        let h = self.conv_in.forward(&stacked)?;
        let h = self.res_block.forward(&h, Some(temb))?;
        let h = self.transformer.forward(&h, context)?;
        let logits = self.conv_out.forward(&h)?;
        match logits.dtype() {
            // Half precision: the softmax (max, exp, sum) in f32; the map stays f32.
            DType::F16 | DType::BF16 => candle_nn::ops::softmax(&logits.to_dtype(DType::F32)?, 1),
            _ => candle_nn::ops::softmax(&logits, 1),
        }
    }

    /// Aggregates: `features` N x `[B, C, h, w]` -> (`[B, C, h, w]`, map `[B, N, h, w]`).
    pub fn forward(
        &self,
        features: &[Tensor],
        temb: &Tensor,
        context: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let map = self.weights(features, temb, context)?;
        Ok((weighted_sum(features, &map)?, map))
    }
}

/// `features` N x `[B, C, h, w]`, `map` `[B, N, h, w]` -> sum over n of map[:, n] * features[n].
pub fn weighted_sum(features: &[Tensor], map: &Tensor) -> Result<Tensor> {
    let mut total: Option<Tensor> = None;
    for (n, f) in features.iter().enumerate() {
        let w = map.narrow(1, n, 1)?.to_dtype(f.dtype())?;
        let term = f.broadcast_mul(&w)?;
        total = Some(match total {
            None => term,
            Some(t) => (t + term)?,
        });
    }
    total.ok_or_else(|| candle_core::Error::Msg("no features to aggregate".into()))
}

/// The uniform map of the `mean` baseline: `[B, N, h, w]` filled with 1/N.
pub fn uniform_map(features: &[Tensor]) -> Result<Tensor> {
    let (b, _, h, w) = features
        .first()
        .ok_or_else(|| candle_core::Error::Msg("no features".into()))?
        .dims4()?;
    let n = features.len();
    Tensor::full(1.0f32 / n as f32, (b, n, h, w), features[0].device())
}
