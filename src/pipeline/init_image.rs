//! Image-to-image and inpainting: the init image (and mask) an image of a batch starts from,
//! the batch's shared `strength`, and the sampler-side work they need, as diffusers does it:
//! the init images are VAE-encoded (the posterior mean: deterministic, diffusers'
//! `sample_mode="argmax"`), the first `(1 - strength)` of the schedule is skipped
//! (`get_timesteps`), the init latents are noised to the first step kept (`add_noise`), and
//! for a masked image the known region is put back, re-noised to the next step's level, after
//! every step (`StableDiffusionInpaintPipeline` with a 4-channel UNet; at strength 1 a masked
//! image starts from pure noise like that pipeline's `is_strength_max`).
use candle_core::{DType, Device, Tensor};

use super::PipelineError;
use crate::models::vae::AutoencoderKL;
use crate::schedulers::Scheduler;

/// What one image starts from. Sizes are the batch's width x height.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InitImage {
    /// 8-bit RGB, row-major.
    pub rgb: Vec<u8>,
    /// One byte per pixel: 128 and above repaint ("white = inpaint", binarized at 0.5 as
    /// diffusers' mask processor does), below 128 keep. `None`: the whole image is redrawn.
    pub mask: Option<Vec<u8>>,
}

impl InitImage {
    /// Checks the buffers against a `width` x `height` image; errors name `init_image`/`mask`.
    pub fn check(&self, width: usize, height: usize) -> Result<(), PipelineError> {
        if self.rgb.len() != width * height * 3 {
            return Err(PipelineError::invalid(
                "init_image",
                format!(
                    "{} bytes of RGB do not make a {width}x{height} image",
                    self.rgb.len()
                ),
            ));
        }
        match &self.mask {
            Some(m) if m.len() != width * height => Err(PipelineError::invalid(
                "mask",
                format!("{} mask values do not cover {width}x{height}", m.len()),
            )),
            _ => Ok(()),
        }
    }
}

/// The fraction of the schedule an image-to-image batch runs, in `[0, 1]` (0: the init image's
/// VAE round trip; 1: from (nearly) pure noise). Compared and hashed by value, so batches can
/// be keyed on it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Strength(f64);

impl Eq for Strength {}

impl std::hash::Hash for Strength {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.0.to_bits().hash(state);
    }
}

impl Strength {
    /// A strength in `[0, 1]`; anything else is an error naming `strength`.
    pub fn new(value: f64) -> Result<Self, PipelineError> {
        if !(0.0..=1.0).contains(&value) {
            return Err(PipelineError::invalid(
                "strength",
                format!("strength must be within 0..=1, got {value}"),
            ));
        }
        // `+ 0.0` turns -0.0 into 0.0, so equal strengths hash alike.
        Ok(Self(value + 0.0))
    }

    pub fn value(self) -> f64 {
        self.0
    }

    /// The first step run out of `steps` (diffusers' `get_timesteps`:
    /// `steps - min(int(steps * strength), steps)`); `steps` means none runs.
    pub fn start_index(self, steps: usize) -> usize {
        let kept = ((steps as f64 * self.0) as usize).min(steps);
        steps - kept
    }
}

/// The init side of a running image-to-image batch, one row per running image.
pub(crate) struct InitLatents {
    /// `[B, C, h, w]` f32: the init images' scaled latents.
    latents: Tensor,
    /// `[B, C, h, w]` f32: each image's initial noise (inpainting re-noises with it).
    noise: Tensor,
    /// `[B, 1, h, w]` f32, 1 repaint / 0 keep (all ones for unmasked rows); `None` when no
    /// image of the batch has a mask.
    mask: Option<Tensor>,
    /// Per row: whether the image has a mask.
    masked: Vec<bool>,
}

impl InitLatents {
    /// Encodes the batch's init images one at a time (memory stays that of one image and
    /// a row does not depend on its neighbours); images of a request that share one picture
    /// share its encoding. `noise`: `[B, C, h, w]` f32, the images' initial noise. The inits
    /// were checked against the size by `BatchRequest::validate`.
    pub(crate) fn encode(
        vae: &AutoencoderKL,
        inits: &[&InitImage],
        (width, height): (usize, usize),
        noise: &Tensor,
        device: &Device,
    ) -> Result<Self, PipelineError> {
        let factor = vae.scale_factor();
        let mut rows: Vec<Tensor> = Vec::with_capacity(inits.len());
        for (k, init) in inits.iter().enumerate() {
            let earlier = inits[..k].iter().position(|e| std::ptr::eq(*e, *init));
            rows.push(match earlier {
                Some(e) => rows[e].clone(),
                None => encode_picture(vae, init, (width, height), device)?,
            });
        }
        let latents = Tensor::cat(&rows, 0)?;
        let masked: Vec<bool> = inits.iter().map(|i| i.mask.is_some()).collect();
        let mask = if masked.iter().any(|&m| m) {
            let (h, w) = (height / factor, width / factor);
            let mut values = Vec::with_capacity(inits.len() * h * w);
            for init in inits {
                match &init.mask {
                    // torch's nearest interpolation by 1/f reads pixel (f*i, f*j).
                    Some(m) => values.extend((0..h * w).map(|k| {
                        let (i, j) = (k / w, k % w);
                        if m[i * factor * width + j * factor] >= 128 {
                            1f32
                        } else {
                            0f32
                        }
                    })),
                    None => values.extend(std::iter::repeat_n(1f32, h * w)),
                }
            }
            Some(Tensor::from_vec(values, (inits.len(), 1, h, w), device)?)
        } else {
            None
        };
        Ok(Self {
            latents,
            noise: noise.clone(),
            mask,
            masked,
        })
    }

    /// The latents `[B, C, h, w]` the sampler starts from at step `start` of `steps`: the init
    /// latents noised to that step (clean when no step runs); a masked image at `start == 0`
    /// starts from its noise times `init_noise_sigma`, like diffusers' inpainting at strength 1.
    pub(crate) fn start_latents(
        &self,
        scheduler: &dyn Scheduler,
        start: usize,
        steps: usize,
    ) -> Result<Tensor, PipelineError> {
        if start >= steps {
            return Ok(self.latents.clone());
        }
        let noised = scheduler.add_noise(&self.latents, &self.noise, start)?;
        if start > 0 || !self.masked.iter().any(|&m| m) {
            return Ok(noised);
        }
        let pure = (&self.noise * scheduler.init_noise_sigma())?;
        let rows: Vec<Tensor> = self
            .masked
            .iter()
            .enumerate()
            .map(|(b, &m)| {
                if m {
                    pure.narrow(0, b, 1)
                } else {
                    noised.narrow(0, b, 1)
                }
            })
            .collect::<candle_core::Result<_>>()?;
        Ok(Tensor::cat(&rows, 0)?)
    }

    /// After step `step_index` of `steps`: masked images get their known region back, noised
    /// to the next step's level (clean after the last step). `latents`: `[B, C, h, w]`.
    pub(crate) fn restore_known(
        &self,
        latents: Tensor,
        scheduler: &dyn Scheduler,
        step_index: usize,
        steps: usize,
    ) -> Result<Tensor, PipelineError> {
        let Some(mask) = &self.mask else {
            return Ok(latents);
        };
        let known = if step_index + 1 < steps {
            scheduler.add_noise(&self.latents, &self.noise, step_index + 1)?
        } else {
            self.latents.clone()
        };
        let keep = (1.0 - mask)?;
        Ok((known.broadcast_mul(&keep)? + latents.broadcast_mul(mask)?)?)
    }

    /// A preview's x0 (`[k, C, h, w]` for the batch rows `rows`, `[k]` u32) with the known
    /// region of masked images replaced by the init latents, as the final image will have it.
    pub(crate) fn paste_known(&self, x0: &Tensor, rows: &Tensor) -> Result<Tensor, PipelineError> {
        let Some(mask) = &self.mask else {
            return Ok(x0.clone());
        };
        let mask = mask.index_select(rows, 0)?;
        let known = self.latents.index_select(rows, 0)?;
        let keep = (1.0 - &mask)?;
        Ok((known.broadcast_mul(&keep)? + x0.broadcast_mul(&mask)?)?)
    }

    /// Keeps these rows (`[R]` u32; images cancelled mid-run are dropped).
    pub(crate) fn retain_rows(
        &mut self,
        rows: &Tensor,
        keep: &[usize],
    ) -> Result<(), PipelineError> {
        self.latents = self.latents.index_select(rows, 0)?;
        self.noise = self.noise.index_select(rows, 0)?;
        if let Some(mask) = &self.mask {
            self.mask = Some(mask.index_select(rows, 0)?);
        }
        self.masked = keep.iter().map(|&p| self.masked[p]).collect();
        Ok(())
    }
}

/// The scaled latents `[1, C, h, w]` f32 of one init picture, as diffusers' image processor
/// (`x / 255` in float32, then `2x - 1`) and the VAE posterior's mean.
fn encode_picture(
    vae: &AutoencoderKL,
    init: &InitImage,
    (width, height): (usize, usize),
    device: &Device,
) -> Result<Tensor, PipelineError> {
    let pixels: Vec<f32> = init
        .rgb
        .iter()
        .map(|&v| (f32::from(v) / 255.0) * 2.0 - 1.0)
        .collect();
    let image = Tensor::from_vec(pixels, (1, height, width, 3), device)?
        .permute((0, 3, 1, 2))?
        .contiguous()?
        .to_dtype(vae.dtype())?;
    let z = vae.encode(&image)?.mode();
    Ok(vae.scale_latents(&z)?.to_dtype(DType::F32)?)
}

/// The init images of a batch, in batch order, or `None` for text-to-image; every image must
/// have one exactly when the batch has a strength.
pub(crate) fn batch_inits(
    images: &[super::ImageSpec],
    strength: Option<Strength>,
) -> Result<Option<Vec<&InitImage>>, PipelineError> {
    let inits: Vec<&InitImage> = images.iter().filter_map(|i| i.init.as_deref()).collect();
    match strength {
        None if inits.is_empty() => Ok(None),
        None => Err(PipelineError::invalid(
            "strength",
            "an init image needs a strength",
        )),
        Some(_) if inits.len() == images.len() => Ok(Some(inits)),
        Some(_) => Err(PipelineError::invalid(
            "init_image",
            "every image of an image-to-image batch needs an init image",
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strength_skips_the_start_of_the_schedule_like_diffusers() {
        // int(steps * strength) with float truncation, as Python's int().
        assert_eq!(Strength::new(0.6).unwrap().start_index(10), 4);
        assert_eq!(Strength::new(0.75).unwrap().start_index(20), 5);
        assert_eq!(Strength::new(0.3).unwrap().start_index(10), 7);
        assert_eq!(Strength::new(1.0).unwrap().start_index(50), 0);
        assert_eq!(Strength::new(0.0).unwrap().start_index(50), 50);
        assert_eq!(Strength::new(0.01).unwrap().start_index(50), 50);
        for bad in [-0.1, 1.5, f64::NAN] {
            assert!(Strength::new(bad).is_err(), "{bad}");
        }
        let hash = |s: Strength| {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            s.hash(&mut h);
            h.finish()
        };
        let (zero, minus_zero) = (Strength::new(0.0).unwrap(), Strength::new(-0.0).unwrap());
        assert_eq!((zero, hash(zero)), (minus_zero, hash(minus_zero)));
    }

    #[test]
    fn wrong_sizes_name_the_field() {
        let init = InitImage {
            rgb: vec![0; 8 * 8 * 3],
            mask: Some(vec![0; 10]),
        };
        match init.check(8, 8) {
            Err(PipelineError::Invalid { field, .. }) => assert_eq!(field, "mask"),
            other => panic!("{other:?}"),
        }
        match init.check(16, 8) {
            Err(PipelineError::Invalid { field, .. }) => assert_eq!(field, "init_image"),
            other => panic!("{other:?}"),
        }
    }
}
