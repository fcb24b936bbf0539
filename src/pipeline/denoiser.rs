//! The noise predictor behind the sampler loop. `SingleUNet` is one model (its own text
//! encoder and UNet); the AFA ensemble implements the same trait.
use candle_core::{DType, Tensor};

use super::PipelineError;
use super::generate::Observer;
use crate::models::clip::ClipTextModel;
use crate::models::unet::StagedUNet;

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

    /// `latents`: `[2B, C, h, w]` f32 (already scaled by the sampler), `timesteps`: `[2B]` f32
    /// -> noise prediction `[2B, C, h, w]` f32.
    fn predict_noise(
        &self,
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Self::Context,
    ) -> Result<Tensor, PipelineError>;
}

/// One Stable Diffusion model: its text encoder and UNet.
#[derive(Debug, Clone)]
pub struct SingleUNet {
    pub text_encoder: ClipTextModel,
    pub unet: StagedUNet,
}

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
        latents: &Tensor,
        timesteps: &Tensor,
        context: &Tensor,
    ) -> Result<Tensor, PipelineError> {
        let dtype = self.unet.dtype();
        let eps = self.unet.forward(
            &latents.to_dtype(dtype)?,
            timesteps,
            &context.to_dtype(dtype)?,
        )?;
        Ok(eps.to_dtype(DType::F32)?)
    }
}
