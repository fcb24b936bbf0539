//! Whole ensembles from disk: the official AFA folder layout (`afa-method.md` §9), or members
//! declared separately (each a diffusers folder or single file) plus one of our aggregator
//! files. Identical members (same weight hash) are built once and shared.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use super::LoadError;
use super::aggregators::{AggregatorCheckpoint, MemberStamp};
use super::checkpoint::{OpenedModel, merge_models, open_official_expert};
use super::diffusers::read_json;
use crate::ensemble::points::aggregation_points;
use crate::ensemble::{Ensemble, Member};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::vae::AutoencoderKL;
use crate::schedulers::SchedulerConfig;

/// A loaded ensemble with the parts it shares (VAE, tokenizer, scheduler settings).
#[derive(Debug)]
pub struct LoadedEnsemble {
    pub ensemble: Ensemble,
    pub vae: AutoencoderKL,
    pub tokenizer: ClipTokenizer,
    pub scheduler: SchedulerConfig,
    /// The members as aggregator checkpoints record them.
    pub stamps: Vec<MemberStamp>,
}

/// How to build an ensemble.
#[derive(Debug, Clone)]
pub struct EnsembleLoadOptions {
    pub dtype: DType,
    pub device: Device,
    /// Build the `merge` baseline with these per-member weights.
    pub merge_weights: Option<Vec<f64>>,
    /// Use these aggregators instead of the ensemble's own (our file or an official folder).
    pub aggregators: Option<PathBuf>,
}

/// Opened members plus where the shared parts come from.
pub struct EnsembleParts {
    /// Member names and their opened files, in order.
    pub members: Vec<(String, OpenedModel)>,
    /// The aggregators (required for the `afa` mode; other modes work without).
    pub aggregators: Option<AggregatorCheckpoint>,
    /// Source of VAE, tokenizer and scheduler settings (member 0 when `None`).
    pub shared: Option<OpenedModel>,
}

/// Number of experts of an official folder (`model_config.json`'s `num_models`).
fn official_expert_count(dir: &Path) -> Result<usize, LoadError> {
    let path = dir.join("model_config.json");
    read_json(&path)?
        .get("num_models")
        .and_then(|v| v.as_u64())
        .map(|n| n as usize)
        .ok_or_else(|| LoadError::format(&path, "no num_models"))
}

/// Opens an official AFA folder.
pub fn open_official(dir: &Path) -> Result<EnsembleParts, LoadError> {
    let n = official_expert_count(dir)?;
    let members = (0..n)
        .map(|i| Ok((format!("expert{i}"), open_official_expert(dir, i)?)))
        .collect::<Result<Vec<_>, LoadError>>()?;
    Ok(EnsembleParts {
        members,
        aggregators: Some(AggregatorCheckpoint::open_official(dir)?),
        shared: None,
    })
}

impl EnsembleParts {
    /// The member stamps (names and weight hashes).
    pub fn stamps(&self) -> Vec<MemberStamp> {
        self.members
            .iter()
            .map(|(name, m)| MemberStamp {
                name: name.clone(),
                hash: m.weight_hash(),
            })
            .collect()
    }

    /// Builds everything, checking that the aggregators fit the members.
    pub fn build(self, options: &EnsembleLoadOptions) -> Result<LoadedEnsemble, LoadError> {
        let (dtype, device) = (options.dtype, &options.device);
        let first = &self
            .members
            .first()
            .ok_or_else(|| LoadError::format(Path::new("ensemble"), "an ensemble needs members"))?
            .1;
        let channels: Vec<usize> = aggregation_points(first.unet_config())
            .iter()
            .map(|p| p.channels)
            .collect();
        let stamps = self.stamps();
        let checkpoint = match &options.aggregators {
            Some(path) => Some(AggregatorCheckpoint::open(path)?),
            None => self.aggregators,
        };
        let aggregators = match &checkpoint {
            Some(c) => {
                c.check_against(&stamps, &channels)?;
                c.build(dtype, device)?
            }
            None => Vec::new(),
        };
        let mut built: Vec<Member> = Vec::with_capacity(self.members.len());
        for ((name, opened), stamp) in self.members.iter().zip(&stamps) {
            let member = match built.iter().find(|m| m.weight_hash == stamp.hash) {
                Some(same) => Member {
                    name: name.clone(),
                    ..same.clone()
                },
                None => {
                    let parts = opened.build_denoiser(dtype, device)?;
                    Member {
                        name: name.clone(),
                        weight_hash: stamp.hash.clone(),
                        unet: Arc::new(parts.unet),
                        text_encoder: Arc::new(parts.text_encoder),
                    }
                }
            };
            built.push(member);
        }
        let merged = match &options.merge_weights {
            Some(w) => {
                let models: Vec<&OpenedModel> = self.members.iter().map(|(_, m)| m).collect();
                Some(merge_models(&models, w, dtype, device)?)
            }
            None => None,
        };
        let shared = self.shared.as_ref().unwrap_or(first);
        let ensemble = Ensemble::new(built, aggregators, merged)
            .map_err(|e| LoadError::format(Path::new("ensemble"), e.to_string()))?;
        Ok(LoadedEnsemble {
            ensemble,
            vae: shared.build_vae(dtype, device)?,
            tokenizer: shared.tokenizer()?,
            scheduler: shared.scheduler_config()?,
            stamps,
        })
    }
}

/// Opens ensemble `entry` of `registry` (official folder, or members + aggregators).
pub fn open_declared(
    registry: &crate::config::ModelRegistry,
    entry: &crate::config::EnsembleEntry,
) -> Result<EnsembleParts, LoadError> {
    use super::checkpoint::{ModelSource, open_model};
    if let Some(dir) = &entry.official {
        let mut parts = open_official(dir)?;
        if let Some(path) = &entry.aggregators {
            parts.aggregators = Some(AggregatorCheckpoint::open(path)?);
        }
        return Ok(parts);
    }
    let members = entry
        .members
        .iter()
        .map(|name| {
            let m = registry.member(name).ok_or_else(|| {
                LoadError::format(&registry.source, format!("unknown member '{name}'"))
            })?;
            let source = ModelSource {
                model: m.path.clone(),
                model_config: m.model_config.clone(),
                ..Default::default()
            };
            Ok((name.clone(), open_model(&source)?))
        })
        .collect::<Result<Vec<_>, LoadError>>()?;
    let aggregators = match &entry.aggregators {
        Some(path) => Some(AggregatorCheckpoint::open(path)?),
        None => None,
    };
    let shared = match &entry.shared {
        Some(dir) => Some(open_model(&ModelSource {
            model: dir.clone(),
            ..Default::default()
        })?),
        None => None,
    };
    Ok(EnsembleParts {
        members,
        aggregators,
        shared,
    })
}

/// Checks an ensemble without building it: member files, configs and the aggregators' fit to
/// the members (count, order by weight hash, channel list). Used by `afa check-models`.
pub fn check_parts(parts: &EnsembleParts) -> Result<(), LoadError> {
    let first = &parts
        .members
        .first()
        .ok_or_else(|| LoadError::format(Path::new("ensemble"), "an ensemble needs members"))?
        .1;
    for (name, m) in &parts.members[1..] {
        if m.unet_config().block_out_channels != first.unet_config().block_out_channels {
            return Err(LoadError::format(
                Path::new(name),
                format!("member '{name}' has a different UNet architecture"),
            ));
        }
    }
    if let Some(c) = &parts.aggregators {
        let channels: Vec<usize> = aggregation_points(first.unet_config())
            .iter()
            .map(|p| p.channels)
            .collect();
        c.check_against(&parts.stamps(), &channels)?;
    }
    Ok(())
}
