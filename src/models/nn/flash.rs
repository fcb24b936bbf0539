//! Fused scaled-dot-product attention for the CPU (f32, inference: no gradient), the
//! flash-attention recipe: for each sample and head, a block of [`QUERY_BLOCK`] queries meets
//! the keys [`KEY_BLOCK`] at a time; the block's scores (`scale * Q K^T`, by the gemm candle
//! uses), their exponentials and the running softmax (max, sum) live in a buffer that stays in
//! cache, the output block accumulates `P V` (rescaled whenever the running max grows) and is
//! divided by the sum at the end. No score matrix is ever written to memory, and no pass reads
//! one back. Parallel over (sample, head, query block) on candle's rayon pool; each output row
//! depends on its own sample only and the blocking on the sequence lengths only, so a sample's
//! result is the same bits alone or in any batch.
use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor, bail};
use gemm::Parallelism;
use rayon::prelude::*;

use super::fast::{f32_data, fast_exp};

/// Queries per block: one block's output rows and running statistics.
const QUERY_BLOCK: usize = 128;
/// Keys per block: a `QUERY_BLOCK x KEY_BLOCK` score buffer (256 KiB) stays in L2 (measured
/// against 64 x 256, 64 x 1024 and 256 x 1024 with `afa bench --parts attention`).
const KEY_BLOCK: usize = 512;

/// `softmax(scale * q k^T) v` per sample and head: `q`: `[B, H, Tq, d]`, `k`, `v`:
/// `[B, H, Tk, d]` -> `[B, H, Tq, d]` (f32 on the CPU, no gradient: see `fast::applies`).
pub fn attention(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    q.contiguous()?.apply_op3_no_bwd(
        &k.contiguous()?,
        &v.contiguous()?,
        &FlashAttention(scale as f32),
    )
}

struct FlashAttention(f32);

impl CustomOp3 for FlashAttention {
    fn name(&self) -> &'static str {
        "afa-flash-attention"
    }

    fn cpu_fwd(
        &self,
        qs: &CpuStorage,
        ql: &Layout,
        ks: &CpuStorage,
        kl: &Layout,
        vs: &CpuStorage,
        vl: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (q, k, v) = (
            f32_data(qs, ql, "attention q")?,
            f32_data(ks, kl, "attention k")?,
            f32_data(vs, vl, "attention v")?,
        );
        let (b, h, tq, d) = ql.shape().dims4()?;
        let (kb, kh, tk, kd) = kl.shape().dims4()?;
        if (kb, kh, kd) != (b, h, d) || vl.shape() != kl.shape() || tk == 0 || d == 0 {
            bail!(
                "attention: q {:?}, k {:?}, v {:?} do not fit",
                ql.shape(),
                kl.shape(),
                vl.shape()
            );
        }
        let mut out = vec![0f32; b * h * tq * d];
        let scale = self.0;
        out.par_chunks_mut(tq * d)
            .enumerate()
            .for_each(|(head, out)| {
                let q = &q[head * tq * d..(head + 1) * tq * d];
                let k = &k[head * tk * d..(head + 1) * tk * d];
                let v = &v[head * tk * d..(head + 1) * tk * d];
                out.par_chunks_mut(QUERY_BLOCK * d)
                    .enumerate()
                    .for_each(|(block, out)| {
                        let start = block * QUERY_BLOCK * d;
                        let q = &q[start..start + out.len()];
                        attend_block(q, (k, v), d, scale, out);
                    });
            });
        Ok((CpuStorage::F32(out), ql.shape().clone()))
    }
}

/// One query block: `q` `[rows, d]` against all of `k`, `v` (`[tk, d]` each) into `out`
/// `[rows, d]`.
fn attend_block(q: &[f32], (k, v): (&[f32], &[f32]), d: usize, scale: f32, out: &mut [f32]) {
    let rows = q.len() / d;
    let tk = k.len() / d;
    let mut scores = vec![0f32; rows * KEY_BLOCK];
    let mut max = vec![f32::NEG_INFINITY; rows];
    let mut sum = vec![0f32; rows];
    let mut j0 = 0;
    while j0 < tk {
        let keys = KEY_BLOCK.min(tk - j0);
        let s = &mut scores[..rows * keys];
        // s [rows, keys] = scale * q [rows, d] . k[j0..j0+keys]^T.
        // SAFETY: the strides describe `q` (row-major [rows, d]), the key block read as its
        // transpose (column j is key j0 + j, `d` apart) and `s` (row-major [rows, keys]); every
        // index stays inside those slices.
        unsafe {
            gemm::gemm(
                rows,
                keys,
                d,
                s.as_mut_ptr(),
                1,
                keys as isize,
                false,
                q.as_ptr(),
                1,
                d as isize,
                k[j0 * d..].as_ptr(),
                d as isize,
                1,
                0.0,
                scale,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        // Compiled for the CPU's widest vectors (AVX-512, else AVX2): the exponentials are
        // half of this kernel's time. The same operations in the same order at every width.
        pulp::Arch::new().dispatch(SoftmaxStep {
            scores: s,
            keys,
            max: &mut max,
            sum: &mut sum,
            out: (out, d),
        });
        // out [rows, d] += p [rows, keys] . v[j0..j0+keys] [keys, d].
        // SAFETY: row-major `out`, `s` and value block, within their slices.
        unsafe {
            gemm::gemm(
                rows,
                d,
                keys,
                out.as_mut_ptr(),
                1,
                d as isize,
                true,
                s.as_ptr(),
                1,
                keys as isize,
                v[j0 * d..].as_ptr(),
                1,
                d as isize,
                1.0,
                1.0,
                false,
                false,
                false,
                Parallelism::None,
            );
        }
        j0 += keys;
    }
    for (r, row) in out.chunks_mut(d).enumerate() {
        let inv = 1.0 / sum[r];
        row.iter_mut().for_each(|o| *o *= inv);
    }
}

/// One key block of the online softmax: `scores` `[rows, keys]` become their exponentials
/// against the new running max, each row's running `sum` grows, and the output rows `out`
/// `[rows, d]` are rescaled to the new max.
struct SoftmaxStep<'a> {
    scores: &'a mut [f32],
    keys: usize,
    max: &'a mut [f32],
    sum: &'a mut [f32],
    out: (&'a mut [f32], usize),
}

impl pulp::WithSimd for SoftmaxStep<'_> {
    type Output = ();

    /// Inlined into pulp's `#[target_feature]` entry, so the loops are compiled for `S`.
    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _simd: S) {
        let (out, d) = self.out;
        for (r, row) in self.scores.chunks_exact_mut(self.keys).enumerate() {
            let new_max = self.max[r].max(lanes(row, f32::NEG_INFINITY, f32::max));
            // exp(-inf) would be 0; fast_exp clamps it to ~1e-38, and what it scales is 0 then.
            let rescale = fast_exp(self.max[r] - new_max);
            // No reduction in this loop, so it vectorises.
            row.iter_mut().for_each(|x| *x = fast_exp(*x - new_max));
            self.sum[r] = self.sum[r] * rescale + lanes(row, 0.0, |a, b| a + b);
            self.max[r] = new_max;
            out[r * d..(r + 1) * d]
                .iter_mut()
                .for_each(|o| *o *= rescale);
        }
    }
}

/// Folds `x` with `f` over 16 independent lanes, then the lanes and the tail in order: the
/// same result every time for the same input, and a loop the compiler vectorises (a single
/// running float accumulator cannot be reordered, so it would stay scalar).
#[inline(always)]
fn lanes(x: &[f32], init: f32, f: impl Fn(f32, f32) -> f32) -> f32 {
    let mut acc = [init; 16];
    let chunks = x.chunks_exact(16);
    let tail = chunks.remainder();
    for c in chunks {
        for (a, &v) in acc.iter_mut().zip(c) {
            *a = f(*a, v);
        }
    }
    let folded = acc.into_iter().fold(init, &f);
    tail.iter().copied().fold(folded, f)
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Tensor};

    use super::*;

    /// The plain composition: softmax(scale q k^T) v, with candle's ops.
    fn reference(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
        let s = (q.matmul(&k.t()?)? * scale)?;
        candle_nn::ops::softmax_last_dim(&s)?.matmul(v)
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        let v: Vec<f32> = t.flatten_all().unwrap().to_vec1().unwrap();
        v.into_iter().map(f32::to_bits).collect()
    }

    /// Within f32 rounding of the composed path for the shapes the UNet and the aggregators
    /// use (head dims 8-80, sequence lengths that are not multiples of the blocks, one key,
    /// cross-attention with 77 keys), large logits included.
    #[test]
    fn matches_the_composed_attention() -> Result<()> {
        let dev = &Device::Cpu;
        for (b, h, tq, tk, d, spread) in [
            (2, 2, 37, 21, 8, 1.0f32),
            (1, 8, 300, 300, 16, 1.0),
            (2, 3, 130, 77, 40, 1.0),
            (1, 2, 64, 513, 80, 1.0),
            (1, 1, 5, 1, 16, 1.0),
            (1, 2, 100, 600, 16, 6.0),
        ] {
            let q = (Tensor::randn(0f32, 1.0, (b, h, tq, d), dev)? * spread as f64)?;
            let k = (Tensor::randn(0f32, 1.0, (b, h, tk, d), dev)? * spread as f64)?;
            let v = Tensor::randn(0f32, 1.0, (b, h, tk, d), dev)?;
            let scale = 1.0 / (d as f64).sqrt();
            let fused = attention(&q, &k, &v, scale)?;
            let plain = reference(&q, &k, &v, scale)?;
            let diff = (fused - plain)?
                .abs()?
                .flatten_all()?
                .max(0)?
                .to_scalar::<f32>()?;
            assert!(diff < 2e-5, "{b}x{h}x{tq}x{tk}x{d}: {diff}");
        }
        Ok(())
    }

    /// A sample's output is the same bits alone or in a batch.
    #[test]
    fn is_batch_invariant() -> Result<()> {
        let dev = &Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (3, 2, 150, 16), dev)?;
        let k = Tensor::randn(0f32, 1.0, (3, 2, 300, 16), dev)?;
        let v = Tensor::randn(0f32, 1.0, (3, 2, 300, 16), dev)?;
        let one = |t: &Tensor| t.narrow(0, 1, 1);
        let alone = attention(&one(&q)?, &one(&k)?, &one(&v)?, 0.25)?;
        let batch = attention(&q, &k, &v, 0.25)?;
        assert_eq!(bits(&alone), bits(&one(&batch)?));
        Ok(())
    }

    #[test]
    fn mismatched_shapes_are_errors() -> Result<()> {
        let dev = &Device::Cpu;
        let q = Tensor::zeros((1, 2, 4, 8), candle_core::DType::F32, dev)?;
        let k = Tensor::zeros((1, 2, 4, 16), candle_core::DType::F32, dev)?;
        assert!(attention(&q, &k, &k, 1.0).is_err());
        Ok(())
    }
}
