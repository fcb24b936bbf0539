//! The training objective of `afa-method.md` §6 for one micro-batch: VAE latent *samples*
//! scaled by the VAE's scaling factor, DDPM forward noising at per-sample timesteps, each
//! member's own text embedding (captions dropped to "" beforehand), the AFA denoiser over the
//! trainable aggregators, and the MSE between the final aggregated eps and the true noise.
use candle_core::{DType, Device, Tensor};

use super::Result;
use super::params::AggregatorParams;
use crate::ensemble::{Ensemble, EnsembleContext, EnsembleMode};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::vae::{AutoencoderKL, DiagonalGaussian};
use crate::schedulers::NoiseSchedule;

/// `[B, 77]` u32 ids of `captions`.
pub fn token_ids(
    tokenizer: &ClipTokenizer,
    captions: &[String],
    device: &Device,
) -> Result<Tensor> {
    let mut ids = Vec::new();
    for c in captions {
        ids.extend(tokenizer.encode(c).ids);
    }
    let len = ids.len() / captions.len().max(1);
    Ok(Tensor::from_vec(ids, (captions.len(), len), device)?)
}

/// Each member's own text embedding of `captions` and their mean (`[B, 77, D]` each).
pub fn text_context(
    ensemble: &Ensemble,
    tokenizer: &ClipTokenizer,
    captions: &[String],
    device: &Device,
) -> Result<EnsembleContext> {
    let ids = token_ids(tokenizer, captions, device)?;
    Ok(ensemble.denoiser(&EnsembleMode::Mean)?.encode(&ids)?)
}

/// Scaled latent samples: `pixels` `[B, 3, H, W]` in [-1, 1] -> the VAE posterior; see
/// [`sample_latents`].
pub fn encode_pixels(vae: &AutoencoderKL, pixels: &Tensor) -> Result<DiagonalGaussian> {
    Ok(vae.encode(&pixels.to_dtype(vae.dtype())?)?)
}

/// `dist.sample(noise) * scaling_factor` (shifted as the config says), f32 `[B, 4, h, w]`.
pub fn sample_latents(
    vae: &AutoencoderKL,
    dist: &DiagonalGaussian,
    noise: &Tensor,
) -> Result<Tensor> {
    let z = dist.sample(&noise.to_dtype(dist.mean.dtype())?)?;
    Ok(vae.scale_latents(&z)?.to_dtype(DType::F32)?)
}

/// The MSE (mean over all elements, f32 scalar) of the AFA denoiser's eps at `x_t` `[B, 4, h, w]`,
/// timesteps `t` (len B) against `noise` `[B, 4, h, w]`. Records the graph when the ensemble's
/// aggregators are built over `Var`s.
pub fn afa_loss(
    ensemble: &Ensemble,
    x_t: &Tensor,
    t: &[usize],
    noise: &Tensor,
    context: &EnsembleContext,
) -> Result<Tensor> {
    let device = x_t.device();
    let b = t.len();
    let tt = Tensor::from_vec(t.iter().map(|&v| v as f32).collect::<Vec<_>>(), b, device)?;
    let guidance = Tensor::ones((b, 1, 1, 1), DType::F32, device)?;
    let eps = ensemble
        .denoiser(&EnsembleMode::Afa)?
        .predict(x_t, &tt, &guidance, context, None)?;
    Ok((eps - noise.to_dtype(DType::F32)?)?.sqr()?.mean_all()?)
}

/// `x_t` for latents `x0`, `noise` (both `[B, 4, h, w]`) and timesteps `t`.
pub fn noised(
    schedule: &NoiseSchedule,
    x0: &Tensor,
    noise: &Tensor,
    t: &[usize],
) -> Result<Tensor> {
    Ok(schedule.add_noise(x0, noise, t)?)
}

/// Backward of `loss` (scaled by `scale`, e.g. 1 / grad_accum): the gradient of every
/// parameter, aligned with `params.vars()` (zeros where none reached it).
pub fn gradients(loss: &Tensor, scale: f64, params: &AggregatorParams) -> Result<Vec<Vec<Tensor>>> {
    let scaled = if scale == 1.0 {
        loss.clone()
    } else {
        (loss * scale)?
    };
    let store = scaled.backward()?;
    params
        .vars()
        .iter()
        .map(|set| {
            set.iter()
                .map(|(_, v)| {
                    let t = v.as_tensor();
                    Ok(match store.get(t) {
                        Some(g) => g.detach(),
                        None => t.zeros_like()?,
                    })
                })
                .collect()
        })
        .collect()
}

/// `acc += add`, elementwise per parameter (`acc` empty: becomes `add`).
pub fn accumulate(acc: &mut Vec<Vec<Tensor>>, add: Vec<Vec<Tensor>>) -> Result<()> {
    if acc.is_empty() {
        *acc = add;
        return Ok(());
    }
    for (a, b) in acc.iter_mut().zip(add) {
        for (x, y) in a.iter_mut().zip(b) {
            *x = (&*x + y)?;
        }
    }
    Ok(())
}
