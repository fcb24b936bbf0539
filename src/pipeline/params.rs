//! The parameters of one batch and their validation. Every field is checked and a violation
//! names the field; nothing is silently ignored.
use std::sync::Arc;

use candle_core::Tensor;

use super::PipelineError;
use super::init_image::{InitImage, Strength};
use crate::schedulers::SchedulerKind;

/// One image of a batch. Prompts, seed and guidance may differ between images of one batch.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSpec {
    pub prompt: String,
    pub negative_prompt: String,
    pub seed: u64,
    pub guidance_scale: f64,
    /// Image-to-image / inpainting: what the image starts from (the batch has a strength).
    pub init: Option<Arc<InitImage>>,
}

/// A homogeneous batch: everything that must be shared by the images run together.
#[derive(Debug, Clone)]
pub struct BatchRequest {
    pub images: Vec<ImageSpec>,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub scheduler: SchedulerKind,
    /// Image-to-image: the fraction of the schedule run from each image's init image.
    pub strength: Option<Strength>,
    /// Use these `[B, C, H/f, W/f]` as the initial noise instead of seeded draws (parity
    /// tooling).
    pub initial_latents: Option<Tensor>,
    /// Which expert-weight maps to return (ensembles only).
    pub attention_maps: MapsRequest,
}

/// Which attention maps a request wants back: none, or those of some aggregation points, per
/// step or averaged over the steps. Maps of points not asked for are never kept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum MapsRequest {
    #[default]
    Off,
    /// Every step's maps.
    PerStep(MapPoints),
    /// The mean over steps.
    Averaged(MapPoints),
}

impl MapsRequest {
    /// The points kept (`None` when off).
    pub fn points(&self) -> Option<MapPoints> {
        match self {
            MapsRequest::Off => None,
            MapsRequest::PerStep(p) | MapsRequest::Averaged(p) => Some(*p),
        }
    }
}

/// A set of aggregation points (bit k: point k; ensembles have at most 64).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct MapPoints(u64);

impl Default for MapPoints {
    fn default() -> Self {
        Self::ALL
    }
}

impl MapPoints {
    /// Every point.
    pub const ALL: MapPoints = MapPoints(u64::MAX);
    /// Most points a set can name.
    pub const MAX_POINTS: usize = 64;

    /// Just these points (`None` if one is `MAX_POINTS` or more).
    pub fn only(points: &[usize]) -> Option<Self> {
        points
            .iter()
            .try_fold(0u64, |acc, &k| {
                (k < Self::MAX_POINTS).then(|| acc | (1u64 << k))
            })
            .map(MapPoints)
    }

    pub fn contains(self, k: usize) -> bool {
        k < Self::MAX_POINTS && self.0 & (1u64 << k) != 0
    }

    /// The kept points among `0..total`, in order.
    pub fn among(self, total: usize) -> Vec<usize> {
        (0..total).filter(|&k| self.contains(k)).collect()
    }
}

/// Bounds enforced on every request.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Limits {
    pub min_side: usize,
    pub max_side: usize,
    /// Upper bound on width * height.
    pub max_pixels: usize,
    pub max_steps: usize,
    pub max_guidance: f64,
    pub max_batch: usize,
    /// Upper bound on prompt length in bytes (CLIP reads 75 tokens; this only bounds work).
    pub max_prompt_bytes: usize,
    /// Upper bound on the attention maps one request may hold and return (their f32 values
    /// while the job runs plus every asked-for encoding, base64 included).
    pub max_map_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            min_side: 64,
            max_side: 2048,
            max_pixels: 1024 * 1024,
            max_steps: 500,
            max_guidance: 50.0,
            max_batch: 16,
            max_prompt_bytes: 16 * 1024,
            max_map_bytes: 64 << 20,
        }
    }
}

impl BatchRequest {
    /// Checks the request against `limits`; `multiple` is the VAE's downscale factor.
    pub fn validate(&self, limits: &Limits, multiple: usize) -> Result<(), PipelineError> {
        if self.images.is_empty() {
            return Err(PipelineError::invalid(
                "n",
                "a batch needs at least one image",
            ));
        }
        if self.images.len() > limits.max_batch {
            return Err(PipelineError::invalid(
                "n",
                format!("at most {} images per batch", limits.max_batch),
            ));
        }
        for (field, side) in [("width", self.width), ("height", self.height)] {
            if side < limits.min_side || side > limits.max_side {
                return Err(PipelineError::invalid(
                    field,
                    format!(
                        "{side} is outside {}..={} pixels",
                        limits.min_side, limits.max_side
                    ),
                ));
            }
            if side % multiple != 0 {
                return Err(PipelineError::invalid(
                    field,
                    format!("{side} is not a multiple of {multiple}"),
                ));
            }
        }
        if self.width * self.height > limits.max_pixels {
            return Err(PipelineError::TooLarge {
                field: "width",
                reason: format!(
                    "{}x{} exceeds the pixel budget of {} pixels",
                    self.width, self.height, limits.max_pixels
                ),
            });
        }
        if self.steps == 0 || self.steps > limits.max_steps {
            return Err(PipelineError::invalid(
                "steps",
                format!("steps must be 1..={}, got {}", limits.max_steps, self.steps),
            ));
        }
        for image in &self.images {
            let g = image.guidance_scale;
            if !g.is_finite() || g < 0.0 || g > limits.max_guidance {
                return Err(PipelineError::invalid(
                    "guidance_scale",
                    format!(
                        "guidance_scale must be 0..={}, got {g}",
                        limits.max_guidance
                    ),
                ));
            }
            for (field, text) in [
                ("prompt", &image.prompt),
                ("negative_prompt", &image.negative_prompt),
            ] {
                if text.len() > limits.max_prompt_bytes {
                    return Err(PipelineError::invalid(
                        field,
                        format!(
                            "{field} is {} bytes; at most {}",
                            text.len(),
                            limits.max_prompt_bytes
                        ),
                    ));
                }
            }
        }
        let inits = super::init_image::batch_inits(&self.images, self.strength)?;
        for init in inits.iter().flatten() {
            init.check(self.width, self.height)?;
        }
        if let Some(latents) = &self.initial_latents {
            let (h, w) = (self.height / multiple, self.width / multiple);
            let dims = latents.dims();
            if dims.len() != 4 || dims[0] != self.images.len() || dims[2] != h || dims[3] != w {
                return Err(PipelineError::invalid(
                    "latents",
                    format!(
                        "shape {dims:?} does not fit {} images of {h}x{w} latents",
                        self.images.len()
                    ),
                ));
            }
        }
        Ok(())
    }
}

/// The sampler's name as A1111 writes it in image metadata.
pub fn sampler_display_name(kind: SchedulerKind) -> &'static str {
    match kind {
        SchedulerKind::Ddim => "DDIM",
        SchedulerKind::EulerAncestral => "Euler a",
        SchedulerKind::DpmPp2m => "DPM++ 2M",
        SchedulerKind::DpmPp2mKarras => "DPM++ 2M Karras",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request() -> BatchRequest {
        BatchRequest {
            images: vec![ImageSpec {
                prompt: "a cat".into(),
                negative_prompt: String::new(),
                seed: 1,
                guidance_scale: 7.5,
                init: None,
            }],
            width: 512,
            height: 512,
            steps: 20,
            scheduler: SchedulerKind::Ddim,
            strength: None,
            initial_latents: None,
            attention_maps: MapsRequest::Off,
        }
    }

    fn field_of(r: &BatchRequest) -> &'static str {
        match r.validate(&Limits::default(), 8) {
            Err(PipelineError::Invalid { field, .. }) => field,
            other => panic!("expected invalid, got {other:?}"),
        }
    }

    #[test]
    fn valid_request_passes() {
        request().validate(&Limits::default(), 8).unwrap();
    }

    #[test]
    fn each_bad_field_is_named() {
        let mut r = request();
        r.width = 513;
        assert_eq!(field_of(&r), "width");
        let mut r = request();
        r.height = 8;
        assert_eq!(field_of(&r), "height");
        let mut r = request();
        r.steps = 0;
        assert_eq!(field_of(&r), "steps");
        let mut r = request();
        r.images[0].guidance_scale = f64::NAN;
        assert_eq!(field_of(&r), "guidance_scale");
        let mut r = request();
        r.images.clear();
        assert_eq!(field_of(&r), "n");
        let mut r = request();
        r.images[0].prompt = "x".repeat(100_000);
        assert_eq!(field_of(&r), "prompt");
    }
}
