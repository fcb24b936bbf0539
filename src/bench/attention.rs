//! The `attention` part: `models::nn`'s default attention (the fused CPU kernel for f32
//! inference; FlashAttention-2 on an sm80+ GPU in f16/bf16 when built with `flash-attn`)
//! against the sliced composed path, on the shapes SD1.5 and the paper's aggregators use with
//! classifier-free guidance (batch 2).
use super::{BenchError, BenchOptions, BenchReport, random_input, row, time_runs};
use crate::models::nn;

/// An attention path: `q`, `k`, `v`, scale -> output.
type AttentionFn = fn(
    &candle_core::Tensor,
    &candle_core::Tensor,
    &candle_core::Tensor,
    f64,
) -> candle_core::Result<candle_core::Tensor>;

/// `(label, [B, H, Tq, d], Tk)`.
const SHAPES: [(&str, [usize; 4], usize); 6] = [
    ("aggregator self-attention 64x64", [2, 8, 4096, 16], 4096),
    ("UNet self-attention 64x64", [2, 8, 4096, 40], 4096),
    ("UNet cross-attention 64x64", [2, 8, 4096, 40], 77),
    ("aggregator self-attention 32x32", [2, 8, 1024, 16], 1024),
    ("UNet self-attention 32x32", [2, 8, 1024, 80], 1024),
    ("UNet self-attention 16x16", [2, 8, 256, 160], 256),
];

/// Rows `attention <path>, <label>` for both paths of every shape.
pub(super) fn bench_attention(
    opts: &BenchOptions,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    for (i, (label, q_dims, tk)) in SHAPES.iter().enumerate() {
        let [b, h, _, d] = *q_dims;
        let seed = opts.seed ^ (0x5eed + i as u64);
        let q = random_input(q_dims, 1.0, seed, opts)?;
        let k = random_input(&[b, h, *tk, d], 1.0, seed ^ 1, opts)?;
        let v = random_input(&[b, h, *tk, d], 1.0, seed ^ 2, opts)?;
        let scale = 1.0 / (d as f64).sqrt();
        let paths: [(&str, AttentionFn); 2] = [
            ("default", nn::scaled_dot_product_attention),
            ("sliced", nn::sliced_attention),
        ];
        for (path, attend) in paths {
            let times = time_runs(opts.repeats, &opts.device, || {
                attend(&q, &k, &v, scale).map(drop)
            })?;
            let name = format!("attention {path}, {label}");
            report.rows.push(row(&name, q_dims, &times, 0.0));
        }
    }
    Ok(())
}
