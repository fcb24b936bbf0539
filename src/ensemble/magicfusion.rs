//! MagicFusion's saliency-aware noise blending (`afa-method.md` §10.4), the training-free
//! baseline: every expert runs with CFG; each expert's guidance response is measured against the
//! first expert's ("general" model G) unconditional prediction, smoothed, turned into a spatial
//! softmax per channel, and each latent element takes the guided noise of the expert whose
//! normalised saliency is largest (an argmax over N, the N-expert extension of the paper's
//! two-model comparison). Fusion runs while t > T0; afterwards G alone is used.
use candle_core::{D, DType, Result, Tensor};

/// MagicFusion settings (`fusion_selection = "T0,kG,kE"` of the original code, merge_mode 2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MagicFusionConfig {
    /// Fuse while the timestep is above this; use the general model below.
    pub t0: f64,
    /// Inverse temperature of the general model's saliency softmax.
    pub k_general: f64,
    /// Inverse temperature of the other experts' saliency softmax.
    pub k_expert: f64,
}

impl Default for MagicFusionConfig {
    fn default() -> Self {
        Self {
            t0: 600.0,
            k_general: 1.0,
            k_expert: 1.0,
        }
    }
}

/// Smoothed, channel-averaged, spatially normalised saliency of a guidance response.
/// `response`: `[B, C, h, w]` -> `[B, C, h, w]` (each channel a softmax over h*w).
fn normalised_saliency(response: &Tensor, k: f64) -> Result<Tensor> {
    let (b, c, h, w) = response.dims4()?;
    let a = response.abs()?;
    // AvgPool 4x4, stride 1, zero padding 1 (counted in the mean, as PyTorch's default).
    let padded = a.pad_with_zeros(2, 1, 1)?.pad_with_zeros(3, 1, 1)?;
    let pooled = padded.avg_pool2d_with_stride(4, 1)?;
    let resized = pooled.upsample_bilinear2d(h, w, false)?;
    let mean = resized.mean_keepdim(1)?.broadcast_as((b, c, h, w))?;
    let logits = (mean * k)?.reshape((b, c, h * w))?;
    candle_nn::ops::softmax(&logits, D::Minus1)?.reshape((b, c, h, w))
}

/// Fuses the experts' predictions for one step.
/// `eps`: per expert `[2B, C, h, w]` (unconditional half first), `guidance`: `[B, 1, 1, 1]`,
/// `timestep`: the step's t -> guided, fused noise `[B, C, h, w]`.
pub fn fuse(
    eps: &[Tensor],
    guidance: &Tensor,
    timestep: f64,
    config: &MagicFusionConfig,
) -> Result<Tensor> {
    let b = guidance.dim(0)?;
    let halves: Vec<(Tensor, Tensor)> = eps
        .iter()
        .map(|e| Ok((e.narrow(0, 0, b)?, e.narrow(0, b, b)?)))
        .collect::<Result<_>>()?;
    let guided: Vec<Tensor> = halves
        .iter()
        .map(|(u, c)| u + (c - u)?.broadcast_mul(guidance)?)
        .collect::<Result<_>>()?;
    if timestep <= config.t0 || eps.len() == 1 {
        return Ok(guided[0].clone());
    }
    let uncond_general = &halves[0].0;
    let saliency: Vec<Tensor> = halves
        .iter()
        .enumerate()
        .map(|(n, (_, c))| {
            let response = (c - uncond_general)?.broadcast_mul(guidance)?;
            let k = if n == 0 {
                config.k_general
            } else {
                config.k_expert
            };
            normalised_saliency(&response, k)
        })
        .collect::<Result<_>>()?;
    // Per element, the expert with the largest saliency (first on ties, so G wins ties).
    let winner = Tensor::stack(&saliency, 0)?.argmax(0)?;
    let mut fused = guided[0].clone();
    for (n, g) in guided.iter().enumerate().skip(1) {
        let mask = winner.eq(n as u32)?;
        fused = mask.where_cond(g, &fused)?;
    }
    fused.to_dtype(DType::F32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn below_t0_the_general_model_alone_is_used() {
        let dev = Device::Cpu;
        let a = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev).unwrap();
        let b = Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev).unwrap();
        let g = Tensor::full(7.5f32, (1, 1, 1, 1), &dev).unwrap();
        let out = fuse(&[a.clone(), b], &g, 100.0, &MagicFusionConfig::default()).unwrap();
        let u = a.narrow(0, 0, 1).unwrap();
        let c = a.narrow(0, 1, 1).unwrap();
        let expected = (&u + ((c - &u).unwrap() * 7.5).unwrap()).unwrap();
        let diff = (out - expected)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
        assert!(diff < 1e-6);
    }

    #[test]
    fn fused_elements_come_from_some_expert() {
        let dev = Device::Cpu;
        let experts: Vec<Tensor> = (0..3)
            .map(|_| Tensor::randn(0f32, 1., (2, 4, 8, 8), &dev).unwrap())
            .collect();
        let g = Tensor::full(5f32, (1, 1, 1, 1), &dev).unwrap();
        let out = fuse(&experts, &g, 900.0, &MagicFusionConfig::default()).unwrap();
        let guided: Vec<Vec<f32>> = experts
            .iter()
            .map(|e| {
                let u = e.narrow(0, 0, 1).unwrap();
                let c = e.narrow(0, 1, 1).unwrap();
                (&u + ((c - &u).unwrap() * 5.0).unwrap())
                    .unwrap()
                    .flatten_all()
                    .unwrap()
                    .to_vec1()
                    .unwrap()
            })
            .collect();
        let out = out.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let mut used = [false; 3];
        for (i, v) in out.iter().enumerate() {
            let n = (0..3)
                .find(|&n| guided[n][i] == *v)
                .expect("element from an expert");
            used[n] = true;
        }
        assert!(used.iter().filter(|u| **u).count() >= 2, "{used:?}");
    }
}
