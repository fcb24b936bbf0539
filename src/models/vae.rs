//! The Stable Diffusion VAE: diffusers `AutoencoderKL` (encoder, `quant_conv`,
//! `post_quant_conv`, decoder) with its config (`vae/config.json`) and the encoder's diagonal
//! Gaussian. Tensor names are diffusers' so `diffusion_pytorch_model.safetensors` loads as is.
//!
//! Latent convention: `encode` returns the distribution of the *unscaled* latent `z`, and
//! `decode` takes an unscaled `z`. The diffusion model works on `(z - shift) * scaling_factor`;
//! use [`AutoencoderKL::scale_latents`] / [`AutoencoderKL::unscale_latents`] to convert.
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use super::ModelError;
use super::blocks::{Downsample2D, ResnetBlock2D, ResnetSpec, Upsample2D};
use super::nn::{self, Attention, AttentionSpec, Conv2d, ConvSpec, GroupNorm};

/// Images the CPU decodes at once (see [`AutoencoderKL::decode`]).
pub const DECODE_CHUNK: usize = 1;

/// Every norm of the VAE uses this epsilon (diffusers hard-codes it).
const VAE_EPS: f64 = 1e-6;
const COMPONENT: &str = "vae";

fn default_true() -> bool {
    true
}
fn default_three() -> usize {
    3
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_act() -> String {
    "silu".to_string()
}

/// diffusers `AutoencoderKL` config (`vae/config.json`). Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct VaeConfig {
    #[serde(default = "default_three")]
    pub in_channels: usize,
    #[serde(default = "default_three")]
    pub out_channels: usize,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: usize,
    pub norm_num_groups: usize,
    pub latent_channels: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_act")]
    pub act_fn: String,
    #[serde(default)]
    pub down_block_types: Option<Vec<String>>,
    #[serde(default)]
    pub up_block_types: Option<Vec<String>>,
}

impl VaeConfig {
    /// Stable Diffusion 1.5's VAE.
    pub fn sd15() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            norm_num_groups: 32,
            latent_channels: 4,
            scaling_factor: default_scaling_factor(),
            shift_factor: None,
            mid_block_add_attention: true,
            use_quant_conv: true,
            use_post_quant_conv: true,
            act_fn: default_act(),
            down_block_types: None,
            up_block_types: None,
        }
    }

    /// Rejects settings this implementation does not support.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        let fail = |reason: String| {
            Err(ModelError::Config {
                component: COMPONENT,
                reason,
            })
        };
        if self.block_out_channels.is_empty()
            || self.layers_per_block == 0
            || self.norm_num_groups == 0
        {
            return fail(
                "block_out_channels, layers_per_block and norm_num_groups must be non-zero".into(),
            );
        }
        if self.act_fn != "silu" {
            return fail(format!("act_fn {:?} (only \"silu\")", self.act_fn));
        }
        if let Some(&c) = self
            .block_out_channels
            .iter()
            .find(|&&c| !c.is_multiple_of(self.norm_num_groups))
        {
            return fail(format!(
                "{c} channels not divisible by norm_num_groups {}",
                self.norm_num_groups
            ));
        }
        let check_types = |types: &Option<Vec<String>>, want: &str| match types {
            Some(t) if t.len() != self.block_out_channels.len() || t.iter().any(|s| s != want) => {
                Err(format!(
                    "block types {t:?} (only {want}, one per block_out_channels)"
                ))
            }
            _ => Ok(()),
        };
        check_types(&self.down_block_types, "DownEncoderBlock2D")
            .and_then(|_| check_types(&self.up_block_types, "UpDecoderBlock2D"))
            .or_else(fail)
    }
}

/// The encoder's output: a diagonal Gaussian over the unscaled latent, `[B, latent, h, w]` each.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Log-variance, clamped to `[-30, 20]` as diffusers does.
    pub logvar: Tensor,
}

impl DiagonalGaussian {
    /// `moments`: `[B, 2*latent, h, w]` (mean then log-variance along channels).
    fn from_moments(moments: &Tensor) -> Result<Self> {
        let c = moments.dim(1)? / 2;
        Ok(Self {
            mean: moments.narrow(1, 0, c)?.contiguous()?,
            logvar: moments
                .narrow(1, c, c)?
                .clamp(-30f32, 20f32)?
                .contiguous()?,
        })
    }

    /// `mean + exp(logvar / 2) * noise`; `noise`: standard normal, same shape as `mean`.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        let std = (&self.logvar * 0.5)?.exp()?;
        &self.mean + (std * noise)?
    }

    /// The mean, `[B, latent, h, w]`.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

/// The VAE's single-head self-attention over spatial positions (diffusers `Attention` with
/// `group_norm`, biased `to_q/to_k/to_v/to_out.0`, residual, rescale 1).
#[derive(Debug, Clone)]
struct VaeAttention {
    group_norm: GroupNorm,
    attn: Attention,
}

impl VaeAttention {
    fn new(channels: usize, groups: usize, vb: VarBuilder) -> Result<Self> {
        let spec = AttentionSpec {
            query_dim: channels,
            context_dim: channels,
            heads: 1,
            head_dim: channels,
            qkv_bias: true,
        };
        Ok(Self {
            group_norm: GroupNorm::new(groups, channels, VAE_EPS, vb.pp("group_norm"))?,
            attn: Attention::new(spec, vb)?,
        })
    }

    /// `x`: `[B, C, H, W]` -> `[B, C, H, W]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((b, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        let out = self.attn.forward(&tokens, None)?;
        let out = out.transpose(1, 2)?.reshape((b, c, h, w))?;
        out + x
    }
}

/// diffusers `UNetMidBlock2D` without time embedding: resnet, (attention), resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    resnet0: ResnetBlock2D,
    attention: Option<VaeAttention>,
    resnet1: ResnetBlock2D,
}

impl MidBlock {
    fn new(channels: usize, cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let spec = resnet_spec(channels, channels, cfg);
        let attention = if cfg.mid_block_add_attention {
            Some(VaeAttention::new(
                channels,
                cfg.norm_num_groups,
                vb.pp("attentions.0"),
            )?)
        } else {
            None
        };
        Ok(Self {
            resnet0: ResnetBlock2D::new(spec, vb.pp("resnets.0"))?,
            attention,
            resnet1: ResnetBlock2D::new(spec, vb.pp("resnets.1"))?,
        })
    }

    /// `x`: `[B, C, H, W]` -> `[B, C, H, W]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.resnet0.forward(x, None)?;
        if let Some(attn) = &self.attention {
            h = attn.forward(&h)?;
        }
        self.resnet1.forward(&h, None)
    }
}

fn resnet_spec(in_channels: usize, out_channels: usize, cfg: &VaeConfig) -> ResnetSpec {
    ResnetSpec {
        in_channels,
        out_channels,
        temb_channels: None,
        groups: cfg.norm_num_groups,
        eps: VAE_EPS,
        output_scale_factor: 1.0,
    }
}

/// `n` resnets `in -> out, out -> out, ...` under `vb.resnets.{j}`.
fn resnets(
    n: usize,
    cin: usize,
    cout: usize,
    cfg: &VaeConfig,
    vb: &VarBuilder,
) -> Result<Vec<ResnetBlock2D>> {
    (0..n)
        .map(|j| {
            let cin = if j == 0 { cin } else { cout };
            ResnetBlock2D::new(resnet_spec(cin, cout, cfg), vb.pp(format!("resnets.{j}")))
        })
        .collect()
}

/// `DownEncoderBlock2D`: resnets, then an optional asymmetric-padding downsampler.
#[derive(Debug, Clone)]
struct DownBlock {
    resnets: Vec<ResnetBlock2D>,
    downsampler: Option<Downsample2D>,
}

/// `UpDecoderBlock2D`: resnets, then an optional nearest-neighbour upsampler.
#[derive(Debug, Clone)]
struct UpBlock {
    resnets: Vec<ResnetBlock2D>,
    upsampler: Option<Upsample2D>,
}

/// diffusers `Encoder` (double_z): image -> Gaussian moments.
#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let ch = &cfg.block_out_channels;
        let last = *ch.last().expect("validated non-empty");
        let mut down_blocks = Vec::with_capacity(ch.len());
        let mut cin = ch[0];
        for (i, &cout) in ch.iter().enumerate() {
            let bvb = vb.pp(format!("down_blocks.{i}"));
            let downsampler = if i + 1 < ch.len() {
                Some(Downsample2D::new(cout, 0, bvb.pp("downsamplers.0"))?)
            } else {
                None
            };
            down_blocks.push(DownBlock {
                resnets: resnets(cfg.layers_per_block, cin, cout, cfg, &bvb)?,
                downsampler,
            });
            cin = cout;
        }
        Ok(Self {
            conv_in: nn::conv2d(cfg.in_channels, ch[0], 3, ConvSpec::SAME3, vb.pp("conv_in"))?,
            down_blocks,
            mid_block: MidBlock::new(last, cfg, vb.pp("mid_block"))?,
            conv_norm_out: GroupNorm::new(
                cfg.norm_num_groups,
                last,
                VAE_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: nn::conv2d(
                last,
                2 * cfg.latent_channels,
                3,
                ConvSpec::SAME3,
                vb.pp("conv_out"),
            )?,
        })
    }

    /// `x`: `[B, in, H, W]` -> `[B, 2*latent, H/f, W/f]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(down) = &block.downsampler {
                h = down.forward(&h)?;
            }
        }
        let h = self.mid_block.forward(&h)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }
}

/// diffusers `Decoder`: latent -> image.
#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let top = reversed[0];
        let first = *reversed.last().expect("validated non-empty");
        let mut up_blocks = Vec::with_capacity(reversed.len());
        let mut cin = top;
        for (i, &cout) in reversed.iter().enumerate() {
            let bvb = vb.pp(format!("up_blocks.{i}"));
            let upsampler = if i + 1 < reversed.len() {
                Some(Upsample2D::new(cout, bvb.pp("upsamplers.0"))?)
            } else {
                None
            };
            up_blocks.push(UpBlock {
                resnets: resnets(cfg.layers_per_block + 1, cin, cout, cfg, &bvb)?,
                upsampler,
            });
            cin = cout;
        }
        Ok(Self {
            conv_in: nn::conv2d(
                cfg.latent_channels,
                top,
                3,
                ConvSpec::SAME3,
                vb.pp("conv_in"),
            )?,
            mid_block: MidBlock::new(top, cfg, vb.pp("mid_block"))?,
            up_blocks,
            conv_norm_out: GroupNorm::new(
                cfg.norm_num_groups,
                first,
                VAE_EPS,
                vb.pp("conv_norm_out"),
            )?,
            conv_out: nn::conv2d(
                first,
                cfg.out_channels,
                3,
                ConvSpec::SAME3,
                vb.pp("conv_out"),
            )?,
        })
    }

    /// `z`: `[B, latent, h, w]` -> `[B, out, h*f, w*f]`.
    fn forward(&self, z: &Tensor) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?)?;
        for block in &self.up_blocks {
            for resnet in &block.resnets {
                h = resnet.forward(&h, None)?;
            }
            if let Some(up) = &block.upsampler {
                h = up.forward(&h, None)?;
            }
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }
}

/// diffusers `AutoencoderKL`.
#[derive(Debug, Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    decoder: Decoder,
    config: VaeConfig,
    dtype: DType,
    device: Device,
}

impl AutoencoderKL {
    /// Builds the model from `vb` (diffusers names: `encoder.*`, `decoder.*`, `quant_conv`,
    /// `post_quant_conv`). Fails on a config `VaeConfig::validate` rejects (call it first for a
    /// typed `ModelError`).
    pub fn new(cfg: &VaeConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let moments = 2 * cfg.latent_channels;
        let latent = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(nn::conv2d(
                moments,
                moments,
                1,
                ConvSpec::POINTWISE,
                vb.pp("quant_conv"),
            )?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(nn::conv2d(
                latent,
                latent,
                1,
                ConvSpec::POINTWISE,
                vb.pp("post_quant_conv"),
            )?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(cfg, vb.pp("encoder"))?,
            quant_conv,
            post_quant_conv,
            decoder: Decoder::new(cfg, vb.pp("decoder"))?,
            config: cfg.clone(),
            dtype: vb.dtype(),
            device: vb.device().clone(),
        })
    }

    /// Dtype of the weights.
    pub fn dtype(&self) -> DType {
        self.dtype
    }

    /// Device of the weights.
    pub fn device(&self) -> &Device {
        &self.device
    }

    /// The config the model was built from.
    pub fn config(&self) -> &VaeConfig {
        &self.config
    }

    /// Spatial downsampling factor image -> latent: `2^(blocks - 1)` (8 for SD1.5).
    pub fn scale_factor(&self) -> usize {
        1 << (self.config.block_out_channels.len() - 1)
    }

    /// The config's `scaling_factor` (0.18215 for SD1.5).
    pub fn scaling_factor(&self) -> f64 {
        self.config.scaling_factor
    }

    /// Encodes `x`: `[B, in, H, W]` in `[-1, 1]` (H, W multiples of `scale_factor()`) into the
    /// distribution of the unscaled latent, `[B, latent, H/f, W/f]`.
    pub fn encode(&self, x: &Tensor) -> Result<DiagonalGaussian> {
        let moments = self.encoder.forward(x)?;
        let moments = match &self.quant_conv {
            Some(c) => c.forward(&moments)?,
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Decodes an unscaled latent `z`: `[B, latent, h, w]` (that is, diffusion latents already
    /// divided by `scaling_factor()` and shifted back, see `unscale_latents`) into an image
    /// `[B, out, h*f, w*f]`, nominally in `[-1, 1]` but not clamped (as diffusers' `decode`).
    ///
    /// A batch is decoded in chunks of [`DECODE_CHUNK`] images on the CPU (one full-resolution
    /// decoder's activations at a time, however many images a server batches), whole on an
    /// accelerator; each image's result is the same either way (the decoder is per-sample).
    pub fn decode(&self, z: &Tensor) -> Result<Tensor> {
        let b = z.dim(0)?;
        if z.device().is_cpu() && b > DECODE_CHUNK {
            let mut chunks = Vec::with_capacity(b.div_ceil(DECODE_CHUNK));
            let mut start = 0;
            while start < b {
                let n = DECODE_CHUNK.min(b - start);
                chunks.push(self.decode(&z.narrow(0, start, n)?)?);
                start += n;
            }
            return Tensor::cat(&chunks, 0);
        }
        let z = match &self.post_quant_conv {
            Some(c) => c.forward(z)?,
            None => z.clone(),
        };
        self.decoder.forward(&z)
    }

    /// Diffusion latents -> unscaled `z`: `latents / scaling_factor + shift_factor`.
    /// `latents`: `[B, latent, h, w]` -> same shape.
    pub fn unscale_latents(&self, latents: &Tensor) -> Result<Tensor> {
        let z = (latents / self.config.scaling_factor)?;
        match self.config.shift_factor {
            Some(s) => z + s,
            None => Ok(z),
        }
    }

    /// Unscaled `z` -> diffusion latents: `(z - shift_factor) * scaling_factor`.
    /// `z`: `[B, latent, h, w]` -> same shape.
    pub fn scale_latents(&self, z: &Tensor) -> Result<Tensor> {
        let z = match self.config.shift_factor {
            Some(s) => (z - s)?,
            None => z.clone(),
        };
        z * self.config.scaling_factor
    }
}
