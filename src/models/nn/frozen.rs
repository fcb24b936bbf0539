//! Convolutions and linear layers with FROZEN weights (plain tensors, not `Var`s) applied to an
//! input that tracks gradients: the backward pass returns the input gradient only.
//!
//! candle's own `Conv2D` and `Matmul` backward always builds a gradient for the kernel / rhs too,
//! even when it is a constant; for a frozen SD1.5 member that is a weight-sized tensor per layer
//! use (3.4 GB per member) plus the compute of it. Here the output is computed without a graph
//! (by the caller, on the detached input, so inference kernels apply), then attached to the input
//! through a [`CustomOp1`] that copies it and whose `bwd` is candle's input-gradient formula.
//!
//! (candle's `ParamsConv2D` cannot be built outside candle, so the op cannot call the storage's
//! `conv2d` itself; it copies a precomputed output instead: one transient output-sized copy.)
use std::sync::Mutex;

use candle_core::backend::{BackendDevice, BackendStorage};
use candle_core::{
    CpuStorage, CudaStorage, CustomOp1, Layout, MetalStorage, Result, Shape, Storage, Tensor, bail,
};

/// True when the frozen path applies: `x` tracks gradients and none of `params` does.
pub fn applies(x: &Tensor, params: &[Option<&Tensor>]) -> bool {
    x.track_op() && params.iter().flatten().all(|p| !p.track_op())
}

/// Stride, padding and dilation of a convolution (square, groups 1).
#[derive(Debug, Clone, Copy)]
pub struct ConvParams {
    pub padding: usize,
    pub stride: usize,
    pub dilation: usize,
}

/// Attaches `y = conv2d(x, kernel) (+ bias)`, computed without a graph, to `x`.
///
/// `x`: `[B, I, H, W]` (tracks gradients), `kernel`: `[O, I, k, k]` (constant), `y`:
/// `[B, O, H', W']` (no graph) -> `y` as a tensor whose backward gives `x` the gradient
/// `conv_transpose2d(grad, kernel)`.
pub fn attach_conv2d(x: &Tensor, kernel: &Tensor, y: Tensor, p: ConvParams) -> Result<Tensor> {
    let grad_of = GradOf::Conv2d {
        kernel: kernel.clone(),
        params: p,
    };
    attach(x, y, grad_of)
}

/// Attaches `y = x W^T (+ bias)`, computed without a graph, to `x`.
///
/// `x`: `[..., I]` (tracks gradients), `weight`: `[O, I]` (constant), `y`: `[..., O]` (no graph)
/// -> `y` as a tensor whose backward gives `x` the gradient `grad W`.
pub fn attach_linear(x: &Tensor, weight: &Tensor, y: Tensor) -> Result<Tensor> {
    attach(x, y, GradOf::Linear(weight.clone()))
}

fn attach(x: &Tensor, y: Tensor, grad_of: GradOf) -> Result<Tensor> {
    if y.track_op() {
        bail!("frozen op: the precomputed output must not track gradients");
    }
    x.apply_op1(Attach {
        output: Mutex::new(Some(y)),
        grad_of,
    })
}

/// How the input gradient is computed from the output gradient.
enum GradOf {
    /// Kernel `[O, I, k, k]`.
    Conv2d { kernel: Tensor, params: ConvParams },
    /// Weight `[O, I]`.
    Linear(Tensor),
}

impl GradOf {
    /// `x`: the op's input, `grad`: the output gradient -> the input gradient (shape of `x`).
    fn input_grad(&self, x: &Tensor, grad: &Tensor) -> Result<Tensor> {
        match self {
            GradOf::Conv2d { kernel, params } => {
                let ConvParams {
                    padding,
                    stride,
                    dilation,
                } = *params;
                // candle's Conv2D backward (backprop.rs): conv_transpose2d's output height is
                // (g_h - 1) * stride - 2 * padding + dilation * (k_h - 1) + out_padding + 1.
                let grad_h = grad.dim(2)?;
                let k_h = kernel.dim(2)?;
                let out_size = (grad_h - 1) * stride + dilation * (k_h - 1) + 1 - 2 * padding;
                let out_padding = x.dim(2)? - out_size;
                grad.conv_transpose2d(kernel, padding, out_padding, stride, dilation)
            }
            GradOf::Linear(w) => {
                let o = w.dim(0)?;
                let rows = grad.elem_count() / o.max(1);
                grad.reshape((rows, o))?.matmul(w)?.reshape(x.shape())
            }
        }
    }
}

/// Identity on a precomputed output (taken on the forward, so the graph does not keep a second
/// copy), with the backward of [`GradOf`] for the input only.
struct Attach {
    output: Mutex<Option<Tensor>>,
    grad_of: GradOf,
}

impl Attach {
    fn take_output(&self) -> Result<Tensor> {
        let taken = self.output.lock().map(|mut o| o.take());
        match taken {
            Ok(Some(y)) => Ok(y),
            _ => bail!("frozen op: output already taken"),
        }
    }
}

/// A fresh contiguous copy of the storage `s` seen through `l`.
fn copy_out<S>(s: &S, l: &Layout) -> Result<(S, Shape)>
where
    S: BackendStorage,
    S::Device: BackendDevice<Storage = S>,
{
    let mut dst = s.device().zeros_impl(l.shape(), s.dtype())?;
    s.copy_strided_src(&mut dst, 0, l)?;
    Ok((dst, l.shape().clone()))
}

impl CustomOp1 for Attach {
    fn name(&self) -> &'static str {
        "afa-frozen-weight"
    }

    fn cpu_fwd(&self, _: &CpuStorage, _: &Layout) -> Result<(CpuStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cpu(s) => copy_out(s, layout),
            _ => bail!("frozen op: output on another device than the input"),
        }
    }

    fn cuda_fwd(&self, _: &CudaStorage, _: &Layout) -> Result<(CudaStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Cuda(s) => copy_out(s, layout),
            _ => bail!("frozen op: output on another device than the input"),
        }
    }

    fn metal_fwd(&self, _: &MetalStorage, _: &Layout) -> Result<(MetalStorage, Shape)> {
        let y = self.take_output()?;
        let (storage, layout) = y.storage_and_layout();
        match &*storage {
            Storage::Metal(s) => copy_out(s, layout),
            _ => bail!("frozen op: output on another device than the input"),
        }
    }

    fn bwd(&self, arg: &Tensor, _res: &Tensor, grad: &Tensor) -> Result<Option<Tensor>> {
        Ok(Some(self.grad_of.input_grad(arg, grad)?))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Var};

    use super::*;

    fn randn(dims: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, dims, &Device::Cpu)
    }

    fn max_rel_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        let diff = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
        Ok(diff / scale.max(1e-6))
    }

    /// Checks output and input gradient of `frozen` against candle's plain op `plain` for `x`,
    /// with a random output weighting so every output element matters.
    fn check(
        x: &Tensor,
        plain: impl Fn(&Tensor) -> Result<Tensor>,
        frozen: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<()> {
        let xv = Var::from_tensor(x)?;
        let want = plain(xv.as_tensor())?;
        let mix = randn(want.dims())?;
        let want_grad = (&want * &mix)?.sum_all()?.backward()?;
        let got = frozen(xv.as_tensor())?;
        assert!(got.track_op());
        assert_eq!(got.dims(), want.dims());
        assert!(max_rel_diff(&got, &want)? < 1e-5);
        let grads = (&got * &mix)?.sum_all()?.backward()?;
        let (g, w) = (grads.get(&xv).unwrap(), want_grad.get(&xv).unwrap());
        assert_eq!(g.dims(), x.dims());
        assert!(max_rel_diff(g, w)? < 1e-5, "input gradient differs");
        Ok(())
    }

    /// Sizes where height and width need the same `out_padding`: candle's formula (mirrored
    /// here) derives it from the height only.
    #[test]
    fn conv_input_gradient_matches_candle() -> Result<()> {
        for (k, stride, padding, (h, w)) in [
            (3, 1, 1, (8, 6)),
            (3, 2, 1, (8, 8)),
            (3, 2, 1, (9, 7)),
            (3, 2, 1, (8, 6)),
            (3, 2, 0, (9, 7)),
            (3, 2, 0, (10, 8)),
            (1, 1, 0, (5, 5)),
            (3, 1, 0, (6, 7)),
        ] {
            let x = randn(&[2, 3, h, w])?;
            let kernel = randn(&[4, 3, k, k])?;
            let bias = randn(&[4])?;
            let p = ConvParams {
                padding,
                stride,
                dilation: 1,
            };
            let plain = |x: &Tensor| {
                x.conv2d(&kernel, padding, stride, 1, 1)?
                    .broadcast_add(&bias.reshape((1, 4, 1, 1))?)
            };
            let frozen = |x: &Tensor| attach_conv2d(x, &kernel, plain(&x.detach())?, p);
            check(&x, plain, frozen)?;
        }
        Ok(())
    }

    #[test]
    fn linear_input_gradient_matches_candle() -> Result<()> {
        let weight = randn(&[5, 7])?;
        let layer = candle_nn::Linear::new(weight.clone(), Some(randn(&[5])?));
        for dims in [&[3, 7][..], &[2, 4, 7][..]] {
            let x = randn(dims)?;
            let plain = |x: &Tensor| layer.forward(x);
            let frozen = |x: &Tensor| attach_linear(x, &weight, layer.forward(&x.detach())?);
            check(&x, plain, frozen)?;
        }
        Ok(())
    }

    #[test]
    fn applies_only_to_tracked_inputs_and_constant_weights() -> Result<()> {
        let x = randn(&[2, 3])?;
        let xv = Var::from_tensor(&x)?;
        let w = randn(&[3, 3])?;
        let wv = Var::from_tensor(&w)?;
        assert!(applies(xv.as_tensor(), &[Some(&w), None]));
        assert!(!applies(&x, &[Some(&w)]));
        assert!(!applies(xv.as_tensor(), &[Some(&w), Some(wv.as_tensor())]));
        Ok(())
    }
}
