//! The sampler loop for one batch: tokenize, encode text, draw per-image noise, denoise with
//! classifier-free guidance, decode with the VAE, encode PNGs.
use std::time::{Duration, Instant};

use candle_core::{DType, Device, Tensor};

use super::PipelineError;
use super::denoiser::{DenoiseStep, Denoiser};
use super::init_image::{InitLatents, batch_inits};
use super::maps::{CollectedMaps, MapCollector};
use super::noise::BatchNoise;
use super::params::{BatchRequest, Limits, MapsRequest, sampler_display_name};
use super::png::{PngParameters, encode_png};
use super::preview;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::vae::AutoencoderKL;
use crate::schedulers::SchedulerConfig;

/// Watches a running batch: progress, optional intermediate tensors, cancellation.
pub trait Observer {
    /// Whether `tensor` should be called (tensors are only prepared when asked).
    fn wants_tensors(&self) -> bool {
        false
    }
    /// An intermediate tensor, by name (`tokens`, `text_emb`, `timesteps`, `latent_init`,
    /// `noise_pred_step0`, `latent_final`, `image`, ...).
    fn tensor(&mut self, _name: &str, _value: &Tensor) -> Result<(), PipelineError> {
        Ok(())
    }
    /// Step `done` of `total` finished.
    fn step(&mut self, _done: usize, _total: usize) {}
    /// Polled before every step; `true` abandons the batch.
    fn is_cancelled(&self) -> bool {
        false
    }
    /// Polled before every step for each running image (its index in the request); `true`
    /// drops that image from the batch, the others go on unchanged.
    fn is_image_cancelled(&self, _index: usize) -> bool {
        false
    }
    /// The images (indices in the request) that want a preview after step `done` of `total`
    /// (see `preview.rs`); none by default.
    fn previews_wanted(&self, _done: usize, _total: usize) -> Vec<usize> {
        Vec::new()
    }
    /// The preview of image `index` after step `done` of `total`: 8-bit RGB, row-major, at
    /// the batch's width and height.
    fn preview(&mut self, _index: usize, _done: usize, _total: usize, _rgb: Vec<u8>) {}
}

/// An observer that watches nothing.
impl Observer for () {}

/// Wall-clock time per stage.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct StageTimings {
    pub text_encode: Duration,
    pub denoise: Duration,
    pub decode: Duration,
    pub png_encode: Duration,
}

/// One finished image.
#[derive(Debug, Clone)]
pub struct GeneratedImage {
    /// Position of the image in the request (cancelled images leave gaps).
    pub index: usize,
    pub seed: u64,
    pub width: usize,
    pub height: usize,
    /// 8-bit RGB, row-major.
    pub rgb: Vec<u8>,
    /// PNG file bytes with the `parameters` chunk.
    pub png: Vec<u8>,
    /// The text of that chunk (other formats carry it in their own metadata).
    pub parameters: String,
    /// Things the caller should surface (for example a truncated prompt).
    pub warnings: Vec<String>,
}

/// The result of a batch.
#[derive(Debug, Clone)]
pub struct BatchOutput {
    pub images: Vec<GeneratedImage>,
    pub timings: StageTimings,
    /// Expert weights per aggregation point, when asked for and the denoiser aggregates.
    pub attention_maps: Option<CollectedMaps>,
}

/// Text -> image with one denoiser, shared tokenizer and VAE.
pub struct SdPipeline<D: Denoiser> {
    pub tokenizer: ClipTokenizer,
    pub denoiser: D,
    pub vae: AutoencoderKL,
    pub scheduler_config: SchedulerConfig,
    pub device: Device,
    /// Written into PNG metadata.
    pub model_name: String,
    pub limits: Limits,
}

impl<D: Denoiser> SdPipeline<D> {
    /// Latent channels expected by the VAE.
    fn latent_channels(&self) -> usize {
        self.vae.config().latent_channels
    }

    /// Token ids `[2B, 77]` (negative prompts first) and per-image warnings.
    fn tokenize(&self, req: &BatchRequest) -> Result<(Tensor, Vec<Vec<String>>), PipelineError> {
        let mut rows = Vec::with_capacity(2 * req.images.len());
        let mut warnings = vec![Vec::new(); req.images.len()];
        let negatives = req.images.iter().map(|i| i.negative_prompt.as_str());
        let prompts = req.images.iter().map(|i| i.prompt.as_str());
        for (k, text) in negatives.chain(prompts).enumerate() {
            let t = self.tokenizer.encode(text);
            if let Some(w) = self.tokenizer.truncation_warning(&t) {
                let which = if k < req.images.len() {
                    "negative prompt"
                } else {
                    "prompt"
                };
                warnings[k % req.images.len()].push(format!("{which}: {w}"));
            }
            rows.push(t.ids);
        }
        let len = rows[0].len();
        let flat: Vec<u32> = rows.into_iter().flatten().collect();
        let ids = Tensor::from_vec(flat, (2 * req.images.len(), len), &self.device)?;
        Ok((ids, warnings))
    }

    /// Runs one batch. `observer` sees progress and, when it asks, intermediate tensors.
    pub fn generate(
        &self,
        req: &BatchRequest,
        observer: &mut dyn Observer,
    ) -> Result<BatchOutput, PipelineError> {
        let factor = self.vae.scale_factor();
        req.validate(&self.limits, factor)?;
        let b = req.images.len();
        let mut timings = StageTimings::default();

        let started = Instant::now();
        let (ids, mut warnings) = self.tokenize(req)?;
        if observer.wants_tensors() {
            observer.tensor("tokens", &ids.to_dtype(DType::I64)?)?;
        }
        let context = self.denoiser.encode_text(&ids, observer)?;
        timings.text_encode = started.elapsed();

        let started = Instant::now();
        let mut scheduler = self.scheduler_config.build(req.scheduler, req.steps)?;
        let seeds: Vec<u64> = req.images.iter().map(|i| i.seed).collect();
        let mut noise = BatchNoise::new(&seeds, &self.device);
        let shape = [
            b,
            self.latent_channels(),
            req.height / factor,
            req.width / factor,
        ];
        let initial = match &req.initial_latents {
            Some(l) => l.to_dtype(DType::F32)?.to_device(&self.device)?,
            None => noise.draw(&shape)?,
        };
        let timesteps = scheduler.timesteps().to_vec();
        if observer.wants_tensors() {
            observer.tensor("latent_init", &initial)?;
            observer.tensor(
                "timesteps",
                &Tensor::new(timesteps.as_slice(), &Device::Cpu)?,
            )?;
        }
        let steps = timesteps.len();
        let start = req.strength.map_or(0, |s| s.start_index(steps));
        let mut init = match batch_inits(&req.images, req.strength)? {
            Some(inits) => Some(InitLatents::encode(
                &self.vae,
                &inits,
                (req.width, req.height),
                &initial,
                &self.device,
            )?),
            None => None,
        };
        let mut latents = match &init {
            Some(init) => init.start_latents(scheduler.as_ref(), start, steps)?,
            None => (initial * scheduler.init_noise_sigma())?,
        };
        scheduler.begin_at(start)?;
        let guidance: Vec<f32> = req.images.iter().map(|i| i.guidance_scale as f32).collect();
        let mut guidance = Tensor::from_vec(guidance, (b, 1, 1, 1), &self.device)?;
        let mut context = context;
        let mut collected = MapCollector::default();
        // Original indices of the images still running.
        let mut active: Vec<usize> = (0..b).collect();
        for (i, &t) in timesteps.iter().enumerate().skip(start) {
            if observer.is_cancelled() {
                return Err(PipelineError::Cancelled);
            }
            let keep: Vec<usize> = (0..active.len())
                .filter(|&p| !observer.is_image_cancelled(active[p]))
                .collect();
            if keep.is_empty() {
                return Err(PipelineError::Cancelled);
            }
            if keep.len() < active.len() {
                let n = active.len();
                let rows = Tensor::from_vec(
                    keep.iter().map(|&p| p as u32).collect::<Vec<_>>(),
                    keep.len(),
                    &self.device,
                )?;
                let doubled: Vec<u32> = keep
                    .iter()
                    .map(|&p| p as u32)
                    .chain(keep.iter().map(|&p| (p + n) as u32))
                    .collect();
                let doubled = Tensor::from_vec(doubled, 2 * keep.len(), &self.device)?;
                latents = latents.index_select(&rows, 0)?;
                guidance = guidance.index_select(&rows, 0)?;
                context = self.denoiser.select_rows(&context, &doubled)?;
                scheduler.retain_rows(&rows)?;
                noise.retain(&keep);
                if let Some(init) = &mut init {
                    init.retain_rows(&rows, &keep)?;
                }
                collected.retain_rows(&doubled)?;
                active = keep.iter().map(|&p| active[p]).collect();
            }
            let b = active.len();
            let doubled = Tensor::cat(&[&latents, &latents], 0)?;
            let model_in = scheduler.scale_model_input(&doubled, i)?;
            let t_batch = Tensor::full(t as f32, 2 * b, &self.device)?;
            let step = DenoiseStep {
                latents: &model_in,
                timesteps: &t_batch,
                guidance: &guidance,
            };
            let dump_maps = i == start && observer.wants_tensors();
            let mut step_maps = Vec::new();
            let capture =
                (dump_maps || req.attention_maps != MapsRequest::Off).then_some(&mut step_maps);
            let eps = self.denoiser.predict_noise(&step, &context, capture)?;
            if dump_maps {
                for (k, map) in step_maps.iter().enumerate() {
                    observer.tensor(&format!("attention_maps_step0_{k}"), map)?;
                }
            }
            collected.push(req.attention_maps, step_maps)?;
            let (uncond, cond) = (eps.narrow(0, 0, b)?, eps.narrow(0, b, b)?);
            let guided = (&uncond + (cond - &uncond)?.broadcast_mul(&guidance)?)?;
            if i == start && observer.wants_tensors() {
                observer.tensor("noise_pred_step0", &guided)?;
            }
            let progress = (i, i + 1 - start, steps - start);
            let preview = preview::predict(
                &*scheduler,
                observer,
                (&guided, &latents),
                progress,
                &active,
            )?;
            latents = scheduler.step(&guided, i, &latents, &mut noise)?;
            if let Some(init) = &init {
                latents = init.restore_known(latents, scheduler.as_ref(), i, steps)?;
            }
            observer.step(i + 1 - start, steps - start);
            if let Some(preview) = preview {
                let preview = match &init {
                    Some(init) => preview.map_x0(|x0, rows| init.paste_known(x0, rows))?,
                    None => preview,
                };
                preview.send(&self.vae, observer)?;
            }
        }
        timings.denoise = started.elapsed();
        if observer.wants_tensors() {
            observer.tensor("latent_final", &latents)?;
        }

        let started = Instant::now();
        let z = self
            .vae
            .unscale_latents(&latents.to_dtype(self.vae.dtype())?)?;
        let image = self
            .vae
            .decode(&z)?
            .to_dtype(DType::F32)?
            .clamp(-1f32, 1f32)?;
        timings.decode = started.elapsed();
        if observer.wants_tensors() {
            observer.tensor("image", &image)?;
        }

        let started = Instant::now();
        let pixels = to_rgb8(&image)?;
        let mut images = Vec::with_capacity(b);
        for (&k, rgb) in active.iter().zip(pixels) {
            let spec = &req.images[k];
            let params = PngParameters {
                prompt: &spec.prompt,
                negative_prompt: &spec.negative_prompt,
                steps: req.steps,
                sampler: sampler_display_name(req.scheduler),
                guidance_scale: spec.guidance_scale,
                seed: spec.seed,
                width: req.width,
                height: req.height,
                model: &self.model_name,
                strength: req.strength.map(|s| s.value()),
            };
            let png = encode_png(&rgb, req.width, req.height, &params)?;
            images.push(GeneratedImage {
                index: k,
                seed: spec.seed,
                width: req.width,
                height: req.height,
                rgb,
                png,
                parameters: params.to_a1111_text(),
                warnings: std::mem::take(&mut warnings[k]),
            });
        }
        timings.png_encode = started.elapsed();
        Ok(BatchOutput {
            images,
            timings,
            attention_maps: collected.finish(steps - start)?,
        })
    }
}

/// `[B, 3, H, W]` in [-1, 1] -> per image, 8-bit RGB row-major (round half away, as numpy).
pub fn to_rgb8(image: &Tensor) -> Result<Vec<Vec<u8>>, PipelineError> {
    let scaled = ((image / 2.0)? + 0.5)?.clamp(0f32, 1f32)?;
    let scaled = (scaled * 255.0)?.round()?.to_dtype(DType::U8)?;
    let hwc = scaled.permute((0, 2, 3, 1))?.contiguous()?;
    let b = hwc.dim(0)?;
    (0..b)
        .map(|i| Ok(hwc.get(i)?.flatten_all()?.to_vec1::<u8>()?))
        .collect()
}
