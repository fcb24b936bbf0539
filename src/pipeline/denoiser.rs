//! The noise predictor behind the sampler loop. `SingleUNet` is one model (its own text
//! encoder and UNet); the AFA ensemble implements the same trait.
use candle_core::{DType, Tensor};

use super::PipelineError;
use super::generate::Observer;

/// Predicts noise for the classifier-free-guidance batch.
pub trait Denoiser {
    /// Text conditioning in whatever form the denoiser needs.
    type Context;

    /// `ids`: `[2B, T]` u32 token ids, unconditional rows first. Reports `text_emb`
    /// (and any per-model embeddings) to the observer.
    fn encode_text(
        &self,
        ids: &Tensor,
        observer: &mut dyn Observer,
    ) -> Result<Self::Context, PipelineError>;

    /// Noise prediction `[2B, C, h, w]` f32 for `step`. When `maps` is given, denoisers that
    /// aggregate experts push their per-point expert weights (`[2B, N, h, w]` each) into it.
    fn predict_noise(
        &self,
        step: &DenoiseStep,
        context: &Self::Context,
        maps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor, PipelineError>;

    /// The context restricted to these rows (`[R]` u32 indices into the `2B` rows), used when
    /// images of a running batch are cancelled.
    fn select_rows(
        &self,
        context: &Self::Context,
        rows: &Tensor,
    ) -> Result<Self::Context, PipelineError>;
}

/// The inputs of one denoiser call.
#[derive(Debug, Clone, Copy)]
pub struct DenoiseStep<'a> {
    /// `[2B, C, h, w]` f32, unconditional half first, already scaled by the sampler.
    pub latents: &'a Tensor,
    /// `[2B]` f32.
    pub timesteps: &'a Tensor,
    /// Per-image guidance scale `[B, 1, 1, 1]` f32 (for denoisers that guide internally).
    pub guidance: &'a Tensor,
}

pub use crate::models::SingleUNet;

impl Denoiser for SingleUNet {
    type Context = Tensor;

    fn encode_text(
        &self,
        ids: &Tensor,
        observer: &mut dyn Observer,
    ) -> Result<Tensor, PipelineError> {
        let emb = self.text_encoder.forward(ids)?;
        if observer.wants_tensors() {
            observer.tensor("text_emb", &emb)?;
        }
        Ok(emb)
    }

    fn predict_noise(
        &self,
        step: &DenoiseStep,
        context: &Tensor,
        _maps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor, PipelineError> {
        let dtype = self.unet.dtype();
        let latents = step.latents.to_dtype(dtype)?;
        let eps = self
            .unet
            .forward(&latents, step.timesteps, &context.to_dtype(dtype)?)?;
        Ok(eps.to_dtype(DType::F32)?)
    }
    fn select_rows(&self, context: &Tensor, rows: &Tensor) -> Result<Tensor, PipelineError> {
        Ok(context.index_select(rows, 0)?)
    }
}

impl Denoiser for crate::ensemble::EnsembleDenoiser<'_> {
    type Context = crate::ensemble::EnsembleContext;

    fn encode_text(
        &self,
        ids: &Tensor,
        observer: &mut dyn Observer,
    ) -> Result<Self::Context, PipelineError> {
        use crate::ensemble::EnsembleContext;
        let context = self.encode(ids)?;
        if observer.wants_tensors() {
            match &context {
                EnsembleContext::One(emb) => observer.tensor("text_emb", emb)?,
                EnsembleContext::Experts { per_expert, mean } => {
                    for (n, emb) in per_expert.iter().enumerate() {
                        observer.tensor(&format!("text_emb_e{n}"), emb)?;
                    }
                    observer.tensor("text_emb_mean", mean)?;
                    observer.tensor("text_emb", mean)?;
                }
            }
        }
        Ok(context)
    }

    fn predict_noise(
        &self,
        step: &DenoiseStep,
        context: &Self::Context,
        maps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor, PipelineError> {
        Ok(self.predict(step.latents, step.timesteps, step.guidance, context, maps)?)
    }

    fn select_rows(
        &self,
        context: &Self::Context,
        rows: &Tensor,
    ) -> Result<Self::Context, PipelineError> {
        use crate::ensemble::EnsembleContext;
        Ok(match context {
            EnsembleContext::One(t) => EnsembleContext::One(t.index_select(rows, 0)?),
            EnsembleContext::Experts { per_expert, mean } => EnsembleContext::Experts {
                per_expert: per_expert
                    .iter()
                    .map(|t| t.index_select(rows, 0))
                    .collect::<candle_core::Result<_>>()?,
                mean: mean.index_select(rows, 0)?,
            },
        })
    }
}
