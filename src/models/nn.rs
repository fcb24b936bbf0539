//! Small building blocks shared by every network (CLIP, VAE, UNet, aggregators): convolutions,
//! linear layers, group/layer norm, and multi-head attention.
//!
//! Everything here is built from candle operations whose backward pass is correct, choosing the
//! fused (faster, no-gradient) kernels only when the input does not track gradients, so the same
//! modules serve inference and training. The fused CPU kernels (im2col convolution, group norm
//! with SiLU, GEGLU) live in `fast`; they run only for f32 CPU tensors that track no gradient.
//! Convolutions and linear layers whose weights are constants (frozen members) but whose input
//! tracks gradients go through `frozen`, whose backward computes the input gradient only.
//! Which attention path runs, and the sliced path's budget per device, is `sdpa`'s.
use candle_core::{D, DType, Module, Result, Tensor};
use candle_nn::{Conv2dConfig, VarBuilder};

mod fast;
mod flash;
mod frozen;
#[cfg(feature = "flash-attn")]
mod gpu_flash;
mod sdpa;

pub use sdpa::{scaled_dot_product_attention, sliced_attention};

/// A `k x k` convolution with `padding` and `stride` (diffusers names `weight`, `bias`).
pub fn conv2d(
    in_channels: usize,
    out_channels: usize,
    kernel: usize,
    spec: ConvSpec,
    vb: VarBuilder,
) -> Result<Conv2d> {
    let cfg = Conv2dConfig {
        padding: spec.padding,
        stride: spec.stride,
        ..Default::default()
    };
    let inner = if spec.bias {
        candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb)?
    } else {
        candle_nn::conv2d_no_bias(in_channels, out_channels, kernel, cfg, vb)?
    };
    Ok(Conv2d {
        inner,
        spec,
        kernel,
    })
}

/// A 2-D convolution (`weight` `[O, I, k, k]`, optional `bias` `[O]`). On the CPU in f32
/// without gradients it runs as im2col + one matmul per image (see `fast`); with constant
/// weights and an input that tracks gradients, it runs that way on the detached input and is
/// differentiated for the input only (see `frozen`); otherwise it is candle's `conv2d`.
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    spec: ConvSpec,
    kernel: usize,
}

impl Conv2d {
    /// The weight `[O, I, k, k]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[O]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Conv2d {
    /// `x`: `[B, I, H, W]` -> `[B, O, H', W']`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        if frozen::applies(x, &[Some(w), self.inner.bias()]) {
            let y = self.forward(&x.detach())?;
            let params = frozen::ConvParams {
                padding: self.spec.padding,
                stride: self.spec.stride,
                dilation: 1,
            };
            return frozen::attach_conv2d(x, w, y, params);
        }
        if !fast::applies(x) || w.track_op() || w.dtype() != DType::F32 {
            return self.inner.forward(x);
        }
        let geometry = fast::ConvGeometry {
            kernel: self.kernel,
            stride: self.spec.stride,
            padding: self.spec.padding,
        };
        fast::conv2d(x, w, self.inner.bias(), geometry)
    }
}

/// Padding, stride and bias of a convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvSpec {
    pub padding: usize,
    pub stride: usize,
    pub bias: bool,
}

impl ConvSpec {
    /// `padding` 1, stride 1, with bias: the 3x3 "same" convolution.
    pub const SAME3: ConvSpec = ConvSpec {
        padding: 1,
        stride: 1,
        bias: true,
    };
    /// A 1x1 convolution with bias.
    pub const POINTWISE: ConvSpec = ConvSpec {
        padding: 0,
        stride: 1,
        bias: true,
    };
}

/// A linear layer with or without bias (diffusers names `weight`, `bias`).
pub fn linear(in_dim: usize, out_dim: usize, bias: bool, vb: VarBuilder) -> Result<Linear> {
    let inner = if bias {
        candle_nn::linear(in_dim, out_dim, vb)?
    } else {
        candle_nn::linear_no_bias(in_dim, out_dim, vb)?
    };
    Ok(Linear {
        inner: with_gemm_friendly_weight(inner)?,
    })
}

/// A constant CPU weight `[O, I]` stored column-major (an `[I, O]` buffer seen through a
/// transpose), so `x @ W^T` hands the gemm a row-major right-hand side. With the row-major
/// `[O, I]` buffer the gemm reads the right-hand side with a stride of `I` floats, which for
/// few rows (CLIP's 77 tokens) and long rows (an MLP's down projection, `I` = 3072) was 1.3-3x
/// slower (BENCHMARKS.md, text encoder). Same values, same summation order per output, so the
/// results do not change; trained variables (`Var`s) keep their layout, since a copy would
/// cut them off from their optimiser.
fn with_gemm_friendly_weight(linear: candle_nn::Linear) -> Result<candle_nn::Linear> {
    let weight = linear.weight();
    if weight.is_variable() || !weight.device().is_cpu() {
        return Ok(linear);
    }
    let column_major = weight.t()?.contiguous()?.t()?;
    Ok(candle_nn::Linear::new(column_major, linear.bias().cloned()))
}

/// A linear layer (`weight` `[O, I]`, optional `bias` `[O]`): candle's `Linear`, except that
/// with constant weights and an input that tracks gradients it is differentiated for the input
/// only (see `frozen`).
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// The weight `[O, I]`.
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias `[O]`, if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Linear {
    /// `x`: `[..., I]` -> `[..., O]`, batch-invariant: every sample (the leading dimension; a
    /// row for 2-D inputs) is its own matrix product, so the matrix shapes (and with them the
    /// CPU gemm's kernel choice and summation order) never depend on how many samples share the
    /// call. candle's `Linear` folds the batch into the rows of one product instead, which
    /// changes results in the last bits with the batch size.
    fn per_sample(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims();
        if dims.len() < 2 || dims[0] == 1 {
            return self.inner.forward(x);
        }
        let samples: Vec<Tensor> = (0..dims[0])
            .map(|s| self.inner.forward(&x.narrow(0, s, 1)?))
            .collect::<Result<_>>()?;
        Tensor::cat(&samples, 0)
    }
}

impl Module for Linear {
    /// `x`: `[B, ..., I]` -> `[B, ..., O]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let w = self.inner.weight();
        if frozen::applies(x, &[Some(w), self.inner.bias()]) {
            let y = self.per_sample(&x.detach())?;
            return frozen::attach_linear(x, w, y);
        }
        self.per_sample(x)
    }
}

/// Group normalisation over `[B, C, ...]` (diffusers `nn.GroupNorm`, affine).
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(groups: usize, channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self {
            inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// `x`: `[B, C, *]` -> same shape.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, false)
    }

    /// `silu(group_norm(x))`, fused on the CPU. `x`: `[B, C, *]` -> same shape.
    pub fn forward_silu(&self, x: &Tensor) -> Result<Tensor> {
        self.forward_act(x, true)
    }

    fn forward_act(&self, x: &Tensor, silu: bool) -> Result<Tensor> {
        let (w, b) = (&self.weight, &self.bias);
        if fast::applies(x) && !w.track_op() && !b.track_op() && w.dtype() == DType::F32 {
            return fast::group_norm(x, w, b, self.groups, self.eps, silu);
        }
        let y = self.inner.forward(x)?;
        if silu { y.silu() } else { Ok(y) }
    }
}

/// Layer normalisation over the last dimension (affine, with bias).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f32,
}

impl LayerNorm {
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get(dim, "weight")?,
            bias: vb.get(dim, "bias")?,
            eps: eps as f32,
        })
    }

    /// `x`: `[..., dim]` -> same shape. Fused kernel for inference, differentiable ops when
    /// gradients are tracked.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if x.track_op() || self.weight.track_op() {
            candle_nn::ops::layer_norm_slow(x, &self.weight, &self.bias, self.eps)
        } else {
            candle_nn::ops::layer_norm(&x.contiguous()?, &self.weight, &self.bias, self.eps)
        }
    }
}

/// Softmax over the last dimension: fused kernel for inference, differentiable ops otherwise.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    scaled_softmax_last_dim(x, 1.0)
}

/// `softmax(scale * x)` over the last dimension (`scale > 0`), fused on the CPU.
fn scaled_softmax_last_dim(x: &Tensor, scale: f64) -> Result<Tensor> {
    if fast::applies(x) {
        fast::softmax(x, scale as f32)
    } else if x.track_op() {
        candle_nn::ops::softmax(&(x * scale)?, D::Minus1)
    } else {
        candle_nn::ops::softmax_last_dim(&(x * scale)?)
    }
}

/// GEGLU with exact erf GELU (diffusers `GEGLU`): `h` `[..., 2n]` -> `h[..., :n] *
/// gelu(h[..., n:])` `[..., n]`; one fused pass on the CPU when no gradient is tracked.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    if fast::applies(h) {
        return fast::geglu(h);
    }
    let n = h.dim(D::Minus1)? / 2;
    let value = h.narrow(D::Minus1, 0, n)?;
    let gate = h.narrow(D::Minus1, n, n)?;
    value * gate.gelu_erf()?
}

/// Multi-head attention as diffusers' `Attention` (`to_q`, `to_k`, `to_v` without bias unless
/// asked, `to_out.0` with bias), also used for CLIP-style names through `AttentionNames`.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    scale: f64,
}

/// Shape of an attention layer.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSpec {
    /// Query (and output) width.
    pub query_dim: usize,
    /// Key/value input width (the text width for cross-attention).
    pub context_dim: usize,
    pub heads: usize,
    pub head_dim: usize,
    /// Whether q/k/v projections have a bias.
    pub qkv_bias: bool,
}

impl Attention {
    /// Diffusers layout: `to_q`, `to_k`, `to_v`, `to_out.0`.
    pub fn new(spec: AttentionSpec, vb: VarBuilder) -> Result<Self> {
        let inner = spec.heads * spec.head_dim;
        Ok(Self {
            to_q: linear(spec.query_dim, inner, spec.qkv_bias, vb.pp("to_q"))?,
            to_k: linear(spec.context_dim, inner, spec.qkv_bias, vb.pp("to_k"))?,
            to_v: linear(spec.context_dim, inner, spec.qkv_bias, vb.pp("to_v"))?,
            to_out: linear(inner, spec.query_dim, true, vb.pp("to_out").pp("0"))?,
            heads: spec.heads,
            scale: 1.0 / (spec.head_dim as f64).sqrt(),
        })
    }

    /// `x`: `[B, T, query_dim]`, `context`: `[B, S, context_dim]` (self-attention when `None`)
    /// -> `[B, T, query_dim]`.
    pub fn forward(&self, x: &Tensor, context: Option<&Tensor>) -> Result<Tensor> {
        // candle 0.11 CPU: a batched matmul of a transposed view with a broadcast weight is
        // wrong for B > 1, so linear layers only ever see contiguous inputs.
        let x = &x.contiguous()?;
        let context = &context.unwrap_or(x).contiguous()?;
        let q = split_heads(&self.to_q.forward(x)?, self.heads)?;
        let k = split_heads(&self.to_k.forward(context)?, self.heads)?;
        let v = split_heads(&self.to_v.forward(context)?, self.heads)?;
        let out = scaled_dot_product_attention(&q, &k, &v, self.scale)?;
        self.to_out.forward(&merge_heads(&out)?)
    }
}

/// `[B, T, H*d]` -> `[B, H, T, d]`.
pub fn split_heads(x: &Tensor, heads: usize) -> Result<Tensor> {
    let (b, t, c) = x.dims3()?;
    x.reshape((b, t, heads, c / heads))?.transpose(1, 2)
}

/// `[B, H, T, d]` -> `[B, T, H*d]`.
pub fn merge_heads(x: &Tensor) -> Result<Tensor> {
    let (b, h, t, d) = x.dims4()?;
    x.transpose(1, 2)?.reshape((b, t, h * d))
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};

    use super::sdpa::{
        ATTENTION_SCORE_BUDGET, attention_within, budget_from_free_memory, score_budget,
    };
    use super::*;

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// A sample's attention and linear outputs are the same bits alone or in any batch, sliced
    /// or not (the slicing depends on the per-sample shape only).
    #[test]
    fn constant_linear_weights_are_stored_for_the_gemm_and_give_the_same_bits() -> Result<()> {
        let dev = &Device::Cpu;
        let (w, b) = (
            Tensor::randn(0f32, 1.0, (48, 3072), dev)?,
            Tensor::randn(0f32, 1.0, 48, dev)?,
        );
        let tensors = [
            ("weight".to_string(), w.clone()),
            ("bias".to_string(), b.clone()),
        ];
        let vb = VarBuilder::from_tensors(tensors.into_iter().collect(), DType::F32, dev);
        let lin = linear(3072, 48, true, vb)?;
        // Seen as [O, I], stored as [I, O]: the transpose the gemm multiplies by is row-major.
        assert_eq!(lin.weight().dims(), &[48, 3072]);
        assert_eq!(lin.weight().stride(), &[1, 48]);
        let x = Tensor::randn(0f32, 1.0, (1, 77, 3072), dev)?;
        let plain = candle_nn::Linear::new(w, Some(b)).forward(&x)?;
        assert_eq!(bits(&lin.forward(&x)?), bits(&plain));
        // A trained variable keeps its tensor, so the optimiser still updates what runs.
        let vars = candle_nn::VarMap::new();
        let vb = VarBuilder::from_varmap(&vars, DType::F32, dev);
        let trained = linear(16, 8, true, vb)?;
        assert!(trained.weight().is_variable());
        assert_eq!(trained.weight().stride(), &[16, 1]);
        Ok(())
    }

    #[test]
    fn attention_and_linear_are_batch_invariant() -> Result<()> {
        let dev = &Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (3, 2, 37, 8), dev)?;
        let k = Tensor::randn(0f32, 1.0, (3, 2, 21, 8), dev)?;
        let one = |t: &Tensor| t.narrow(0, 1, 1);
        for budget in [1 << 24, 2 * 21 * 37 * 2, 2 * 21 * 5, 1] {
            let alone = attention_within(&one(&q)?, &one(&k)?, &one(&k)?, 0.3, budget)?;
            let batch = attention_within(&q, &k, &k, 0.3, budget)?;
            assert_eq!(bits(&alone), bits(&one(&batch)?), "budget {budget}");
            let whole = attention_within(&q, &k, &k, 0.3, 1 << 24)?;
            assert!(max_diff(&batch, &whole)? < 1e-6, "budget {budget}");
        }
        let vb = VarBuilder::from_tensors(
            [(
                "weight".to_string(),
                Tensor::randn(0f32, 1.0, (16, 16), dev)?,
            )]
            .into_iter()
            .collect(),
            DType::F32,
            dev,
        );
        let lin = linear(16, 16, false, vb)?;
        // Small shapes are where the CPU gemm picks kernels by the row count.
        let x = Tensor::randn(0f32, 1.0, (3, 16, 16), dev)?;
        assert_eq!(
            bits(&lin.forward(&one(&x)?)?),
            bits(&one(&lin.forward(&x)?)?)
        );
        let rows = Tensor::randn(0f32, 1.0, (5, 16), dev)?;
        assert_eq!(
            bits(&lin.forward(&one(&rows)?)?),
            bits(&one(&lin.forward(&rows)?)?)
        );
        Ok(())
    }

    /// The CPU keeps its constant budget (bit-identical results); a GPU's budget follows its
    /// free memory and is never below the CPU's.
    #[test]
    fn score_budget_is_constant_on_the_cpu_and_follows_free_gpu_memory() {
        assert_eq!(score_budget(&Device::Cpu), ATTENTION_SCORE_BUDGET);
        assert_eq!(budget_from_free_memory(0), ATTENTION_SCORE_BUDGET);
        // 100 GiB free: SD1.5's 4096x4096 self-attention, 8 heads, batch 8 (4 images with
        // CFG), fits unsliced.
        let big = budget_from_free_memory(100 << 30);
        assert!(big >= 8 * 8 * 4096 * 4096, "{big}");
        assert!(budget_from_free_memory(200 << 30) > big);
    }

    /// The modules' frozen path (constant weights, tracked input) gives the same output and
    /// input gradient as candle's plain modules.
    #[test]
    fn frozen_modules_match_candle() -> Result<()> {
        let dev = &Device::Cpu;
        let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 8, 8), dev)?)?;
        let vb = VarBuilder::from_tensors(
            [
                ("c.weight", Tensor::randn(0f32, 1.0, (4, 3, 3, 3), dev)?),
                ("c.bias", Tensor::randn(0f32, 1.0, 4, dev)?),
                ("l.weight", Tensor::randn(0f32, 1.0, (5, 8), dev)?),
                ("l.bias", Tensor::randn(0f32, 1.0, 5, dev)?),
            ]
            .into_iter()
            .map(|(k, v)| (k.to_string(), v))
            .collect(),
            DType::F32,
            dev,
        );
        let spec = ConvSpec {
            padding: 1,
            stride: 2,
            bias: true,
        };
        let conv = conv2d(3, 4, 3, spec, vb.pp("c"))?;
        let lin = linear(8, 5, true, vb.pp("l"))?;
        let ours = |x: &Tensor| -> Result<Tensor> {
            let y = conv.forward(x)?.reshape((2, 4 * 4, 4))?.repeat((1, 1, 2))?;
            lin.forward(&y)
        };
        let plain = |x: &Tensor| -> Result<Tensor> {
            let y = conv.inner.forward(x)?.reshape((2, 4 * 4, 4))?;
            lin.inner.forward(&y.repeat((1, 1, 2))?)
        };
        let (got, want) = (ours(&x)?, plain(&x)?);
        assert!(max_diff(&got, &want)? < 1e-4);
        let got_grad = got.sqr()?.sum_all()?.backward()?;
        let want_grad = want.sqr()?.sum_all()?.backward()?;
        let (g, w) = (got_grad.get(&x).unwrap(), want_grad.get(&x).unwrap());
        assert!(max_diff(g, w)? < 1e-3);
        // No gradient is stored for the constant weights.
        assert!(got_grad.get(conv.weight()).is_none());
        assert!(want_grad.get(conv.weight()).is_some());
        Ok(())
    }
}
