//! The networks: CLIP tokenizer (with its vocabulary type) and text encoder, VAE, and the staged
//! UNet that can run one layer at a time. Tensor names follow diffusers so weights load unchanged.
//! Nothing here reads files: `loading` turns files into these types.
pub mod blocks;
pub mod clip;
pub mod nn;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod vocab;

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
    /// A tokenizer vocabulary without one of CLIP's special tokens.
    #[error("missing the special token {0}")]
    MissingSpecialToken(&'static str),
    /// A BPE merge naming a token the vocabulary lacks (`rank` counts from 1).
    #[error(
        "merge #{rank} ({left:?} {right:?}) uses the token {missing:?}, which is not in the vocabulary"
    )]
    UnknownMergeToken {
        rank: usize,
        left: String,
        right: String,
        missing: String,
    },
    /// A tokenizer definition that cannot be used (a refused `tokenizer.json`, a short merges
    /// list).
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Whether weights in `dtype` can run on `device`: bf16 is refused on the CPU, where candle 0.11
/// has no bf16 matrix multiply (f16 runs there; bf16 runs on CUDA).
pub fn check_precision(
    dtype: candle_core::DType,
    device: &candle_core::Device,
) -> Result<(), String> {
    if dtype == candle_core::DType::BF16 && device.is_cpu() {
        return Err(
            "bf16 needs a GPU: candle has no bf16 matrix multiply on CPU (use f32 or f16)".into(),
        );
    }
    Ok(())
}

/// One Stable Diffusion model's denoising half: its text encoder and UNet.
#[derive(Debug, Clone)]
pub struct SingleUNet {
    pub text_encoder: clip::ClipTextModel,
    pub unet: unet::StagedUNet,
}
