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
use super::tokenizer_files;
use super::weights::{WeightSet, WeightSource};
use crate::models::SingleUNet;
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
#[derive(Debug, Clone)]
struct Configs {
    unet: UNetConfig,
    vae: VaeConfig,
    text: ClipTextConfig,
}

/// Weight sets of the three networks, under diffusers names.
#[derive(Debug, Clone)]
struct Weights {
    unet: WeightSet,
    vae: WeightSet,
    text: WeightSet,
}

/// A model's files opened and checked against its configs, not yet built.
#[derive(Debug, Clone)]
pub struct OpenedModel {
    configs: Configs,
    weights: Weights,
    /// Folder holding `tokenizer/` and `scheduler/` when there is one.
    config_dir: Option<PathBuf>,
    tokenizer_dir: Option<PathBuf>,
}

/// Loads a model from `source` in `dtype` onto `device`.
pub fn load_model(
    source: &ModelSource,
    dtype: DType,
    device: &Device,
) -> Result<LoadedModel, LoadError> {
    open_model(source)?.build(dtype, device)
}

/// Opens the files of `source` (configs parsed and validated, weights mapped, nothing built).
pub fn open_model(source: &ModelSource) -> Result<OpenedModel, LoadError> {
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
    Ok(OpenedModel {
        configs,
        weights,
        config_dir,
        tokenizer_dir: source.tokenizer.clone(),
    })
}

/// Where expert `index` of an official AFA folder lives: expert 0 is the folder's own `unet/` and
/// `text_encoder/`; expert i >= 1 is `additional_unet_{i-1}/` and `additional_text_encoder_{i-1}/`
/// (the official `save_pretrained` enumerates `unets[1:]` from 0). Folders written by our earlier
/// converter used `additional_unet_{i}/`; they are still read, with a warning, when
/// `additional_unet_0/` is absent.
pub fn official_expert_dirs(dir: &Path, index: usize) -> (String, String) {
    if index == 0 {
        return ("unet".to_string(), "text_encoder".to_string());
    }
    let official = index - 1;
    let legacy = !dir.join("additional_unet_0").is_dir()
        && dir.join(format!("additional_unet_{index}")).is_dir();
    let folder = if legacy {
        tracing::warn!(
            folder = %dir.display(),
            "expert {index} read from additional_unet_{index}/ (our earlier layout); the official \
             layout is additional_unet_{official}/: rewrite the folder with `afa convert`"
        );
        index
    } else {
        official
    };
    (
        format!("additional_unet_{folder}"),
        format!("additional_text_encoder_{folder}"),
    )
}

/// Opens expert `index` of an official AFA folder (`official_expert_dirs` says where it lives);
/// the VAE, tokenizer and scheduler are the folder's.
pub fn open_official_expert(dir: &Path, index: usize) -> Result<OpenedModel, LoadError> {
    let (unet_dir, text_dir) = official_expert_dirs(dir, index);
    let part = |sub: &str, component| -> Result<(ComponentFolder, PathBuf), LoadError> {
        let d = dir.join(sub);
        Ok((
            open_component(&d, sub, normalizer(component))?,
            d.join("config.json"),
        ))
    };
    let (unet, up) = part(&unet_dir, Component::Unet)?;
    let (vae, vp) = part("vae", Component::Vae)?;
    let (text, tp) = part(&text_dir, Component::TextEncoder)?;
    let configs = Configs {
        unet: parse_config(&unet.config, &up)?,
        vae: parse_config(&vae.config, &vp)?,
        text: parse_config(&text.config, &tp)?,
    };
    validate_configs(&configs, dir)?;
    Ok(OpenedModel {
        configs,
        weights: Weights {
            unet: unet.weights,
            vae: vae.weights,
            text: text.weights,
        },
        config_dir: Some(dir.to_path_buf()),
        tokenizer_dir: None,
    })
}

impl OpenedModel {
    /// The UNet's config.
    pub fn unet_config(&self) -> &UNetConfig {
        &self.configs.unet
    }

    /// The text encoder's config.
    pub fn text_config(&self) -> &ClipTextConfig {
        &self.configs.text
    }

    /// Content hash of the UNet and text-encoder weight files (identifies a member).
    pub fn weight_hash(&self) -> String {
        let mut hashes: Vec<String> = self
            .weights
            .unet
            .files()
            .iter()
            .chain(self.weights.text.files().iter())
            .map(|f| f.content_hash())
            .collect();
        hashes.dedup();
        if hashes.len() == 1 {
            hashes.remove(0)
        } else {
            format!(
                "{:016x}",
                xxhash_rust::xxh3::xxh3_64(hashes.join(",").as_bytes())
            )
        }
    }

    /// Builds every part.
    pub fn build(&self, dtype: DType, device: &Device) -> Result<LoadedModel, LoadError> {
        let SingleUNet { unet, text_encoder } = self.build_denoiser(dtype, device)?;
        let vae = self.build_vae(dtype, device)?;
        Ok(LoadedModel {
            unet,
            text_encoder,
            vae,
            tokenizer: self.tokenizer()?,
            scheduler: self.scheduler_config()?,
        })
    }

    /// Builds the UNet and text encoder, reporting every tensor problem of a component at once.
    pub fn build_denoiser(&self, dtype: DType, device: &Device) -> Result<SingleUNet, LoadError> {
        let model_err = |e: crate::models::ModelError| candle_core::Error::Msg(e.to_string());
        let unet = self.weights.unet.build(dtype, device, |vb| {
            StagedUNet::new(&self.configs.unet, vb).map_err(model_err)
        })?;
        let text_encoder = self.weights.text.build(dtype, device, |vb| {
            ClipTextModel::new(&self.configs.text, vb)
        })?;
        Ok(SingleUNet { text_encoder, unet })
    }

    /// Builds the VAE.
    pub fn build_vae(&self, dtype: DType, device: &Device) -> Result<AutoencoderKL, LoadError> {
        self.weights.vae.build(dtype, device, |vb| {
            AutoencoderKL::new(&self.configs.vae, vb)
        })
    }

    /// The tokenizer: the configured folder, the model's `tokenizer/`, or the embedded CLIP one.
    pub fn tokenizer(&self) -> Result<ClipTokenizer, LoadError> {
        let dir = self.tokenizer_dir.clone().or_else(|| {
            self.config_dir
                .as_ref()
                .map(|d| d.join("tokenizer"))
                .filter(|d| d.is_dir())
        });
        match dir {
            Some(dir) => tokenizer_files::read_tokenizer_dir(&dir),
            None => tokenizer_files::embedded_tokenizer(),
        }
    }

    /// The model's `scheduler/scheduler_config.json`, or SD1.5's settings.
    pub fn scheduler_config(&self) -> Result<SchedulerConfig, LoadError> {
        match self
            .config_dir
            .as_ref()
            .map(|d| d.join("scheduler").join("scheduler_config.json"))
        {
            Some(p) if p.is_file() => {
                let text = std::fs::read_to_string(&p).map_err(|e| LoadError::io(&p, e))?;
                SchedulerConfig::from_json(&text).map_err(|e| LoadError::format(&p, e.to_string()))
            }
            _ => Ok(SchedulerConfig::default()),
        }
    }
}

/// The weighted parameter average of `models`' UNets and text encoders (the `merge`
/// baseline): theta = sum_n w_n theta_n over every tensor. Weights are normalised to sum to 1.
pub fn merge_models(
    models: &[&OpenedModel],
    weights: &[f64],
    dtype: DType,
    device: &Device,
) -> Result<SingleUNet, LoadError> {
    let first = models
        .first()
        .ok_or_else(|| LoadError::format(Path::new("merge"), "no models to merge"))?;
    let total: f64 = weights.iter().sum();
    if weights.len() != models.len()
        || weights.iter().any(|w| !w.is_finite() || *w < 0.0)
        || total <= 0.0
    {
        return Err(LoadError::format(
            Path::new("merge"),
            format!(
                "{} merge weights for {} members; they must be non-negative with a positive sum",
                weights.len(),
                models.len()
            ),
        ));
    }
    let average = |sets: Vec<&WeightSet>| -> Result<WeightSetAverage, LoadError> {
        let mut out = HashMap::new();
        for name in sets[0].names() {
            let mut acc: Option<candle_core::Tensor> = None;
            for (set, w) in sets.iter().zip(weights) {
                let t = (set.load(name, DType::F32, &Device::Cpu)? * (w / total))?;
                acc = Some(match acc {
                    None => t,
                    Some(a) => (a + t)?,
                });
            }
            if let Some(t) = acc {
                out.insert(name.to_string(), t.to_dtype(dtype)?.to_device(device)?);
            }
        }
        Ok(out)
    };
    let unet = average(models.iter().map(|m| &m.weights.unet).collect())?;
    let text = average(models.iter().map(|m| &m.weights.text).collect())?;
    let model_err =
        |e: crate::models::ModelError| LoadError::format(Path::new("merge"), e.to_string());
    let unet = StagedUNet::new(
        &first.configs.unet,
        candle_nn::VarBuilder::from_tensors(unet, dtype, device),
    )
    .map_err(model_err)?;
    let text_encoder = ClipTextModel::new(
        &first.configs.text,
        candle_nn::VarBuilder::from_tensors(text, dtype, device),
    )?;
    Ok(SingleUNet { text_encoder, unet })
}

type WeightSetAverage = HashMap<String, candle_core::Tensor>;

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
