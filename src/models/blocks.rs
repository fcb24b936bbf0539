//! Diffusers building blocks with diffusers tensor names: `ResnetBlock2D`, `Transformer2DModel`
//! (with `BasicTransformerBlock` and the GEGLU feed-forward using exact erf GELU),
//! `Downsample2D` and `Upsample2D`. Shared by the UNet, the VAE and the AFA aggregators.
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::nn::{self, Attention, AttentionSpec, Conv2d, ConvSpec, GroupNorm, LayerNorm, Linear};

/// Shape and norm settings of a `ResnetBlock2D`.
#[derive(Debug, Clone, Copy)]
pub struct ResnetSpec {
    pub in_channels: usize,
    pub out_channels: usize,
    /// Width of the time embedding; `None` for the VAE's blocks.
    pub temb_channels: Option<usize>,
    pub groups: usize,
    pub eps: f64,
    pub output_scale_factor: f64,
}

/// diffusers `ResnetBlock2D` ("default" time-embedding norm, SiLU, no up/down sampling).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

impl ResnetBlock2D {
    pub fn new(spec: ResnetSpec, vb: VarBuilder) -> Result<Self> {
        let (cin, cout) = (spec.in_channels, spec.out_channels);
        let time_emb_proj = match spec.temb_channels {
            Some(t) => Some(nn::linear(t, cout, true, vb.pp("time_emb_proj"))?),
            None => None,
        };
        let conv_shortcut = if cin != cout {
            Some(nn::conv2d(
                cin,
                cout,
                1,
                ConvSpec::POINTWISE,
                vb.pp("conv_shortcut"),
            )?)
        } else {
            None
        };
        Ok(Self {
            norm1: GroupNorm::new(spec.groups, cin, spec.eps, vb.pp("norm1"))?,
            conv1: nn::conv2d(cin, cout, 3, ConvSpec::SAME3, vb.pp("conv1"))?,
            time_emb_proj,
            norm2: GroupNorm::new(spec.groups, cout, spec.eps, vb.pp("norm2"))?,
            conv2: nn::conv2d(cout, cout, 3, ConvSpec::SAME3, vb.pp("conv2"))?,
            conv_shortcut,
            output_scale_factor: spec.output_scale_factor,
        })
    }

    /// `x`: `[B, Cin, H, W]`, `temb`: `[B, T]` -> `[B, Cout, H, W]`.
    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward_silu(x)?)?;
        let h = match (&self.time_emb_proj, temb) {
            (Some(proj), Some(t)) => {
                let t = proj.forward(&t.silu()?)?.unsqueeze(2)?.unsqueeze(3)?;
                h.broadcast_add(&t)?
            }
            _ => h,
        };
        let h = self.conv2.forward(&self.norm2.forward_silu(&h)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(c) => c.forward(x)?,
            None => x.clone(),
        };
        let out = (shortcut + h)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// GEGLU feed-forward (`ff.net.0.proj`, `ff.net.2`) with exact erf GELU, as diffusers.
#[derive(Debug, Clone)]
struct FeedForward {
    proj_in: Linear,
    proj_out: Linear,
}

impl FeedForward {
    fn new(dim: usize, vb: VarBuilder) -> Result<Self> {
        let inner = 4 * dim;
        Ok(Self {
            proj_in: nn::linear(dim, 2 * inner, true, vb.pp("net.0.proj"))?,
            proj_out: nn::linear(inner, dim, true, vb.pp("net.2"))?,
        })
    }

    /// `x`: `[B, T, dim]` -> `[B, T, dim]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.proj_out
            .forward(&nn::geglu(&self.proj_in.forward(x)?)?)
    }
}

/// Shape of a `Transformer2DModel`.
#[derive(Debug, Clone, Copy)]
pub struct TransformerSpec {
    pub channels: usize,
    pub heads: usize,
    pub head_dim: usize,
    pub context_dim: usize,
    pub layers: usize,
    pub groups: usize,
    /// `use_linear_projection`: linear `proj_in`/`proj_out` (SD2) instead of 1x1 convs (SD1.5).
    pub linear_projection: bool,
}

/// diffusers `BasicTransformerBlock`: self-attention, cross-attention, GEGLU, pre-LayerNorm.
#[derive(Debug, Clone)]
struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    fn new(spec: &TransformerSpec, vb: VarBuilder) -> Result<Self> {
        let dim = spec.heads * spec.head_dim;
        let attn = |context_dim, vb| {
            Attention::new(
                AttentionSpec {
                    query_dim: dim,
                    context_dim,
                    heads: spec.heads,
                    head_dim: spec.head_dim,
                    qkv_bias: false,
                },
                vb,
            )
        };
        Ok(Self {
            norm1: LayerNorm::new(dim, 1e-5, vb.pp("norm1"))?,
            attn1: attn(dim, vb.pp("attn1"))?,
            norm2: LayerNorm::new(dim, 1e-5, vb.pp("norm2"))?,
            attn2: attn(spec.context_dim, vb.pp("attn2"))?,
            norm3: LayerNorm::new(dim, 1e-5, vb.pp("norm3"))?,
            ff: FeedForward::new(dim, vb.pp("ff"))?,
        })
    }

    /// `x`: `[B, T, dim]`, `context`: `[B, S, context_dim]` -> `[B, T, dim]`.
    fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let x = (self.attn1.forward(&self.norm1.forward(x)?, None)? + x)?;
        let x = (self
            .attn2
            .forward(&self.norm2.forward(&x)?, Some(context))?
            + &x)?;
        self.ff.forward(&self.norm3.forward(&x)?)? + x
    }
}

/// `proj_in`/`proj_out` of a transformer: 1x1 convolution or linear.
#[derive(Debug, Clone)]
enum Projection {
    Conv(Conv2d),
    Linear(Linear),
}

impl Projection {
    fn new(cin: usize, cout: usize, linear: bool, vb: VarBuilder) -> Result<Self> {
        Ok(if linear {
            Projection::Linear(nn::linear(cin, cout, true, vb)?)
        } else {
            Projection::Conv(nn::conv2d(cin, cout, 1, ConvSpec::POINTWISE, vb)?)
        })
    }
}

/// diffusers `Transformer2DModel` for continuous inputs.
#[derive(Debug, Clone)]
pub struct Transformer2D {
    norm: GroupNorm,
    proj_in: Projection,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Projection,
}

impl Transformer2D {
    pub fn new(spec: TransformerSpec, vb: VarBuilder) -> Result<Self> {
        let inner = spec.heads * spec.head_dim;
        let blocks = (0..spec.layers)
            .map(|i| BasicTransformerBlock::new(&spec, vb.pp(format!("transformer_blocks.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            norm: GroupNorm::new(spec.groups, spec.channels, 1e-6, vb.pp("norm"))?,
            proj_in: Projection::new(
                spec.channels,
                inner,
                spec.linear_projection,
                vb.pp("proj_in"),
            )?,
            blocks,
            proj_out: Projection::new(
                inner,
                spec.channels,
                spec.linear_projection,
                vb.pp("proj_out"),
            )?,
        })
    }

    /// `x`: `[B, C, H, W]`, `context`: `[B, S, context_dim]` -> `[B, C, H, W]`.
    pub fn forward(&self, x: &Tensor, context: &Tensor) -> Result<Tensor> {
        let (b, _, h, w) = x.dims4()?;
        let normed = self.norm.forward(x)?;
        let tokens = match &self.proj_in {
            Projection::Conv(c) => {
                let y = c.forward(&normed)?;
                let inner = y.dim(1)?;
                y.permute((0, 2, 3, 1))?.reshape((b, h * w, inner))?
            }
            Projection::Linear(l) => {
                let c = normed.dim(1)?;
                l.forward(&normed.permute((0, 2, 3, 1))?.reshape((b, h * w, c))?)?
            }
        };
        let mut tokens = tokens;
        for block in &self.blocks {
            tokens = block.forward(&tokens, context)?;
        }
        let inner = tokens.dim(2)?;
        let out = match &self.proj_out {
            Projection::Conv(c) => {
                let y = tokens
                    .reshape((b, h, w, inner))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?;
                c.forward(&y)?
            }
            Projection::Linear(l) => {
                let y = l.forward(&tokens)?;
                let c = y.dim(2)?;
                y.reshape((b, h, w, c))?
                    .permute((0, 3, 1, 2))?
                    .contiguous()?
            }
        };
        out + x
    }
}

/// diffusers `Downsample2D` with a convolution (`conv`): 3x3, stride 2.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// The VAE's variant: pad one zero row/column at the bottom/right, then convolve unpadded.
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(channels: usize, padding: usize, vb: VarBuilder) -> Result<Self> {
        let spec = ConvSpec {
            padding,
            stride: 2,
            bias: true,
        };
        Ok(Self {
            conv: nn::conv2d(channels, channels, 3, spec, vb.pp("conv"))?,
            pad_bottom_right: padding == 0,
        })
    }

    /// `x`: `[B, C, H, W]` -> `[B, C, ceil(H/2), ceil(W/2)]` (padding 1) or the VAE's
    /// asymmetric-padding variant when `padding` is 0.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let x = x.pad_with_zeros(2, 0, 1)?.pad_with_zeros(3, 0, 1)?;
            self.conv.forward(&x)
        } else {
            self.conv.forward(x)
        }
    }
}

/// diffusers `Upsample2D` with a convolution (`conv`): nearest-neighbour upsampling, then 3x3.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(channels: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            conv: nn::conv2d(channels, channels, 3, ConvSpec::SAME3, vb.pp("conv"))?,
        })
    }

    /// `x`: `[B, C, H, W]` -> `[B, C, th, tw]`, where `target` defaults to `(2H, 2W)`.
    pub fn forward(&self, x: &Tensor, target: Option<(usize, usize)>) -> Result<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let (th, tw) = target.unwrap_or((2 * h, 2 * w));
        self.conv.forward(&x.upsample_nearest2d(th, tw)?)
    }
}
