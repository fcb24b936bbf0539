//! `UNetConfig`: the subset of diffusers' `UNet2DConditionModel` config that SD1.x/2.x-style
//! UNets use, read from `unet/config.json`. Unsupported options are rejected by name.
use serde::Deserialize;

use crate::models::ModelError;

/// A value given either once for all blocks or once per block.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(untagged)]
pub enum PerBlock {
    One(usize),
    Each(Vec<usize>),
}

impl PerBlock {
    /// The value for block `i` of `n`.
    pub fn get(&self, i: usize) -> usize {
        match self {
            PerBlock::One(v) => *v,
            PerBlock::Each(v) => v[i],
        }
    }
    fn len_ok(&self, n: usize) -> bool {
        match self {
            PerBlock::One(_) => true,
            PerBlock::Each(v) => v.len() == n,
        }
    }
}

fn default_block_out() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_down() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn default_up() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}
fn one(v: usize) -> PerBlock {
    PerBlock::One(v)
}

/// diffusers `UNet2DConditionModel` config (defaults are diffusers' defaults = SD1.5).
#[derive(Debug, Clone, Deserialize)]
pub struct UNetConfig {
    #[serde(default = "four")]
    pub in_channels: usize,
    #[serde(default = "four")]
    pub out_channels: usize,
    #[serde(default = "default_block_out")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_down")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up")]
    pub up_block_types: Vec<String>,
    #[serde(default = "two")]
    pub layers_per_block: usize,
    #[serde(default = "default_cross")]
    pub cross_attention_dim: usize,
    /// In SD1.x configs this is really the number of heads (a known diffusers quirk).
    #[serde(default = "default_head_dim")]
    pub attention_head_dim: PerBlock,
    #[serde(default)]
    pub num_attention_heads: Option<PerBlock>,
    #[serde(default = "default_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_eps")]
    pub norm_eps: f64,
    #[serde(default)]
    pub use_linear_projection: bool,
    #[serde(default = "yes")]
    pub flip_sin_to_cos: bool,
    #[serde(default)]
    pub freq_shift: f64,
    #[serde(default = "default_transformer_layers")]
    pub transformer_layers_per_block: PerBlock,
    #[serde(default = "one_f")]
    pub mid_block_scale_factor: f64,
    #[serde(default = "one_u")]
    pub downsample_padding: usize,
    #[serde(default)]
    pub center_input_sample: bool,
    #[serde(default)]
    pub mid_block_type: Option<String>,
    #[serde(default)]
    pub class_embed_type: Option<String>,
    #[serde(default)]
    pub addition_embed_type: Option<String>,
    #[serde(default)]
    pub time_cond_proj_dim: Option<usize>,
    #[serde(default)]
    pub encoder_hid_dim: Option<usize>,
    #[serde(default)]
    pub only_cross_attention: serde_json::Value,
    #[serde(default)]
    pub dual_cross_attention: bool,
    #[serde(default)]
    pub resnet_time_scale_shift: Option<String>,
    #[serde(default)]
    pub time_embedding_type: Option<String>,
    #[serde(default)]
    pub conv_in_kernel: Option<usize>,
    #[serde(default)]
    pub conv_out_kernel: Option<usize>,
}

fn four() -> usize {
    4
}
fn two() -> usize {
    2
}
fn yes() -> bool {
    true
}
fn one_f() -> f64 {
    1.0
}
fn one_u() -> usize {
    1
}
fn default_cross() -> usize {
    768
}
fn default_head_dim() -> PerBlock {
    one(8)
}
fn default_groups() -> usize {
    32
}
fn default_eps() -> f64 {
    1e-5
}
fn default_transformer_layers() -> PerBlock {
    one(1)
}

impl Default for UNetConfig {
    fn default() -> Self {
        serde_json::from_str("{}").expect("defaults deserialize")
    }
}

/// Kind of a down or up block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockKind {
    /// Resnets only (`DownBlock2D` / `UpBlock2D`).
    Plain,
    /// Resnets each followed by a transformer (`CrossAttn*Block2D`).
    CrossAttention,
}

impl UNetConfig {
    /// Stable Diffusion 1.5's UNet.
    pub fn sd15() -> Self {
        Self::default()
    }

    /// Attention heads of block `i` (diffusers: `num_attention_heads or attention_head_dim`).
    pub fn heads(&self, i: usize) -> usize {
        match &self.num_attention_heads {
            Some(h) => h.get(i),
            None => self.attention_head_dim.get(i),
        }
    }

    /// Width of the time embedding (`4 * block_out_channels[0]`).
    pub fn temb_channels(&self) -> usize {
        4 * self.block_out_channels[0]
    }

    /// Kind of down block `i`.
    pub fn down_kind(&self, i: usize) -> BlockKind {
        block_kind(&self.down_block_types[i])
    }

    /// Kind of up block `i`.
    pub fn up_kind(&self, i: usize) -> BlockKind {
        block_kind(&self.up_block_types[i])
    }

    /// Rejects configurations this implementation does not run, naming the option.
    pub fn validate(&self) -> Result<(), ModelError> {
        let bad = |reason: String| ModelError::Config {
            component: "unet",
            reason,
        };
        let n = self.block_out_channels.len();
        if n == 0 || self.down_block_types.len() != n || self.up_block_types.len() != n {
            return Err(bad(format!(
                "block_out_channels ({n}), down_block_types ({}) and up_block_types ({}) must have the same non-zero length",
                self.down_block_types.len(),
                self.up_block_types.len()
            )));
        }
        for t in &self.down_block_types {
            if t != "CrossAttnDownBlock2D" && t != "DownBlock2D" {
                return Err(bad(format!("down block type {t} is not supported")));
            }
        }
        for t in &self.up_block_types {
            if t != "CrossAttnUpBlock2D" && t != "UpBlock2D" {
                return Err(bad(format!("up block type {t} is not supported")));
            }
        }
        if let Some(m) = self
            .mid_block_type
            .as_ref()
            .filter(|m| *m != "UNetMidBlock2DCrossAttn")
        {
            return Err(bad(format!("mid block type {m} is not supported")));
        }
        let unsupported = [
            ("class_embed_type", self.class_embed_type.is_some()),
            ("addition_embed_type", self.addition_embed_type.is_some()),
            ("time_cond_proj_dim", self.time_cond_proj_dim.is_some()),
            ("encoder_hid_dim", self.encoder_hid_dim.is_some()),
            ("dual_cross_attention", self.dual_cross_attention),
            (
                "only_cross_attention",
                !matches!(
                    self.only_cross_attention,
                    serde_json::Value::Null | serde_json::Value::Bool(false)
                ),
            ),
            (
                "resnet_time_scale_shift",
                self.resnet_time_scale_shift
                    .as_deref()
                    .is_some_and(|s| s != "default"),
            ),
            (
                "time_embedding_type",
                self.time_embedding_type
                    .as_deref()
                    .is_some_and(|s| s != "positional"),
            ),
            (
                "conv_in_kernel",
                self.conv_in_kernel.is_some_and(|k| k != 3),
            ),
            (
                "conv_out_kernel",
                self.conv_out_kernel.is_some_and(|k| k != 3),
            ),
        ];
        if let Some((name, _)) = unsupported.iter().find(|(_, on)| *on) {
            return Err(bad(format!("option {name} is not supported")));
        }
        for (name, v) in [
            ("attention_head_dim", Some(&self.attention_head_dim)),
            ("num_attention_heads", self.num_attention_heads.as_ref()),
            (
                "transformer_layers_per_block",
                Some(&self.transformer_layers_per_block),
            ),
        ] {
            if v.is_some_and(|v| !v.len_ok(n)) {
                return Err(bad(format!("{name} must have one entry per block ({n})")));
            }
        }
        for (i, &c) in self.block_out_channels.iter().enumerate() {
            if c % self.norm_num_groups != 0 {
                return Err(bad(format!(
                    "block_out_channels[{i}] = {c} is not divisible by norm_num_groups {}",
                    self.norm_num_groups
                )));
            }
            let heads = self.heads(i);
            if heads == 0 || c % heads != 0 {
                return Err(bad(format!(
                    "block {i}: {c} channels do not split into {heads} heads"
                )));
            }
        }
        if self.layers_per_block == 0 {
            return Err(bad("layers_per_block must be at least 1".into()));
        }
        Ok(())
    }
}

fn block_kind(t: &str) -> BlockKind {
    if t.starts_with("CrossAttn") {
        BlockKind::CrossAttention
    } else {
        BlockKind::Plain
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_sd15() {
        let c = UNetConfig::sd15();
        c.validate().unwrap();
        assert_eq!(c.block_out_channels, vec![320, 640, 1280, 1280]);
        assert_eq!(c.heads(0), 8);
        assert_eq!(c.temb_channels(), 1280);
        assert_eq!(c.down_kind(3), BlockKind::Plain);
        assert_eq!(c.up_kind(0), BlockKind::Plain);
    }

    #[test]
    fn unsupported_options_are_named() {
        let c: UNetConfig = serde_json::from_str(r#"{"class_embed_type": "timestep"}"#).unwrap();
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("class_embed_type")
        );
        let c: UNetConfig =
            serde_json::from_str(r#"{"down_block_types": ["X","Y","Z","W"]}"#).unwrap();
        assert!(c.validate().unwrap_err().to_string().contains("X"));
    }
}
