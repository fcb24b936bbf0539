//! Name mapping for single-file checkpoints in the ORIGINAL Stable Diffusion (LDM) layout, as most
//! community fine-tunes are published: one `.safetensors` holding `model.diffusion_model.*` (UNet),
//! `first_stage_model.*` (VAE) and `cond_stage_model.transformer.*` (CLIP text encoder).
//!
//! This module owns only names: [`map_key`] turns an original key into the diffusers name inside
//! its component (plus the [`KeyTransform`] the tensor needs), [`normalize_diffusers_name`] smooths
//! over naming variants found in diffusers-layout files. It does no I/O; the loader reads tensors.
use std::borrow::Cow;

use candle_core::Tensor;

/// Shape of one UNet down or up block, as far as key numbering is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockLayout {
    /// The block has transformer attentions (`CrossAttnDownBlock2D` / `CrossAttnUpBlock2D`).
    pub has_attention: bool,
    /// The block ends with a down-/upsampler (every block but the last one in SD1.5).
    pub has_resampler: bool,
}

/// Everything about the architecture that the original key numbering depends on.
///
/// Build it from the diffusers configs with [`SingleFileLayout::from_configs`]: UNet
/// `down_block_types`, `up_block_types`, `layers_per_block`; VAE `len(block_out_channels)` and
/// `layers_per_block`. [`SingleFileLayout::sd15`] is the Stable Diffusion 1.5 layout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SingleFileLayout {
    /// UNet down blocks in diffusers order (`down_blocks.{i}`).
    pub down_blocks: Vec<BlockLayout>,
    /// UNet up blocks in diffusers order (`up_blocks.{i}`); each has `layers_per_block + 1` resnets.
    pub up_blocks: Vec<BlockLayout>,
    /// UNet resnets per down block.
    pub layers_per_block: usize,
    /// VAE encoder/decoder blocks (`len(block_out_channels)`).
    pub vae_num_blocks: usize,
    /// VAE resnets per encoder block; decoder blocks have one more.
    pub vae_layers_per_block: usize,
}

impl SingleFileLayout {
    /// Stable Diffusion 1.5: 4 blocks, attention in all but the deepest, 2 layers; VAE 4 blocks, 2 layers.
    pub fn sd15() -> Self {
        let types = [
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "CrossAttnDownBlock2D",
            "DownBlock2D",
        ];
        let up = [
            "UpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
            "CrossAttnUpBlock2D",
        ];
        Self::from_configs(&types, &up, 2, 4, 2)
    }

    /// Builds the layout from diffusers config values. A block has attention when its type name
    /// contains `CrossAttn`; every block but the last has a resampler (as `UNet2DConditionModel` does).
    pub fn from_configs<S: AsRef<str>>(
        down_block_types: &[S],
        up_block_types: &[S],
        layers_per_block: usize,
        vae_num_blocks: usize,
        vae_layers_per_block: usize,
    ) -> Self {
        let blocks = |types: &[S]| {
            let n = types.len();
            let layout = |(i, t): (usize, &S)| BlockLayout {
                has_attention: t.as_ref().contains("CrossAttn"),
                has_resampler: i + 1 < n,
            };
            types.iter().enumerate().map(layout).collect()
        };
        SingleFileLayout {
            down_blocks: blocks(down_block_types),
            up_blocks: blocks(up_block_types),
            layers_per_block,
            vae_num_blocks,
            vae_layers_per_block,
        }
    }
}

/// Which model a mapped tensor belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Component {
    Unet,
    Vae,
    TextEncoder,
}

/// What the loader must do to the stored tensor to get the diffusers tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyTransform {
    /// Use the tensor as stored.
    None,
    /// Original VAE attention q/k/v/proj_out weights are 1x1 convs `[C, C, 1, 1]`; diffusers uses
    /// Linear `[C, C]`. Tensors that are already 2-D are left alone.
    SqueezeConv1x1ToLinear,
}

impl KeyTransform {
    /// The shape the tensor has after the transform, or `None` when the stored shape does not fit.
    pub fn output_shape(self, stored: &[usize]) -> Option<Vec<usize>> {
        match (self, stored) {
            (KeyTransform::None, _) => Some(stored.to_vec()),
            (KeyTransform::SqueezeConv1x1ToLinear, [o, i, 1, 1]) => Some(vec![*o, *i]),
            (KeyTransform::SqueezeConv1x1ToLinear, [o, i]) => Some(vec![*o, *i]),
            (KeyTransform::SqueezeConv1x1ToLinear, _) => None,
        }
    }

    /// Applies the transform to a loaded tensor.
    pub fn apply(self, tensor: Tensor) -> candle_core::Result<Tensor> {
        match self.output_shape(tensor.dims()) {
            Some(shape) if shape.as_slice() == tensor.dims() => Ok(tensor),
            Some(shape) => tensor.reshape(shape),
            None => candle_core::bail!(
                "cannot turn a tensor of shape {:?} into a Linear weight",
                tensor.dims()
            ),
        }
    }
}

/// An original key resolved to a diffusers tensor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MappedKey {
    pub component: Component,
    /// The diffusers name inside the component, e.g. `down_blocks.0.attentions.1.proj_in.weight`.
    pub name: String,
    pub transform: KeyTransform,
}

/// The outcome of mapping one original key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MapResult {
    Mapped(MappedKey),
    /// A key real checkpoints carry that has no diffusers counterpart (EMA copies, noise-schedule
    /// buffers, CLIP `position_ids`, VAE training loss); the loader skips it silently.
    Ignored,
    /// Not a key of this architecture: the loader reports it as unexpected.
    Unknown,
}

const UNET_PREFIX: &str = "model.diffusion_model.";
const VAE_PREFIX: &str = "first_stage_model.";
const CLIP_PREFIX: &str = "cond_stage_model.transformer.";

/// Top-level buffers of the LDM `DDPM` module: the noise schedule and training-loss weights.
const SCHEDULE_BUFFERS: &[&str] = &[
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
    "lvlb_weights",
    "logvar",
];

/// Maps one key of an original-layout checkpoint to its diffusers counterpart.
pub fn map_key(key: &str, layout: &SingleFileLayout) -> MapResult {
    if SCHEDULE_BUFFERS.contains(&key)
        || key.starts_with("model_ema.")
        || key.starts_with("first_stage_model.loss.")
    {
        return MapResult::Ignored;
    }
    let (component, mapped) = if let Some(rest) = key.strip_prefix(UNET_PREFIX) {
        (Component::Unet, map_unet(&split(rest), layout).map(plain))
    } else if let Some(rest) = key.strip_prefix(VAE_PREFIX) {
        (Component::Vae, map_vae(&split(rest), layout))
    } else if let Some(rest) = key.strip_prefix(CLIP_PREFIX) {
        let rest = rest.strip_prefix("text_model.").unwrap_or(rest);
        if rest == "embeddings.position_ids" {
            return MapResult::Ignored;
        }
        (Component::TextEncoder, map_clip(rest).map(plain))
    } else {
        return MapResult::Unknown;
    };
    match mapped {
        Some((name, transform)) => MapResult::Mapped(MappedKey {
            component,
            name,
            transform,
        }),
        None => MapResult::Unknown,
    }
}

/// Normalizes naming variants of diffusers-layout files to the names [`map_key`] produces:
/// text encoders saved without the `text_model.` prefix (recent transformers), and old VAEs with
/// `query`/`key`/`value`/`proj_attn` attention names (their weights are already Linear `[C, C]`).
pub fn normalize_diffusers_name(component: Component, name: &str) -> Cow<'_, str> {
    match component {
        Component::Unet => Cow::Borrowed(name),
        Component::TextEncoder => {
            let bare = ["embeddings.", "encoder.", "final_layer_norm."];
            if bare.iter().any(|p| name.starts_with(p)) {
                Cow::Owned(format!("text_model.{name}"))
            } else {
                Cow::Borrowed(name)
            }
        }
        Component::Vae => {
            let parts = split(name);
            let n = parts.len();
            let renamed = match parts.as_slice() {
                [.., "attentions", _, "query", _] => "to_q",
                [.., "attentions", _, "key", _] => "to_k",
                [.., "attentions", _, "value", _] => "to_v",
                [.., "attentions", _, "proj_attn", _] => "to_out.0",
                _ => return Cow::Borrowed(name),
            };
            Cow::Owned(format!(
                "{}.{renamed}.{}",
                parts[..n - 2].join("."),
                parts[n - 1]
            ))
        }
    }
}

fn split(s: &str) -> Vec<&str> {
    s.split('.').collect()
}

fn plain(name: String) -> (String, KeyTransform) {
    (name, KeyTransform::None)
}

/// `weight` or `bias`: the only leaf names of the convs, norms and linears outside transformer blocks.
fn param<'a>(rest: &[&'a str]) -> Option<&'a str> {
    match rest {
        [p @ ("weight" | "bias")] => Some(p),
        _ => None,
    }
}

fn index(s: &str) -> Option<usize> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

// ----------------------------------------------------------------------------------------------
// UNet
// ----------------------------------------------------------------------------------------------

fn map_unet(parts: &[&str], layout: &SingleFileLayout) -> Option<String> {
    let simple = |target: &str, rest: &[&str]| param(rest).map(|p| format!("{target}.{p}"));
    match parts {
        ["time_embed", "0", rest @ ..] => simple("time_embedding.linear_1", rest),
        ["time_embed", "2", rest @ ..] => simple("time_embedding.linear_2", rest),
        ["label_emb", "0", "0", rest @ ..] => simple("class_embedding.linear_1", rest),
        ["label_emb", "0", "2", rest @ ..] => simple("class_embedding.linear_2", rest),
        ["out", "0", rest @ ..] => simple("conv_norm_out", rest),
        ["out", "2", rest @ ..] => simple("conv_out", rest),
        ["input_blocks", "0", "0", rest @ ..] => simple("conv_in", rest),
        ["input_blocks", n, m, rest @ ..] => map_input_block(index(n)?, m, rest, layout),
        ["middle_block", "0", rest @ ..] => unet_resnet("mid_block.resnets.0", rest),
        ["middle_block", "1", rest @ ..] => unet_attention("mid_block.attentions.0", rest),
        ["middle_block", "2", rest @ ..] => unet_resnet("mid_block.resnets.1", rest),
        ["output_blocks", n, m, rest @ ..] => map_output_block(index(n)?, m, rest, layout),
        _ => None,
    }
}

/// `input_blocks.{n}` for n >= 1: each down block contributes `layers_per_block` resnet(+attention)
/// entries, then one downsampler entry if it has one.
fn map_input_block(n: usize, m: &str, rest: &[&str], layout: &SingleFileLayout) -> Option<String> {
    let lpb = layout.layers_per_block;
    let mut start = 1;
    for (i, block) in layout.down_blocks.iter().enumerate() {
        let len = lpb + usize::from(block.has_resampler);
        // `input_blocks.0` is conv_in, matched before; any other `input_blocks.0.*` is unknown.
        if n < start {
            return None;
        }
        if n < start + len {
            let j = n - start;
            return match (m, rest) {
                ("0", ["op", rest @ ..]) if j == lpb => {
                    param(rest).map(|p| format!("down_blocks.{i}.downsamplers.0.conv.{p}"))
                }
                ("0", _) if j < lpb => unet_resnet(&format!("down_blocks.{i}.resnets.{j}"), rest),
                ("1", _) if j < lpb && block.has_attention => {
                    unet_attention(&format!("down_blocks.{i}.attentions.{j}"), rest)
                }
                _ => None,
            };
        }
        start += len;
    }
    None
}

/// `output_blocks.{n}`: each up block contributes `layers_per_block + 1` entries; the upsampler
/// sits inside the last one, after the resnet and (if any) the attention.
fn map_output_block(n: usize, m: &str, rest: &[&str], layout: &SingleFileLayout) -> Option<String> {
    let per_block = layout.layers_per_block + 1;
    let (i, j) = (n / per_block, n % per_block);
    let block = layout.up_blocks.get(i)?;
    let sampler_slot = if block.has_attention { "2" } else { "1" };
    match (m, rest) {
        ("0", _) => unet_resnet(&format!("up_blocks.{i}.resnets.{j}"), rest),
        ("1", _) if block.has_attention => {
            unet_attention(&format!("up_blocks.{i}.attentions.{j}"), rest)
        }
        (m, ["conv", rest @ ..])
            if m == sampler_slot && j == per_block - 1 && block.has_resampler =>
        {
            param(rest).map(|p| format!("up_blocks.{i}.upsamplers.0.conv.{p}"))
        }
        _ => None,
    }
}

/// LDM `ResBlock` → diffusers `ResnetBlock2D`.
fn unet_resnet(target: &str, rest: &[&str]) -> Option<String> {
    let (layer, rest) = match rest {
        ["in_layers", "0", rest @ ..] => ("norm1", rest),
        ["in_layers", "2", rest @ ..] => ("conv1", rest),
        ["emb_layers", "1", rest @ ..] => ("time_emb_proj", rest),
        ["out_layers", "0", rest @ ..] => ("norm2", rest),
        ["out_layers", "3", rest @ ..] => ("conv2", rest),
        ["skip_connection", rest @ ..] => ("conv_shortcut", rest),
        _ => return None,
    };
    param(rest).map(|p| format!("{target}.{layer}.{p}"))
}

/// LDM `SpatialTransformer` → diffusers `Transformer2DModel`: the inner names are identical.
fn unet_attention(target: &str, rest: &[&str]) -> Option<String> {
    match rest {
        ["norm" | "proj_in" | "proj_out", p] => {
            param(&[p]).map(|p| format!("{target}.{}.{p}", rest[0]))
        }
        ["transformer_blocks", block, .., "weight" | "bias"] if index(block).is_some() => {
            Some(format!("{target}.{}", rest.join(".")))
        }
        _ => None,
    }
}

// ----------------------------------------------------------------------------------------------
// VAE
// ----------------------------------------------------------------------------------------------

fn map_vae(parts: &[&str], layout: &SingleFileLayout) -> Option<(String, KeyTransform)> {
    let nb = layout.vae_num_blocks;
    let name = match parts {
        [c @ ("quant_conv" | "post_quant_conv"), rest @ ..] => format!("{c}.{}", param(rest)?),
        [coder @ ("encoder" | "decoder"), rest @ ..] => {
            let inner = match rest {
                ["mid", "attn_1", rest @ ..] => return vae_attention(coder, rest),
                [l @ ("conv_in" | "conv_out"), rest @ ..] => format!("{l}.{}", param(rest)?),
                ["norm_out", rest @ ..] => format!("conv_norm_out.{}", param(rest)?),
                ["mid", "block_1", rest @ ..] => vae_resnet("mid_block.resnets.0", rest)?,
                ["mid", "block_2", rest @ ..] => vae_resnet("mid_block.resnets.1", rest)?,
                ["down", i, "block", j, rest @ ..] if *coder == "encoder" => {
                    let (i, j) = (index(i)?, index(j)?);
                    (i < nb && j < layout.vae_layers_per_block).then_some(())?;
                    vae_resnet(&format!("down_blocks.{i}.resnets.{j}"), rest)?
                }
                ["down", i, "downsample", "conv", rest @ ..] if *coder == "encoder" => {
                    let i = index(i)?;
                    (i + 1 < nb).then_some(())?;
                    format!("down_blocks.{i}.downsamplers.0.conv.{}", param(rest)?)
                }
                // The LDM decoder numbers its up blocks from the deepest: up.{i} = up_blocks.{nb-1-i}.
                ["up", i, "block", j, rest @ ..] if *coder == "decoder" => {
                    let (i, j) = (index(i)?, index(j)?);
                    (i < nb && j <= layout.vae_layers_per_block).then_some(())?;
                    vae_resnet(&format!("up_blocks.{}.resnets.{j}", nb - 1 - i), rest)?
                }
                ["up", i, "upsample", "conv", rest @ ..] if *coder == "decoder" => {
                    let i = index(i)?;
                    (i >= 1 && i < nb).then_some(())?;
                    format!(
                        "up_blocks.{}.upsamplers.0.conv.{}",
                        nb - 1 - i,
                        param(rest)?
                    )
                }
                _ => return None,
            };
            format!("{coder}.{inner}")
        }
        _ => return None,
    };
    Some(plain(name))
}

/// LDM VAE `ResnetBlock` → diffusers `ResnetBlock2D` (no time embedding).
fn vae_resnet(target: &str, rest: &[&str]) -> Option<String> {
    let layer = match *rest.first()? {
        l @ ("norm1" | "conv1" | "norm2" | "conv2") => l,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{target}.{layer}.{}", param(&rest[1..])?))
}

/// LDM VAE `AttnBlock` (1x1 convs) → diffusers `Attention` (Linear layers).
fn vae_attention(coder: &str, rest: &[&str]) -> Option<(String, KeyTransform)> {
    let (layer, p) = match rest {
        [l, p] => (*l, param(&[p])?),
        _ => return None,
    };
    let target = match layer {
        "norm" => "group_norm",
        "q" => "to_q",
        "k" => "to_k",
        "v" => "to_v",
        "proj_out" => "to_out.0",
        _ => return None,
    };
    let transform = if layer != "norm" && p == "weight" {
        KeyTransform::SqueezeConv1x1ToLinear
    } else {
        KeyTransform::None
    };
    Some((
        format!("{coder}.mid_block.attentions.0.{target}.{p}"),
        transform,
    ))
}

// ----------------------------------------------------------------------------------------------
// CLIP text encoder
// ----------------------------------------------------------------------------------------------

/// The original checkpoint stores the HF `CLIPTextModel` under `cond_stage_model.transformer.`,
/// with or without the `text_model.` level (already stripped here); names are otherwise HF's.
fn map_clip(rest: &str) -> Option<String> {
    let known = ["embeddings.", "encoder.layers.", "final_layer_norm."];
    known
        .iter()
        .any(|p| rest.starts_with(p))
        .then(|| format!("text_model.{rest}"))
}

#[cfg(test)]
mod tests;
