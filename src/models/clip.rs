//! The CLIP text encoder of Stable Diffusion 1.5 (transformers `CLIPTextModel`): token and
//! position embeddings, pre-LayerNorm causal transformer layers, final LayerNorm. Its config is
//! `text_encoder/config.json`. Written here rather than taken from candle-transformers so that
//! batches of several prompts are exact (each row equals that prompt alone).
//!
//! Tensor names are transformers' with the `text_model.` prefix. The model does not read the
//! `text_model.embeddings.position_ids` buffer some files carry (positions are `0..T`): the
//! loader must drop it (or `WeightSet::build` reports it as unexpected).
use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Embedding, VarBuilder};
use serde::Deserialize;

use super::ModelError;
use super::nn::{self, LayerNorm, Linear};

/// Activation of the MLP (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClipActivation {
    /// `x * sigmoid(1.702 x)` (SD1.5's OpenAI CLIP).
    QuickGelu,
    /// Exact erf GELU (OpenCLIP, SD2).
    Gelu,
}

fn default_eps() -> f64 {
    1e-5
}
fn default_max_positions() -> usize {
    77
}

/// transformers `CLIPTextConfig` (`text_encoder/config.json`). Unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    #[serde(default = "default_max_positions")]
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    #[serde(default = "default_eps")]
    pub layer_norm_eps: f64,
}

impl ClipTextConfig {
    /// Stable Diffusion 1.5's text encoder (OpenAI CLIP ViT-L/14).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: default_eps(),
        }
    }

    /// Rejects inconsistent settings.
    pub fn validate(&self) -> std::result::Result<(), ModelError> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(ModelError::Config {
                component: "text_encoder",
                reason: format!(
                    "hidden_size {} not divisible by num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            });
        }
        Ok(())
    }
}

/// `self_attn`: multi-head causal self-attention with biased `q/k/v/out_proj`.
#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    scale: f64,
}

impl ClipAttention {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.hidden_size;
        Ok(Self {
            q_proj: nn::linear(d, d, true, vb.pp("q_proj"))?,
            k_proj: nn::linear(d, d, true, vb.pp("k_proj"))?,
            v_proj: nn::linear(d, d, true, vb.pp("v_proj"))?,
            out_proj: nn::linear(d, d, true, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            scale: 1.0 / ((d / cfg.num_attention_heads) as f64).sqrt(),
        })
    }

    /// `x`: `[B, T, D]`, `mask`: `[T, T]` additive causal mask (f32) -> `[B, T, D]`.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let q =
            nn::split_heads(&(self.q_proj.forward(x)? * self.scale)?, self.heads)?.contiguous()?;
        let k = nn::split_heads(&self.k_proj.forward(x)?, self.heads)?;
        let v = nn::split_heads(&self.v_proj.forward(x)?, self.heads)?.contiguous()?;
        let scores = q.matmul(&k.transpose(2, 3)?.contiguous()?)?;
        // Softmax in f32 whatever the weights' dtype, as transformers does.
        let dtype = scores.dtype();
        let scores = scores.to_dtype(DType::F32)?.broadcast_add(mask)?;
        let probs = nn::softmax_last_dim(&scores)?.to_dtype(dtype)?;
        self.out_proj.forward(&nn::merge_heads(&probs.matmul(&v)?)?)
    }
}

/// `mlp`: `fc1`, activation, `fc2`.
#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    act: ClipActivation,
}

impl ClipMlp {
    /// `x`: `[B, T, D]` -> `[B, T, D]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.fc1.forward(x)?;
        let h = match self.act {
            ClipActivation::QuickGelu => (&h * candle_nn::ops::sigmoid(&(&h * 1.702)?)?)?,
            ClipActivation::Gelu => h.gelu_erf()?,
        };
        self.fc2.forward(&h)
    }
}

/// One pre-LayerNorm encoder layer.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        let (d, eps) = (cfg.hidden_size, cfg.layer_norm_eps);
        Ok(Self {
            layer_norm1: LayerNorm::new(d, eps, vb.pp("layer_norm1"))?,
            self_attn: ClipAttention::new(cfg, vb.pp("self_attn"))?,
            layer_norm2: LayerNorm::new(d, eps, vb.pp("layer_norm2"))?,
            mlp: ClipMlp {
                fc1: nn::linear(d, cfg.intermediate_size, true, vb.pp("mlp.fc1"))?,
                fc2: nn::linear(cfg.intermediate_size, d, true, vb.pp("mlp.fc2"))?,
                act: cfg.hidden_act,
            },
        })
    }

    /// `x`: `[B, T, D]`, `mask`: `[T, T]` -> `[B, T, D]`.
    fn forward(&self, x: &Tensor, mask: &Tensor) -> Result<Tensor> {
        let x = (x + self
            .self_attn
            .forward(&self.layer_norm1.forward(x)?, mask)?)?;
        &x + self.mlp.forward(&self.layer_norm2.forward(&x)?)?
    }
}

/// transformers `CLIPTextModel` up to `last_hidden_state` (no pooling, no projection).
#[derive(Debug, Clone)]
pub struct ClipTextModel {
    token_embedding: Embedding,
    position_embedding: Tensor,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    config: ClipTextConfig,
}

impl ClipTextModel {
    /// Builds the model from `vb` with names `text_model.embeddings.*`,
    /// `text_model.encoder.layers.{i}.*`, `text_model.final_layer_norm.*`.
    pub fn new(cfg: &ClipTextConfig, vb: VarBuilder) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::wrap)?;
        let vb = vb.pp("text_model");
        let emb = vb.pp("embeddings");
        let token_embedding =
            candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, emb.pp("token_embedding"))?;
        let position_embedding = emb.get(
            (cfg.max_position_embeddings, cfg.hidden_size),
            "position_embedding.weight",
        )?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(cfg, vb.pp(format!("encoder.layers.{i}"))))
            .collect::<Result<_>>()?;
        Ok(Self {
            token_embedding,
            position_embedding,
            layers,
            final_layer_norm: LayerNorm::new(
                cfg.hidden_size,
                cfg.layer_norm_eps,
                vb.pp("final_layer_norm"),
            )?,
            config: cfg.clone(),
        })
    }

    /// The config the model was built from.
    pub fn config(&self) -> &ClipTextConfig {
        &self.config
    }

    /// `ids`: `[B, T]` u32 token ids (T <= max_position_embeddings, 77 for SD) ->
    /// `last_hidden_state` `[B, T, hidden]` (after `final_layer_norm`), causal attention, no
    /// padding mask (as Stable Diffusion uses it).
    pub fn forward(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        if t > self.config.max_position_embeddings {
            candle_core::bail!(
                "text encoder: {t} tokens exceed max_position_embeddings {}",
                self.config.max_position_embeddings
            );
        }
        let tokens = self.token_embedding.forward(ids)?;
        let positions = self.position_embedding.narrow(0, 0, t)?;
        let mut x = tokens.broadcast_add(&positions)?;
        let mask = causal_mask(t, ids.device())?;
        for layer in &self.layers {
            x = layer.forward(&x, &mask)?;
        }
        self.final_layer_norm.forward(&x)
    }
}

/// `[T, T]` f32: 0 on and below the diagonal, -inf above.
fn causal_mask(t: usize, device: &Device) -> Result<Tensor> {
    let data: Vec<f32> = (0..t)
        .flat_map(|i| (0..t).map(move |j| if j > i { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(data, (t, t), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causal_mask_is_lower_triangular() -> Result<()> {
        let m = causal_mask(3, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(m[0], [0.0, f32::NEG_INFINITY, f32::NEG_INFINITY]);
        assert_eq!(m[2], [0.0, 0.0, 0.0]);
        Ok(())
    }

    #[test]
    fn config_parses_activation() {
        let json = r#"{"vocab_size":10,"hidden_size":4,"intermediate_size":8,
            "num_hidden_layers":1,"num_attention_heads":2,"hidden_act":"gelu","extra":1}"#;
        let cfg: ClipTextConfig = serde_json::from_str(json).unwrap();
        assert_eq!(cfg.hidden_act, ClipActivation::Gelu);
        assert_eq!(cfg.layer_norm_eps, 1e-5);
        assert!(
            serde_json::from_str::<ClipTextConfig>(&json.replace("\"gelu\"", "\"relu\"")).is_err()
        );
    }
}
