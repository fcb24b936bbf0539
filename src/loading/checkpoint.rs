//! One Stable Diffusion model from disk: a diffusers folder, or a single `.safetensors` file
//! with the original SD key names (configs then come from `model_config`, a diffusers folder
//! describing the architecture, or SD1.5's built-in configs; the tokenizer from `tokenizer`,
//! that folder, or the embedded CLIP vocabulary). An optional separate VAE file overrides the
//! embedded VAE. This is where files meet model constructors, so `loading` builds `models`.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};
use serde::de::DeserializeOwned;

use super::LoadError;
use super::diffusers::{ComponentFolder, is_pipeline_folder, open_component, read_json};
use super::safetensors_file::{SafetensorsFile, refuse_pickle};
use super::single_file::{
    Component, MapResult, SingleFileLayout, map_key, normalize_diffusers_name,
};
use super::tokenizer_files::BpeVocab;
use super::weights::{WeightSet, WeightSource};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::unet::{StagedUNet, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::schedulers::SchedulerConfig;

/// Where a model's files are.
#[derive(Debug, Clone, Default)]
pub struct ModelSource {
    /// A diffusers folder or a single `.safetensors` checkpoint.
    pub model: PathBuf,
    /// For single files: a diffusers folder whose `*/config.json` (and `tokenizer/`) describe
    /// the architecture. SD1.5 when absent.
    pub model_config: Option<PathBuf>,
    /// A VAE `.safetensors` (diffusers or original names) replacing the model's own.
    pub vae: Option<PathBuf>,
    /// A tokenizer folder (`vocab.json` + `merges.txt`) replacing the model's own.
    pub tokenizer: Option<PathBuf>,
}

/// Every part of a loaded model.
#[derive(Debug, Clone)]
pub struct LoadedModel {
    pub unet: StagedUNet,
    pub text_encoder: ClipTextModel,
    pub vae: AutoencoderKL,
    pub tokenizer: ClipTokenizer,
    pub scheduler: SchedulerConfig,
}

/// Configs of the three networks.
struct Configs {
    unet: UNetConfig,
    vae: VaeConfig,
    text: ClipTextConfig,
}

/// Weight sets of the three networks, under diffusers names.
struct Weights {
    unet: WeightSet,
    vae: WeightSet,
    text: WeightSet,
}

/// Loads a model from `source` in `dtype` onto `device`.
pub fn load_model(
    source: &ModelSource,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    let path = &source.model;
    refuse_pickle(path)?;
    let (configs, mut weights, config_dir) = if is_pipeline_folder(path) {
        let (c, w) = open_pipeline_folder(path)?;
        (c, w, Some(path.clone()))
    } else if path.is_file() {
        let configs = match &source.model_config {
            Some(dir) => configs_from_folder(dir)?,
            None => Configs {
                unet: UNetConfig::sd15(),
                vae: VaeConfig::sd15(),
                text: ClipTextConfig::sd15(),
            },
        };
        let weights = open_single_file(path, &configs)?;
        (configs, weights, source.model_config.clone())
    } else if path.is_dir() {
        return Err(LoadError::format(
            path,
            "not a diffusers folder (no model_index.json)",
        ));
    } else {
        return Err(LoadError::format(path, "no such file or folder"));
    };
    if let Some(vae) = &source.vae {
        weights.vae = open_vae_file(vae, &configs)?;
    }
    let tokenizer_dir = source.tokenizer.clone().or_else(|| {
        config_dir
            .as_ref()
            .map(|d| d.join("tokenizer"))
            .filter(|d| d.is_dir())
    });
    let vocab = match tokenizer_dir {
        Some(dir) => BpeVocab::from_dir(&dir)?,
        None => BpeVocab::embedded_default()?,
    };
    let scheduler = match config_dir.map(|d| d.join("scheduler").join("scheduler_config.json")) {
        Some(p) if p.is_file() => {
            let text = std::fs::read_to_string(&p).map_err(|e| LoadError::io(&p, e))?;
            SchedulerConfig::from_json(&text).map_err(|e| LoadError::format(&p, e.to_string()))?
        }
        _ => SchedulerConfig::default(),
    };
    build_models(&configs, &weights, dtype, device).map(|(unet, text_encoder, vae)| LoadedModel {
        unet,
        text_encoder,
        vae,
        tokenizer: ClipTokenizer::new(vocab),
        scheduler,
    })
}

/// Builds the networks, reporting every tensor problem of a component at once.
fn build_models(
    configs: &Configs,
    weights: &Weights,
    dtype: DType,
    device: &Device,
) -> Result<(StagedUNet, ClipTextModel, AutoencoderKL), LoadError> {
    let model_err = |e: crate::models::ModelError| candle_core::Error::Msg(e.to_string());
    let unet = weights.unet.build(dtype, device, |vb| {
        StagedUNet::new(&configs.unet, vb).map_err(model_err)
    })?;
    let text = weights
        .text
        .build(dtype, device, |vb| ClipTextModel::new(&configs.text, vb))?;
    let vae = weights
        .vae
        .build(dtype, device, |vb| AutoencoderKL::new(&configs.vae, vb))?;
    Ok((unet, text, vae))
}

fn parse_config<T: DeserializeOwned>(
    value: &serde_json::Value,
    path: &Path,
) -> Result<T, LoadError> {
    serde_json::from_value(value.clone())
        .map_err(|e| LoadError::format(path, format!("bad config: {e}")))
}

fn configs_from_folder(dir: &Path) -> Result<Configs, LoadError> {
    let read = |sub: &str| {
        let p = dir.join(sub).join("config.json");
        read_json(&p).map(|v| (v, p))
    };
    let (u, up) = read("unet")?;
    let (v, vp) = read("vae")?;
    let (t, tp) = read("text_encoder")?;
    let configs = Configs {
        unet: parse_config(&u, &up)?,
        vae: parse_config(&v, &vp)?,
        text: parse_config(&t, &tp)?,
    };
    validate_configs(&configs, dir)?;
    Ok(configs)
}

fn validate_configs(c: &Configs, at: &Path) -> Result<(), LoadError> {
    let fmt = |e: crate::models::ModelError| LoadError::format(at, e.to_string());
    c.unet.validate().map_err(fmt)?;
    c.vae.validate().map_err(fmt)?;
    c.text.validate().map_err(fmt)
}

/// Diffusers name normaliser for one component (old VAE attention names, text encoders
/// without the `text_model.` prefix), dropping buffers no model uses.
fn normalizer(component: Component) -> impl Fn(&str) -> Option<String> {
    move |key: &str| {
        if key.ends_with("position_ids") {
            return None;
        }
        Some(normalize_diffusers_name(component, key).into_owned())
    }
}

fn open_pipeline_folder(dir: &Path) -> Result<(Configs, Weights), LoadError> {
    let part = |sub: &str, component| -> Result<(ComponentFolder, PathBuf), LoadError> {
        let d = dir.join(sub);
        Ok((
            open_component(&d, sub, normalizer(component))?,
            d.join("config.json"),
        ))
    };
    let (unet, up) = part("unet", Component::Unet)?;
    let (vae, vp) = part("vae", Component::Vae)?;
    let (text, tp) = part("text_encoder", Component::TextEncoder)?;
    let configs = Configs {
        unet: parse_config(&unet.config, &up)?,
        vae: parse_config(&vae.config, &vp)?,
        text: parse_config(&text.config, &tp)?,
    };
    validate_configs(&configs, dir)?;
    let weights = Weights {
        unet: unet.weights,
        vae: vae.weights,
        text: text.weights,
    };
    Ok((configs, weights))
}

fn layout(c: &Configs) -> SingleFileLayout {
    SingleFileLayout::from_configs(
        &c.unet.down_block_types,
        &c.unet.up_block_types,
        c.unet.layers_per_block,
        c.vae.block_out_channels.len(),
        c.vae.layers_per_block,
    )
}

/// Splits a single-file checkpoint into the three components under diffusers names.
fn open_single_file(path: &Path, configs: &Configs) -> Result<Weights, LoadError> {
    let file = Arc::new(SafetensorsFile::open(path)?);
    let layout = layout(configs);
    let mut parts: HashMap<Component, HashMap<String, WeightSource>> = HashMap::new();
    let mut unknown = Vec::new();
    for key in file.names() {
        match map_key(key, &layout) {
            MapResult::Mapped(m) => {
                let source = WeightSource {
                    file: file.clone(),
                    key: key.to_string(),
                    transform: m.transform,
                };
                parts.entry(m.component).or_default().insert(m.name, source);
            }
            MapResult::Ignored => {}
            MapResult::Unknown => unknown.push(key.to_string()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(LoadError::TensorMismatch {
            component: format!("{} (single-file checkpoint)", path.display()),
            missing: vec![],
            unexpected: unknown,
            mis_shaped: vec![],
        });
    }
    let mut take =
        |c: Component, name: &str| WeightSet::new(name, parts.remove(&c).unwrap_or_default());
    Ok(Weights {
        unet: take(Component::Unet, "unet"),
        vae: take(Component::Vae, "vae"),
        text: take(Component::TextEncoder, "text_encoder"),
    })
}

/// A standalone VAE file: diffusers names (`encoder.down_blocks...`) or original names, with or
/// without the `first_stage_model.` prefix (`encoder.down.0...`).
fn open_vae_file(path: &Path, configs: &Configs) -> Result<WeightSet, LoadError> {
    let file = Arc::new(SafetensorsFile::open(path)?);
    let original = file.names().any(|k| {
        k.starts_with("first_stage_model.")
            || k.starts_with("encoder.down.")
            || k.starts_with("decoder.up.")
    });
    if !original {
        return Ok(WeightSet::from_file(
            "vae",
            file,
            normalizer(Component::Vae),
        ));
    }
    let layout = layout(configs);
    let mut entries = HashMap::new();
    let mut unknown = Vec::new();
    for key in file.names() {
        let full = if key.starts_with("first_stage_model.") {
            key.to_string()
        } else {
            format!("first_stage_model.{key}")
        };
        match map_key(&full, &layout) {
            MapResult::Mapped(m) if m.component == Component::Vae => {
                let source = WeightSource {
                    file: file.clone(),
                    key: key.to_string(),
                    transform: m.transform,
                };
                entries.insert(m.name, source);
            }
            MapResult::Ignored => {}
            _ => unknown.push(key.to_string()),
        }
    }
    if !unknown.is_empty() {
        unknown.sort();
        return Err(LoadError::TensorMismatch {
            component: format!("{} (VAE file)", path.display()),
            missing: vec![],
            unexpected: unknown,
            mis_shaped: vec![],
        });
    }
    Ok(WeightSet::new("vae", entries))
}
