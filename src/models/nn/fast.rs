//! Fused CPU kernels for inference (f32, no gradient): im2col convolution, group norm (+SiLU),
//! softmax and GEGLU, parallel over rows on candle's rayon pool. Each is a `CustomOp` without
//! backward, so callers use them only when [`applies`] and no weight tracks gradients; the
//! differentiable candle path stays the default (and is what the tests below compare against).
use candle_core::{CpuStorage, CustomOp1, DType, Layout, Result, Shape, Tensor, bail};
use rayon::prelude::*;

/// True when `x` may take a fused kernel: f32 on the CPU and not tracking gradients.
pub fn applies(x: &Tensor) -> bool {
    x.device().is_cpu() && x.dtype() == DType::F32 && !x.track_op()
}

/// The contiguous f32 data of a CPU storage, or an error naming `op`.
pub(super) fn f32_data<'a>(s: &'a CpuStorage, l: &Layout, op: &str) -> Result<&'a [f32]> {
    let data = match s {
        CpuStorage::F32(v) => v,
        _ => bail!("{op}: f32 only"),
    };
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => bail!("{op}: contiguous input only"),
    }
}

/// Square kernel size, stride and symmetric zero padding of a convolution.
#[derive(Debug, Clone, Copy)]
pub struct ConvGeometry {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvGeometry {
    fn out_len(&self, n: usize) -> usize {
        (n + 2 * self.padding - self.kernel) / self.stride + 1
    }
}

/// Most bytes of im2col columns that exist at once, per convolution (64 MiB): larger outputs
/// are computed in bands of output rows, one image at a time, so a 512x512 VAE decode does not
/// build a 1.2 GB column buffer per 128-channel layer.
const COLUMNS_BUDGET: usize = 64 << 20;

/// `x`: `[B, I, H, W]`, `w`: `[O, I, k, k]`, `bias`: `[O]` -> `[B, O, H', W']`, as one
/// `[O, I*k*k] x [I*k*k, H'*W']` matmul per image (no im2col at all for 1x1 stride 1), or per
/// band of output rows when the columns would pass [`COLUMNS_BUDGET`] (the band depends on
/// the image's shape only, never on the batch).
pub fn conv2d(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, g: ConvGeometry) -> Result<Tensor> {
    conv2d_within(x, w, bias, (g, COLUMNS_BUDGET))
}

/// [`conv2d`] with at most `budget` bytes of columns at once.
fn conv2d_within(
    x: &Tensor,
    w: &Tensor,
    bias: Option<&Tensor>,
    (g, budget): (ConvGeometry, usize),
) -> Result<Tensor> {
    let (b, _, h, wd) = x.dims4()?;
    let (o, i, _, _) = w.dims4()?;
    let (ho, wo) = (g.out_len(h), g.out_len(wd));
    let kk = i * g.kernel * g.kernel;
    let x = x.contiguous()?;
    let y = if g.kernel == 1 && g.stride == 1 && g.padding == 0 {
        let w = w.reshape((1, o, kk))?.broadcast_as((b, o, kk))?;
        w.matmul(&x.reshape((b, i, h * wd))?)?
            .reshape((b, o, ho, wo))?
    } else {
        let band = (budget / (kk * wo * 4).max(1)).clamp(1, ho.max(1));
        if band >= ho {
            let cols = x.apply_op1_no_bwd(&Im2Col { g, rows: None })?;
            let w = w.reshape((1, o, kk))?.broadcast_as((b, o, kk))?;
            w.matmul(&cols)?.reshape((b, o, ho, wo))?
        } else {
            let w = w.reshape((1, o, kk))?;
            let mut images = Vec::with_capacity(b);
            for n in 0..b {
                let image = x.narrow(0, n, 1)?;
                let mut bands = Vec::with_capacity(ho.div_ceil(band));
                let mut start = 0;
                while start < ho {
                    let rows = band.min(ho - start);
                    let cols = image.apply_op1_no_bwd(&Im2Col {
                        g,
                        rows: Some((start, start + rows)),
                    })?;
                    bands.push(w.matmul(&cols)?.reshape((1, o, rows, wo))?);
                    start += rows;
                }
                images.push(Tensor::cat(&bands, 2)?);
            }
            Tensor::cat(&images, 0)?
        }
    };
    match bias {
        Some(bias) => y.broadcast_add(&bias.reshape((1, o, 1, 1))?),
        None => Ok(y),
    }
}

/// `[B, C, H, W]` -> `[B, C*k*k, R*W']`, rows ordered `(c, kh, kw)` like the weight, for the
/// output rows `rows` (`[start, end)`, all `H'` when `None`).
struct Im2Col {
    g: ConvGeometry,
    rows: Option<(usize, usize)>,
}

impl CustomOp1 for Im2Col {
    fn name(&self) -> &'static str {
        "afa-im2col"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "im2col")?;
        let (b, c, h, w) = l.shape().dims4()?;
        let g = self.g;
        let (ho, wo) = (g.out_len(h), g.out_len(w));
        let (start, end) = self.rows.unwrap_or((0, ho));
        if start > end || end > ho {
            bail!("im2col: rows {start}..{end} of {ho}");
        }
        let n = (end - start) * wo;
        let k = g.kernel;
        let mut out = vec![0f32; b * c * k * k * n];
        out.par_chunks_mut(k * k * n)
            .zip(x.par_chunks(h * w))
            .for_each(|(dst, src)| {
                for (r, row) in dst.chunks_mut(n).enumerate() {
                    im2col_row(src, (h, w), (r / k, r % k), (g, start), row);
                }
            });
        Ok((CpuStorage::F32(out), Shape::from((b, c * k * k, n))))
    }
}

/// Fills `row` (`[R*W']`, zeroed) with the input plane `src` (`[H, W]`) seen through kernel
/// tap `(kh, kw)`, for the `R` output rows from `first`.
fn im2col_row(
    src: &[f32],
    (h, w): (usize, usize),
    (kh, kw): (usize, usize),
    (g, first): (ConvGeometry, usize),
    row: &mut [f32],
) {
    let wo = g.out_len(w);
    let p = g.padding as isize;
    for (r, dst) in row.chunks_mut(wo).enumerate() {
        let oy = first + r;
        let iy = (oy * g.stride + kh) as isize - p;
        if iy < 0 || iy >= h as isize {
            continue;
        }
        let src_row = &src[iy as usize * w..(iy as usize + 1) * w];
        if g.stride == 1 {
            // Valid ox: 0 <= ox + kw - p < w.
            let lo = (p - kw as isize).max(0) as usize;
            let hi = ((w as isize + p - kw as isize).min(wo as isize)).max(lo as isize) as usize;
            let start = (lo as isize + kw as isize - p) as usize;
            dst[lo..hi].copy_from_slice(&src_row[start..start + hi - lo]);
        } else {
            for (ox, d) in dst.iter_mut().enumerate() {
                let ix = (ox * g.stride + kw) as isize - p;
                if ix >= 0 && ix < w as isize {
                    *d = src_row[ix as usize];
                }
            }
        }
    }
}

/// Group norm over `[B, C, *]` with per-channel affine `weight`, `bias` (`[C]`), then SiLU
/// when `silu`: two passes per group, groups in parallel.
pub fn group_norm(
    x: &Tensor,
    weight: &Tensor,
    bias: &Tensor,
    groups: usize,
    eps: f64,
    silu: bool,
) -> Result<Tensor> {
    let op = GroupNormOp {
        groups,
        eps,
        silu,
        weight: weight.to_vec1::<f32>()?,
        bias: bias.to_vec1::<f32>()?,
    };
    x.contiguous()?.apply_op1_no_bwd(&op)
}

struct GroupNormOp {
    groups: usize,
    eps: f64,
    silu: bool,
    weight: Vec<f32>,
    bias: Vec<f32>,
}

impl CustomOp1 for GroupNormOp {
    fn name(&self) -> &'static str {
        "afa-group-norm"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "group_norm")?;
        let dims = l.shape().dims();
        if dims.len() < 3 || dims[1] != self.weight.len() || !dims[1].is_multiple_of(self.groups) {
            bail!(
                "group_norm: bad input shape {dims:?} for {} channels",
                self.weight.len()
            );
        }
        let c = dims[1];
        let spatial: usize = dims[2..].iter().product();
        let per_group = c / self.groups * spatial;
        let mut out = vec![0f32; x.len()];
        out.par_chunks_mut(per_group)
            .zip(x.par_chunks(per_group))
            .enumerate()
            .for_each(|(bg, (dst, src))| {
                let c0 = (bg % self.groups) * (c / self.groups);
                self.normalize_group(src, dst, c0, spatial);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

impl GroupNormOp {
    /// One group: `src`/`dst` are `[C/G, spatial]`, the first channel is `c0`.
    fn normalize_group(&self, src: &[f32], dst: &mut [f32], c0: usize, spatial: usize) {
        let n = src.len() as f64;
        let mean = src.iter().map(|&v| v as f64).sum::<f64>() / n;
        let var = src.iter().map(|&v| (v as f64 - mean).powi(2)).sum::<f64>() / n;
        let rstd = 1.0 / (var + self.eps).sqrt();
        for (ci, (d, s)) in dst.chunks_mut(spatial).zip(src.chunks(spatial)).enumerate() {
            let scale = (rstd * self.weight[c0 + ci] as f64) as f32;
            let shift = self.bias[c0 + ci] - (mean * rstd) as f32 * self.weight[c0 + ci];
            for (d, &s) in d.iter_mut().zip(s) {
                *d = s * scale + shift;
            }
            if self.silu {
                for d in d.iter_mut() {
                    *d /= 1.0 + fast_exp(-*d);
                }
            }
        }
    }
}

/// `softmax(scale * x)` over the last dimension of `x` (`scale > 0`).
pub fn softmax(x: &Tensor, scale: f32) -> Result<Tensor> {
    x.contiguous()?.apply_op1_no_bwd(&Softmax(scale))
}

struct Softmax(f32);

impl CustomOp1 for Softmax {
    fn name(&self) -> &'static str {
        "afa-softmax"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "softmax")?;
        let n = l.shape().dims().last().copied().unwrap_or(1).max(1);
        let mut out = vec![0f32; x.len()];
        let scale = self.0;
        out.par_chunks_mut(n)
            .zip(x.par_chunks(n))
            .for_each(|(dst, src)| {
                let max = src.iter().copied().fold(f32::NEG_INFINITY, f32::max);
                for (d, &v) in dst.iter_mut().zip(src) {
                    *d = fast_exp((v - max) * scale);
                }
                let inv = 1.0 / dst.iter().sum::<f32>();
                dst.iter_mut().for_each(|d| *d *= inv);
            });
        Ok((CpuStorage::F32(out), l.shape().clone()))
    }
}

/// `e^x` with relative error ~2e-7 for `x` in [-87, 88] (clamped there, so -inf gives ~1e-38
/// and +inf ~1.6e38), branch-free so loops over it vectorise: `e^x = 2^n * e^r`,
/// `|r| <= ln2/2`, degree-6 Taylor for `e^r`.
#[inline(always)]
pub(super) fn fast_exp(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5 * 2^23: adding it rounds to an integer.
    let x = x.clamp(-87.0, 88.0);
    let t = x * std::f32::consts::LOG2_E + ROUND;
    let n = t - ROUND;
    let r = (x - n * 0.693_359_4) + n * 2.121_944_5e-4;
    let p = 1.0
        + r * (1.0
            + r * (0.5
                + r * (1.0 / 6.0 + r * (1.0 / 24.0 + r * (1.0 / 120.0 + r * (1.0 / 720.0))))));
    let bits = (t.to_bits() as i32)
        .wrapping_sub(0x4B40_0000)
        .wrapping_add(127)
        << 23;
    p * f32::from_bits(bits as u32)
}

/// `erf(x)`, absolute error < 2e-7 (Abramowitz & Stegun 7.1.26), branch-free.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t
        * (0.254_829_6
            + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    (1.0 - poly * fast_exp(-a * a)).copysign(x)
}

/// GEGLU: `h` `[.., 2n]` -> `h[.., :n] * gelu_erf(h[.., n:])` `[.., n]`.
pub fn geglu(h: &Tensor) -> Result<Tensor> {
    h.contiguous()?.apply_op1_no_bwd(&Geglu)
}

struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "afa-geglu"
    }

    fn cpu_fwd(&self, s: &CpuStorage, l: &Layout) -> Result<(CpuStorage, Shape)> {
        let x = f32_data(s, l, "geglu")?;
        let mut dims = l.shape().dims().to_vec();
        let two_n = *dims.last().unwrap_or(&0);
        if two_n == 0 || !two_n.is_multiple_of(2) {
            bail!("geglu: last dimension must be even, got {dims:?}");
        }
        let n = two_n / 2;
        let mut out = vec![0f32; x.len() / 2];
        out.par_chunks_mut(n)
            .zip(x.par_chunks(two_n))
            .for_each(|(dst, src)| {
                let (value, gate) = src.split_at(n);
                for ((d, &v), &g) in dst.iter_mut().zip(value).zip(gate) {
                    *d = v * 0.5 * g * (1.0 + erf(g * std::f32::consts::FRAC_1_SQRT_2));
                }
            });
        *dims.last_mut().expect("checked above") = n;
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Module, Var};

    use super::*;

    fn randn(dims: &[usize]) -> Result<Tensor> {
        Tensor::randn(0f32, 1.0, dims, &Device::Cpu)
    }

    fn max_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn conv_matches_candle() -> Result<()> {
        let x = randn(&[2, 5, 9, 7])?;
        for (k, stride, padding) in [(3, 1, 1), (3, 2, 1), (3, 2, 0), (1, 1, 0), (1, 2, 0)] {
            let w = randn(&[6, 5, k, k])?;
            let bias = randn(&[6])?;
            let cfg = candle_nn::Conv2dConfig {
                padding,
                stride,
                ..Default::default()
            };
            let want = candle_nn::Conv2d::new(w.clone(), Some(bias.clone()), cfg).forward(&x)?;
            let g = ConvGeometry {
                kernel: k,
                stride,
                padding,
            };
            let got = conv2d(&x, &w, Some(&bias), g)?;
            assert_eq!(got.dims(), want.dims());
            assert!(
                max_diff(&got, &want)? < 1e-4,
                "k {k} stride {stride} padding {padding}"
            );
            // In bands of 1 and 3 output rows (one image at a time): the same, and a sample's
            // result the same bits alone or in the batch.
            let row_bytes = 5 * k * k * got.dim(3)? * 4;
            for budget in [1, 3 * row_bytes] {
                let banded = conv2d_within(&x, &w, Some(&bias), (g, budget))?;
                assert!(max_diff(&banded, &want)? < 1e-4, "k {k} budget {budget}");
                let alone = conv2d_within(&x.narrow(0, 1, 1)?, &w, Some(&bias), (g, budget))?;
                let flat = |t: &Tensor| -> Result<Vec<u32>> {
                    Ok(t.flatten_all()?
                        .to_vec1::<f32>()?
                        .into_iter()
                        .map(f32::to_bits)
                        .collect())
                };
                assert_eq!(flat(&alone)?, flat(&banded.narrow(0, 1, 1)?)?);
            }
        }
        Ok(())
    }

    #[test]
    fn group_norm_softmax_geglu_match_candle() -> Result<()> {
        let x = ((randn(&[2, 8, 3, 5])? * 3.0)? + 1.0)?;
        let (w, b) = (randn(&[8])?, randn(&[8])?);
        let want = candle_nn::GroupNorm::new(w.clone(), b.clone(), 8, 4, 1e-5)?.forward(&x)?;
        assert!(max_diff(&group_norm(&x, &w, &b, 4, 1e-5, false)?, &want)? < 1e-5);
        assert!(max_diff(&group_norm(&x, &w, &b, 4, 1e-5, true)?, &want.silu()?)? < 1e-5);

        let s = (randn(&[3, 4, 33])? * 20.0)?;
        let want = candle_nn::ops::softmax_last_dim(&(&s * 0.3)?)?;
        assert!(max_diff(&softmax(&s, 0.3)?, &want)? < 1e-6);
        let masked = Tensor::new(&[[0f32, f32::NEG_INFINITY, 2.0]], &Device::Cpu)?;
        let got = softmax(&masked, 1.0)?.to_vec2::<f32>()?;
        assert!(got[0][1] < 1e-30 && (got[0][0] + got[0][2] - 1.0).abs() < 1e-6);

        let h = randn(&[2, 3, 10])?;
        let want = (h.narrow(2, 0, 5)? * h.narrow(2, 5, 5)?.gelu_erf()?)?;
        assert!(max_diff(&geglu(&h)?, &want)? < 1e-6);
        Ok(())
    }

    #[test]
    fn tracked_inputs_take_the_differentiable_path() -> Result<()> {
        let x = Var::from_tensor(&randn(&[1, 2, 3, 3])?)?;
        assert!(!applies(x.as_tensor()));
        assert!(applies(&x.as_tensor().detach()));
        Ok(())
    }
}
