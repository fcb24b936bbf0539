//! The networks: CLIP tokenizer and text encoder, VAE, and the staged UNet that can run one
//! layer at a time. Tensor names follow diffusers so weights load unchanged.
pub mod blocks;
pub mod clip;
pub mod nn;
pub mod tokenizer;
pub mod unet;
pub mod vae;

/// Errors of the models layer.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error("unsupported {component} config: {reason}")]
    Config {
        component: &'static str,
        reason: String,
    },
    #[error("{0}")]
    Shape(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// One Stable Diffusion model's denoising half: its text encoder and UNet.
#[derive(Debug, Clone)]
pub struct SingleUNet {
    pub text_encoder: clip::ClipTextModel,
    pub unet: unet::StagedUNet,
}
