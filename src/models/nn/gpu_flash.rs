//! Flash attention on NVIDIA GPUs (the `flash-attn` feature): candle's `candle-flash-attn`
//! kernels (FlashAttention-2, sm80 and newer, f16/bf16), used for inference only, in place of
//! the sliced composed path. No score matrix is ever written, so the UNet's 4096-token
//! self-attention at 512 px and the aggregators' attention need no slicing whatever the GPU's
//! free memory. Everything the kernels cannot take (f32, a head size that is not a multiple of
//! 8 or above 512, an input that tracks gradients, a GPU older than sm80) keeps the sliced path.
use std::sync::OnceLock;

use candle_core::{DType, Device, Result, Tensor};

use super::sdpa::{PerGpu, once_per_gpu};

/// The largest head size candle-flash-attn takes (its `flash_attn` refuses more, and head
/// sizes that are not multiples of 8); SD1.5 uses 40, 80 and 160, the aggregators 16.
const MAX_HEAD_SIZE: usize = 512;

/// Whether the kernels can take `q`, `k`, `v` (`[B, H, T, d]`).
pub fn applies(q: &Tensor, k: &Tensor, v: &Tensor) -> bool {
    let head_size = q.dims().last().copied().unwrap_or(0);
    let half = matches!(q.dtype(), DType::F16 | DType::BF16);
    half && q.rank() == 4
        && head_size.is_multiple_of(8)
        && head_size <= MAX_HEAD_SIZE
        && k.dtype() == q.dtype()
        && v.dtype() == q.dtype()
        && !(q.track_op() || k.track_op() || v.track_op())
        && is_sm80_or_newer(q.device())
}

/// `q`: `[B, H, Tq, d]`, `k`, `v`: `[B, H, Tk, d]` -> `[B, H, Tq, d]` (a transposed view),
/// softmax of `scale * q k^T` over the keys, no mask. `q`, `k`, `v` from `split_heads` are
/// views of `[B, T, H, d]` buffers, so turning them back costs no copy.
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    // The kernels take `[B, T, H, d]` with a contiguous last dimension.
    let seq_major = |t: &Tensor| t.transpose(1, 2)?.contiguous();
    let out = candle_flash_attn::flash_attn(
        &seq_major(q)?,
        &seq_major(k)?,
        &seq_major(v)?,
        scale as f32,
        false,
    )?;
    // A view: `merge_heads` transposes it back, so the kernel's `[B, T, H, d]` output is
    // reshaped to `[B, T, H*d]` without a copy.
    out.transpose(1, 2)
}

/// Whether `device` is a CUDA GPU of compute capability 8.0 or newer, asked of the driver once
/// per GPU.
fn is_sm80_or_newer(device: &Device) -> bool {
    static CAPABLE: PerGpu<bool> = OnceLock::new();
    once_per_gpu(&CAPABLE, device, || {
        device
            .as_cuda_device()
            .ok()
            .and_then(|cuda| cuda.cuda_stream().context().compute_capability().ok())
            .is_some_and(|(major, _minor)| major >= 8)
    })
    .unwrap_or(false)
}
