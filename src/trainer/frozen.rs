//! The frozen parts of an ensemble being trained or probed: the members (UNets and text
//! encoders), the VAE, tokenizer and noise schedule. Their weights are plain tensors, never
//! `Var`s: they get no gradients, but gradients flow through their operations.
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device};

use super::{Result, TrainerError};
use crate::ensemble::Member;
use crate::loading::aggregators::{MemberStamp, is_official_folder};
use crate::loading::checkpoint::{ModelSource, open_model};
use crate::loading::ensemble::{EnsembleParts, open_official};
use crate::models::tokenizer::ClipTokenizer;
use crate::models::vae::AutoencoderKL;
use crate::schedulers::SchedulerConfig;

/// The frozen parts of the ensemble.
pub struct Frozen {
    pub members: Vec<Member>,
    pub vae: AutoencoderKL,
    pub tokenizer: ClipTokenizer,
    pub scheduler: SchedulerConfig,
    /// The members as checkpoints record them.
    pub stamps: Vec<MemberStamp>,
    pub device: Device,
}

impl Frozen {
    /// Builds the members (f32; identical members shared), and the VAE, tokenizer and
    /// scheduler of `parts.shared` or member 0.
    pub fn from_parts(parts: &EnsembleParts, device: &Device) -> Result<Self> {
        let first = &parts
            .members
            .first()
            .ok_or_else(|| TrainerError::Invalid("the ensemble has no members".into()))?
            .1;
        let stamps = parts.stamps();
        let mut members: Vec<Member> = Vec::with_capacity(parts.members.len());
        for ((name, opened), stamp) in parts.members.iter().zip(&stamps) {
            let member = match members.iter().find(|m| m.weight_hash == stamp.hash) {
                Some(same) => Member {
                    name: name.clone(),
                    ..same.clone()
                },
                None => {
                    let built = opened.build_denoiser(DType::F32, device)?;
                    Member {
                        name: name.clone(),
                        weight_hash: stamp.hash.clone(),
                        unet: Arc::new(built.unet),
                        text_encoder: Arc::new(built.text_encoder),
                    }
                }
            };
            members.push(member);
        }
        let shared = parts.shared.as_ref().unwrap_or(first);
        Ok(Self {
            members,
            vae: shared.build_vae(DType::F32, device)?,
            tokenizer: shared.tokenizer()?,
            scheduler: shared.scheduler_config()?,
            stamps,
            device: device.clone(),
        })
    }
}

/// Opens `path` as an ensemble: an official AFA folder, or a folder whose sub-folders are the
/// members' diffusers folders (in name order; the first one's VAE and tokenizer are shared).
pub fn open_model_path(path: &Path) -> Result<EnsembleParts> {
    if is_official_folder(path) || path.join("model_config.json").is_file() {
        return Ok(open_official(path)?);
    }
    let mut subs: Vec<_> = std::fs::read_dir(path)
        .map_err(|e| TrainerError::io(path, e))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("model_index.json").is_file())
        .collect();
    subs.sort();
    if subs.is_empty() {
        return Err(TrainerError::Invalid(format!(
            "{} is neither an official AFA folder nor a folder of diffusers member folders",
            path.display()
        )));
    }
    let members = subs
        .iter()
        .map(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            let source = ModelSource {
                model: p.clone(),
                ..Default::default()
            };
            Ok((name, open_model(&source)?))
        })
        .collect::<Result<Vec<_>>>()?;
    Ok(EnsembleParts {
        members,
        aggregators: None,
        shared: None,
    })
}
