//! Scaled dot-product attention: which path runs (the fused CPU kernel of `flash`,
//! FlashAttention-2 on a GPU with the `flash-attn` feature, else the sliced composed path), and
//! how many scores the sliced path may hold at once on each device.
use std::collections::HashMap;
use std::sync::{Mutex, OnceLock};

use candle_core::{DType, Device, Result, Tensor};

#[cfg(feature = "flash-attn")]
use super::gpu_flash;
use super::{fast, flash, scaled_softmax_last_dim};

/// Upper bound on the number of attention scores materialised at once, per sample, on the CPU
/// (and the least any device gets).
pub(super) const ATTENTION_SCORE_BUDGET: usize = 1 << 24;

/// Bytes one attention score may cost while it exists: the f32 scores, their softmax, and the
/// half-precision copies on either side of the f32 softmax, with room to spare.
const BYTES_PER_SCORE: usize = 16;

/// The share of a GPU's free memory (at its first attention call) that scores may use.
const FREE_MEMORY_SHARE: usize = 4;

/// The score budget of an accelerator with `free` bytes free: a quarter of them at
/// [`BYTES_PER_SCORE`], never below the CPU budget.
pub(super) fn budget_from_free_memory(free: usize) -> usize {
    (free / FREE_MEMORY_SHARE / BYTES_PER_SCORE).max(ATTENTION_SCORE_BUDGET)
}

/// The score budget on `device`: the CPU constant on the CPU (its results are bit-identical
/// whatever the machine); on CUDA chosen once per GPU from its free memory at the first
/// attention call (weights already resident), so SD1.5 at 512 px runs its 4096-token
/// self-attention unsliced on a large GPU and sliced on a small one.
pub(super) fn score_budget(device: &Device) -> usize {
    static BUDGETS: PerGpu<usize> = OnceLock::new();
    once_per_gpu(&BUDGETS, device, || {
        free_memory(device).map_or(ATTENTION_SCORE_BUDGET, budget_from_free_memory)
    })
    .unwrap_or(ATTENTION_SCORE_BUDGET)
}

/// Values asked of each GPU once, by its index.
pub(super) type PerGpu<T> = OnceLock<Mutex<HashMap<usize, T>>>;

/// The value `ask` gives for `device`, asked once per GPU and kept in `cache`; `None` when
/// `device` is not a CUDA GPU.
pub(super) fn once_per_gpu<T: Copy>(
    cache: &'static PerGpu<T>,
    device: &Device,
    ask: impl FnOnce() -> T,
) -> Option<T> {
    let candle_core::DeviceLocation::Cuda { gpu_id } = device.location() else {
        return None;
    };
    let mut values = cache
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner());
    Some(*values.entry(gpu_id).or_insert_with(ask))
}

/// Free memory of a CUDA device in bytes (None elsewhere or when the driver cannot tell).
#[cfg(feature = "cuda")]
fn free_memory(device: &Device) -> Option<usize> {
    let cuda = device.as_cuda_device().ok()?;
    let (free, _total) = cuda.cuda_stream().context().mem_get_info().ok()?;
    Some(free)
}

#[cfg(not(feature = "cuda"))]
fn free_memory(_device: &Device) -> Option<usize> {
    None
}

/// Scaled dot-product attention over heads. On the CPU in f32 without gradients (inference,
/// and the frozen members while training) it is the fused kernel of `flash.rs` (no score
/// matrix in memory); built with the `flash-attn` feature, on an sm80+ GPU in f16/bf16 without
/// gradients it is FlashAttention-2 (`gpu_flash.rs`). Otherwise, for long sequences (more scores than the device's
/// budget, see `score_budget`) it runs one sample at a time,
/// in slices of queries, so that the score matrix of all heads is never allocated at once. The
/// slicing depends on the per-sample shape only, never on the batch size, so a sample's result
/// is the same bits whatever else shares the batch.
///
/// `q`: `[B, H, Tq, d]`, `k`, `v`: `[B, H, Tk, d]` -> `[B, H, Tq, d]`.
pub fn scaled_dot_product_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
) -> Result<Tensor> {
    if fast::applies(q) && fast::applies(k) && fast::applies(v) {
        return flash::attention(q, k, v, scale);
    }
    #[cfg(feature = "flash-attn")]
    if gpu_flash::applies(q, k, v) {
        return gpu_flash::attention(q, k, v, scale);
    }
    sliced_attention(q, k, v, scale)
}

/// The composed path of [`scaled_dot_product_attention`] (matmul, softmax, matmul; sliced by
/// the device's score budget) whatever the device and dtype: what the fused CPU kernel is
/// measured against (`afa bench --parts attention`).
pub fn sliced_attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_within(q, k, v, scale, score_budget(q.device()))
}

/// `scaled_dot_product_attention` with at most `budget` scores per sample at once.
pub(super) fn attention_within(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    budget: usize,
) -> Result<Tensor> {
    let (b, h, tq, _) = q.dims4()?;
    let tk = k.dim(2)?;
    let kt = k.transpose(2, 3)?.contiguous()?;
    let v = v.contiguous()?;
    let rows_per_slice = (budget / (h * tk).max(1)).clamp(1, tq);
    let attend = |q: &Tensor, kt: &Tensor, v: &Tensor| -> Result<Tensor> {
        let scores = q.matmul(kt)?;
        let scores = if scores.dtype() == DType::F32 || scores.dtype() == DType::F64 {
            scaled_softmax_last_dim(&scores, scale)?
        } else {
            // Half precision: softmax in f32 as PyTorch's SDPA does.
            scaled_softmax_last_dim(&scores.to_dtype(DType::F32)?, scale)?
                .to_dtype(scores.dtype())?
        };
        scores.matmul(v)
    };
    if rows_per_slice >= tq && b * h * tk * tq <= budget {
        return attend(&q.contiguous()?, &kt, &v);
    }
    let mut samples = Vec::with_capacity(b);
    for s in 0..b {
        let (kt, v) = (kt.narrow(0, s, 1)?, v.narrow(0, s, 1)?);
        let mut outs = Vec::with_capacity(tq.div_ceil(rows_per_slice));
        let mut start = 0;
        while start < tq {
            let len = rows_per_slice.min(tq - start);
            let q = q.narrow(0, s, 1)?.narrow(2, start, len)?.contiguous()?;
            outs.push(attend(&q, &kt, &v)?);
            start += len;
        }
        samples.push(Tensor::cat(&outs, 2)?);
    }
    Tensor::cat(&samples, 0)
}
