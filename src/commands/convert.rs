//! `afa convert`: aggregator checkpoints between the official AFA folder layout and our single
//! `.safetensors` file (which records the members' names and weight hashes).
//!
//! - official folder -> file: the member stamps come from the folder's own experts, or from
//!   `--config/--ensemble` when the folder holds only aggregators;
//! - file -> official folder: writes `aggregator_{k}/` and `model_config.json`, and with
//!   `--config/--ensemble` also the experts (`unet/`, `text_encoder/`, `vae/`, `tokenizer/`,
//!   `scheduler/`, `additional_unet_{i}/`, `additional_text_encoder_{i}/`) copied from the
//!   members' diffusers folders, so the result is a complete official folder.
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use clap::Args;

use crate::config::{MemberFormat, ModelRegistry};
use crate::loading::aggregators::{
    AggregatorCheckpoint, MemberStamp, is_official_folder, write_aggregator_file,
    write_official_aggregators,
};
use crate::loading::ensemble::{open_declared, open_official};

/// `afa convert` flags.
#[derive(Debug, Clone, Args)]
pub struct ConvertArgs {
    /// An official AFA folder or one of our aggregator files.
    #[arg(long)]
    pub from: PathBuf,
    /// The output: a `.safetensors` file when converting from a folder, a folder otherwise.
    #[arg(long)]
    pub to: PathBuf,
    /// models.toml declaring the members (see --ensemble).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The ensemble of --config whose members the aggregators belong to.
    #[arg(long)]
    pub ensemble: Option<String>,
}

/// Runs `afa convert`.
pub fn run(args: &ConvertArgs) -> anyhow::Result<()> {
    if args.to.exists() && args.to.is_dir() && std::fs::read_dir(&args.to)?.next().is_some() {
        bail!(
            "{} exists and is not empty; choose a new output",
            args.to.display()
        );
    }
    let declared = declared_members(args)?;
    if args.from.is_dir() {
        if !is_official_folder(&args.from) {
            bail!(
                "{} is not an official AFA folder (model_config.json + aggregator_0/)",
                args.from.display()
            );
        }
        let checkpoint = AggregatorCheckpoint::open_official(&args.from)?;
        let stamps = match declared {
            Some((_, parts)) => parts.stamps(),
            None if args.from.join("unet").is_dir() => open_official(&args.from)?.stamps(),
            None => bail!(
                "{} holds only aggregators: name their members with --config models.toml --ensemble NAME",
                args.from.display()
            ),
        };
        write_file(&checkpoint, &stamps, &args.to)?;
        println!("wrote {}", args.to.display());
    } else {
        let checkpoint = AggregatorCheckpoint::open_file(&args.from)?;
        let tensors = all_tensors(&checkpoint)?;
        std::fs::create_dir_all(&args.to)
            .with_context(|| format!("creating {}", args.to.display()))?;
        write_official_aggregators(&args.to, &tensors, &checkpoint.configs)?;
        if let Some((members, parts)) = declared {
            let channels: Vec<usize> = checkpoint.configs.iter().map(|c| c.in_channels).collect();
            checkpoint.check_against(&parts.stamps(), &channels)?;
            copy_experts(&members, &args.to)?;
        }
        println!("wrote {}", args.to.display());
    }
    Ok(())
}

/// The member folders and opened parts of `--config/--ensemble`, when given.
fn declared_members(
    args: &ConvertArgs,
) -> anyhow::Result<Option<(Vec<PathBuf>, crate::loading::ensemble::EnsembleParts)>> {
    let (config, name) = match (&args.config, &args.ensemble) {
        (Some(c), Some(n)) => (c, n),
        (None, None) => return Ok(None),
        _ => bail!("--config and --ensemble go together"),
    };
    let registry = ModelRegistry::load(config)?;
    let entry = registry
        .ensemble(Some(name))
        .with_context(|| format!("no ensemble '{name}' in {}", config.display()))?;
    let mut folders = Vec::new();
    for m in &entry.members {
        let member = registry.member(m).context("unknown member")?;
        if member.resolved_format() != MemberFormat::Diffusers {
            bail!("member '{m}' is a single file; the official layout needs diffusers folders");
        }
        folders.push(member.path.clone());
    }
    let parts = open_declared(&registry, entry)?;
    Ok(Some((folders, parts)))
}

fn all_tensors(
    c: &AggregatorCheckpoint,
) -> anyhow::Result<Vec<Vec<(String, candle_core::Tensor)>>> {
    (0..c.configs.len()).map(|k| Ok(c.tensors(k)?)).collect()
}

fn write_file(c: &AggregatorCheckpoint, stamps: &[MemberStamp], to: &Path) -> anyhow::Result<()> {
    let channels: Vec<usize> = c.configs.iter().map(|c| c.in_channels).collect();
    let mut checked = c.clone();
    checked.members.clear();
    checked.check_against(stamps, &channels)?;
    write_aggregator_file(to, &all_tensors(c)?, &c.configs, stamps)?;
    Ok(())
}

fn copy_dir(from: &Path, to: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(to)?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let target = to.join(entry.file_name());
        if entry.file_type()?.is_dir() {
            copy_dir(&entry.path(), &target)?;
        } else {
            std::fs::copy(entry.path(), &target)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Expert 0's whole pipeline folder, then `additional_*_{i}` (i = 0..N-2) for the others.
fn copy_experts(members: &[PathBuf], to: &Path) -> anyhow::Result<()> {
    let first = members.first().context("no members")?;
    for sub in ["unet", "text_encoder", "vae", "tokenizer", "scheduler"] {
        if first.join(sub).is_dir() {
            copy_dir(&first.join(sub), &to.join(sub))?;
        }
    }
    if first.join("model_index.json").is_file() {
        std::fs::copy(first.join("model_index.json"), to.join("model_index.json"))?;
    }
    // Expert i >= 1 goes to `additional_*_{i-1}`, as the official `save_pretrained` writes it.
    for (i, m) in members.iter().skip(1).enumerate() {
        copy_dir(&m.join("unet"), &to.join(format!("additional_unet_{i}")))?;
        copy_dir(
            &m.join("text_encoder"),
            &to.join(format!("additional_text_encoder_{i}")),
        )?;
    }
    Ok(())
}
