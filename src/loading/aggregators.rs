//! Aggregator checkpoints in both layouts:
//! - the official one (`afa-method.md` §9): `aggregator_{k}/aggregator.safetensors` plus
//!   `aggregator_{k}/config.json` for every aggregation point k, `model_config.json`;
//! - ours: one `.safetensors` file with tensors `aggregator_{k}.<name>` and a metadata header
//!   naming the members (names and weight hashes, in order), the channel list and the shared
//!   hyper-parameters, so a checkpoint cannot silently be used with other members.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use super::LoadError;
use super::diffusers::read_json;
use super::safetensors_file::SafetensorsFile;
use super::weights::WeightSet;
use crate::ensemble::{Aggregator, AggregatorConfig};

/// Value of the `format` metadata key of our aggregator files.
pub const FORMAT: &str = "afa-aggregators";
const FORMAT_VERSION: &str = "1";

/// A member as an aggregator checkpoint records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MemberStamp {
    pub name: String,
    /// Content hash of the member's UNet and text-encoder weights.
    pub hash: String,
}

/// The aggregators of one ensemble, not yet built.
#[derive(Debug, Clone)]
pub struct AggregatorCheckpoint {
    pub configs: Vec<AggregatorConfig>,
    pub weights: Vec<WeightSet>,
    /// The members it was trained for (empty for official folders, which record none).
    pub members: Vec<MemberStamp>,
    pub source: PathBuf,
}

/// Hyper-parameters shared by all points, as stored in our metadata.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct SharedConfig {
    hidden_size: usize,
    num_experts: usize,
    num_layers: usize,
    num_attn_heads: usize,
    cross_attn_dim: usize,
    temb_channels: usize,
    norm_num_groups: usize,
}

impl SharedConfig {
    fn of(c: &AggregatorConfig) -> Self {
        Self {
            hidden_size: c.hidden_size,
            num_experts: c.num_experts,
            num_layers: c.num_layers,
            num_attn_heads: c.num_attn_heads,
            cross_attn_dim: c.cross_attn_dim,
            temb_channels: c.temb_channels,
            norm_num_groups: c.norm_num_groups,
        }
    }

    fn with_channels(self, in_channels: usize) -> AggregatorConfig {
        AggregatorConfig {
            in_channels,
            hidden_size: self.hidden_size,
            num_experts: self.num_experts,
            num_layers: self.num_layers,
            num_attn_heads: self.num_attn_heads,
            cross_attn_dim: self.cross_attn_dim,
            temb_channels: self.temb_channels,
            norm_num_groups: self.norm_num_groups,
        }
    }
}

fn meta<'a>(file: &'a SafetensorsFile, key: &str) -> Result<&'a str, LoadError> {
    file.metadata().get(key).map(String::as_str).ok_or_else(|| {
        LoadError::format(
            file.path(),
            format!("aggregator file has no `{key}` metadata"),
        )
    })
}

fn meta_json<T: for<'de> Deserialize<'de>>(
    file: &SafetensorsFile,
    key: &str,
) -> Result<T, LoadError> {
    serde_json::from_str(meta(file, key)?)
        .map_err(|e| LoadError::format(file.path(), format!("bad `{key}` metadata: {e}")))
}

/// True when `path` is an official AFA folder (has `model_config.json` and `aggregator_0/`).
pub fn is_official_folder(path: &Path) -> bool {
    path.join("model_config.json").is_file() && path.join("aggregator_0").is_dir()
}

impl AggregatorCheckpoint {
    /// Opens one of our aggregator files.
    pub fn open_file(path: &Path) -> Result<Self, LoadError> {
        let file = Arc::new(SafetensorsFile::open(path)?);
        if meta(&file, "format")? != FORMAT {
            return Err(LoadError::format(path, format!("not an {FORMAT} file")));
        }
        let version = meta(&file, "format_version")?;
        if version != FORMAT_VERSION {
            return Err(LoadError::format(
                path,
                format!("unsupported format_version {version}"),
            ));
        }
        let members: Vec<MemberStamp> = meta_json(&file, "members")?;
        let channels: Vec<usize> = meta_json(&file, "channels")?;
        let shared: SharedConfig = meta_json(&file, "config")?;
        let configs: Vec<AggregatorConfig> =
            channels.iter().map(|&c| shared.with_channels(c)).collect();
        let weights = (0..configs.len())
            .map(|k| {
                let prefix = format!("aggregator_{k}.");
                WeightSet::from_file(format!("aggregator {k}"), file.clone(), |key| {
                    key.strip_prefix(&prefix).map(str::to_string)
                })
            })
            .collect::<Vec<_>>();
        let claimed: usize = weights.iter().map(WeightSet::len).sum();
        let stray = file.names().count() - claimed;
        if stray > 0 {
            return Err(LoadError::format(
                path,
                format!(
                    "{stray} tensor(s) belong to no aggregator_0..{} prefix",
                    configs.len()
                ),
            ));
        }
        Ok(Self {
            configs,
            weights,
            members,
            source: path.to_path_buf(),
        })
    }

    /// Opens the aggregators of an official AFA folder.
    pub fn open_official(dir: &Path) -> Result<Self, LoadError> {
        let model_config = read_json(&dir.join("model_config.json"))?;
        let count = model_config
            .get("num_aggregators")
            .and_then(|v| v.as_u64())
            .ok_or_else(|| {
                LoadError::format(&dir.join("model_config.json"), "no num_aggregators")
            })? as usize;
        let mut configs = Vec::with_capacity(count);
        let mut weights = Vec::with_capacity(count);
        for k in 0..count {
            let sub = dir.join(format!("aggregator_{k}"));
            let cfg_path = sub.join("config.json");
            let cfg: AggregatorConfig = serde_json::from_value(read_json(&cfg_path)?)
                .map_err(|e| LoadError::format(&cfg_path, format!("bad aggregator config: {e}")))?;
            configs.push(cfg);
            let file = Arc::new(SafetensorsFile::open(&sub.join("aggregator.safetensors"))?);
            weights.push(WeightSet::from_file(format!("aggregator {k}"), file, |n| {
                Some(n.to_string())
            }));
        }
        Ok(Self {
            configs,
            weights,
            members: Vec::new(),
            source: dir.to_path_buf(),
        })
    }

    /// Opens either layout.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        if path.is_dir() {
            Self::open_official(path)
        } else {
            Self::open_file(path)
        }
    }

    /// Refuses a checkpoint made for other members or another architecture, naming what
    /// differs. `members`: the ensemble's members in order; `channels`: its point channels.
    pub fn check_against(
        &self,
        members: &[MemberStamp],
        channels: &[usize],
    ) -> Result<(), LoadError> {
        let err = |reason: String| Err(LoadError::format(&self.source, reason));
        let experts = self.configs.first().map(|c| c.num_experts).unwrap_or(0);
        if experts != members.len() {
            return err(format!(
                "aggregators were made for {experts} members, the ensemble has {}",
                members.len()
            ));
        }
        if self.configs.len() != channels.len() {
            return err(format!(
                "{} aggregators for {} aggregation points",
                self.configs.len(),
                channels.len()
            ));
        }
        for (k, (c, &expected)) in self.configs.iter().zip(channels).enumerate() {
            if c.in_channels != expected {
                return err(format!(
                    "channel list differs at aggregation point {k}: checkpoint {}, members {expected}",
                    c.in_channels
                ));
            }
        }
        if !self.members.is_empty() {
            for (n, (mine, theirs)) in self.members.iter().zip(members).enumerate() {
                if mine.hash != theirs.hash {
                    return err(format!(
                        "member {n} differs: the aggregators were trained with '{}' (weights {}), the ensemble has '{}' (weights {})",
                        mine.name, mine.hash, theirs.name, theirs.hash
                    ));
                }
            }
        }
        Ok(())
    }

    /// Builds the aggregators.
    pub fn build(&self, dtype: DType, device: &Device) -> Result<Vec<Aggregator>, LoadError> {
        self.configs
            .iter()
            .zip(&self.weights)
            .map(|(cfg, w)| w.build(dtype, device, |vb| Aggregator::new(cfg, vb)))
            .collect()
    }

    /// Every tensor of aggregator k, by name.
    pub fn tensors(&self, k: usize) -> Result<Vec<(String, Tensor)>, LoadError> {
        let set = &self.weights[k];
        set.names()
            .into_iter()
            .map(|n| Ok((n.to_string(), set.load(n, DType::F32, &Device::Cpu)?)))
            .collect()
    }
}

/// Writes aggregators in our single-file format.
/// `tensors[k]`: aggregator k's named tensors; `configs[k]`: its config.
pub fn write_aggregator_file(
    path: &Path,
    tensors: &[Vec<(String, Tensor)>],
    configs: &[AggregatorConfig],
    members: &[MemberStamp],
) -> Result<(), LoadError> {
    let shared = configs
        .first()
        .map(SharedConfig::of)
        .ok_or_else(|| LoadError::format(path, "no aggregators to write"))?;
    if configs.iter().any(|c| SharedConfig::of(c) != shared) {
        return Err(LoadError::format(
            path,
            "aggregators differ in more than their input channels",
        ));
    }
    let json =
        |v: serde_json::Result<String>| v.map_err(|e| LoadError::format(path, e.to_string()));
    let channels: Vec<usize> = configs.iter().map(|c| c.in_channels).collect();
    let metadata: HashMap<String, String> = [
        ("format".to_string(), FORMAT.to_string()),
        ("format_version".to_string(), FORMAT_VERSION.to_string()),
        ("members".to_string(), json(serde_json::to_string(members))?),
        (
            "channels".to_string(),
            json(serde_json::to_string(&channels))?,
        ),
        ("config".to_string(), json(serde_json::to_string(&shared))?),
    ]
    .into_iter()
    .collect();
    let named: Vec<(String, &Tensor)> = tensors
        .iter()
        .enumerate()
        .flat_map(|(k, ts)| {
            ts.iter()
                .map(move |(n, t)| (format!("aggregator_{k}.{n}"), t))
        })
        .collect();
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        std::fs::create_dir_all(parent).map_err(|e| LoadError::io(parent, e))?;
    }
    safetensors::serialize_to_file(named, Some(metadata), path)
        .map_err(|e| LoadError::format(path, format!("writing safetensors: {e}")))
}

/// Writes aggregators in the official per-point folder layout under `dir` (aggregators and
/// `model_config.json` only; the member folders are the caller's business).
pub fn write_official_aggregators(
    dir: &Path,
    tensors: &[Vec<(String, Tensor)>],
    configs: &[AggregatorConfig],
) -> Result<(), LoadError> {
    for (k, (ts, cfg)) in tensors.iter().zip(configs).enumerate() {
        let sub = dir.join(format!("aggregator_{k}"));
        std::fs::create_dir_all(&sub).map_err(|e| LoadError::io(&sub, e))?;
        let file = sub.join("aggregator.safetensors");
        let named: Vec<(&str, &Tensor)> = ts.iter().map(|(n, t)| (n.as_str(), t)).collect();
        safetensors::serialize_to_file(named, None, &file)
            .map_err(|e| LoadError::format(&file, format!("writing safetensors: {e}")))?;
        let cfg_path = sub.join("config.json");
        let text = serde_json::to_string_pretty(cfg)
            .map_err(|e| LoadError::format(&cfg_path, e.to_string()))?;
        std::fs::write(&cfg_path, text).map_err(|e| LoadError::io(&cfg_path, e))?;
    }
    let num_models = configs.first().map(|c| c.num_experts).unwrap_or(0);
    let mc = dir.join("model_config.json");
    let text =
        serde_json::json!({"num_models": num_models, "num_aggregators": configs.len()}).to_string();
    std::fs::write(&mc, text).map_err(|e| LoadError::io(&mc, e))
}
