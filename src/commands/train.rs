//! `afa train`: train the SABW aggregators of an ensemble (`docs/training.md`).
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::Device;
use clap::Args;

use super::device::DeviceArg;
use crate::config::ModelRegistry;
use crate::ensemble::points::AggregatorShape;
use crate::loading::ensemble::{EnsembleParts, open_declared};
use crate::trainer::adamw::AdamWConfig;
use crate::trainer::frozen::open_model_path;
use crate::trainer::{Frozen, InitFrom, TrainOptions, train};

/// Where the members come from (shared by `afa train` and `afa probe`).
#[derive(Debug, Clone, Args)]
pub struct EnsembleSource {
    /// An official AFA folder, or a folder whose sub-folders are the members' diffusers folders.
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// models.toml declaring the members (with --ensemble).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// The ensemble of --config to train.
    #[arg(long)]
    pub ensemble: Option<String>,
    /// Where to run: CUDA when compiled in and present, else the CPU.
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
}

impl EnsembleSource {
    /// Opens the members named by --model or --config/--ensemble.
    pub fn open(&self) -> anyhow::Result<EnsembleParts> {
        match (&self.model, &self.config) {
            (Some(_), Some(_)) => bail!("give either --model or --config/--ensemble, not both"),
            (Some(path), None) => Ok(open_model_path(path)?),
            (None, Some(config)) => {
                let registry = ModelRegistry::load(config)?;
                let entry = registry
                    .ensemble(self.ensemble.as_deref())
                    .with_context(|| {
                        format!(
                            "no ensemble '{}' in {}",
                            self.ensemble.as_deref().unwrap_or("(default)"),
                            config.display()
                        )
                    })?;
                Ok(open_declared(&registry, entry)?)
            }
            (None, None) => {
                bail!("name the members with --model PATH or --config models.toml --ensemble NAME")
            }
        }
    }

    /// The device of --device.
    pub fn device(&self) -> anyhow::Result<Device> {
        self.device.select()
    }
}

/// `afa train` flags (later tools rely on these names).
#[derive(Debug, Clone, Args)]
pub struct TrainArgs {
    #[command(flatten)]
    pub source: EnsembleSource,
    /// Training images: a folder with metadata.jsonl ({"file_name", "text"} per line) or
    /// metadata.csv, or a .jsonl/.csv listing.
    #[arg(long)]
    pub data: PathBuf,
    /// Output folder: log.jsonl, checkpoints/step-N/, aggregators.safetensors.
    #[arg(long)]
    pub out: PathBuf,
    /// Square training size in pixels (shorter side resized, then cropped).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    #[arg(long, default_value_t = 8)]
    pub batch_size: usize,
    /// Micro-batches per optimizer step.
    #[arg(long, default_value_t = 1)]
    pub grad_accum: usize,
    /// Epochs (default 10 when --max-steps is not given; with both, the first reached stops).
    #[arg(long)]
    pub epochs: Option<usize>,
    #[arg(long)]
    pub max_steps: Option<u64>,
    #[arg(long, default_value_t = 1e-4)]
    pub lr: f64,
    /// Linear learning-rate warm-up steps (the paper uses none: constant LR).
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u64,
    #[arg(long, default_value_t = 0.01)]
    pub weight_decay: f64,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Checkpoint every K optimizer steps (0: only at the end).
    #[arg(long, default_value_t = 500)]
    pub save_every: u64,
    /// Validation loss every K optimizer steps (0: only at the start and the end).
    #[arg(long, default_value_t = 100)]
    pub val_every: u64,
    /// Held-out images (default: a tenth of the data, at most 16).
    #[arg(long)]
    pub val_images: Option<usize>,
    /// Per-sample probability of training on the empty caption.
    #[arg(long, default_value_t = 0.1)]
    pub caption_dropout: f64,
    /// Encode each image once (centre crop) and sample latents from the cached posterior.
    #[arg(long)]
    pub cache_latents: bool,
    /// Continue the run in --out from its newest checkpoint.
    #[arg(long)]
    pub resume: bool,
    /// Start from these aggregators (our file or an official folder) instead of fresh ones.
    #[arg(long)]
    pub init_from: Option<PathBuf>,
    /// Width D of fresh aggregators.
    #[arg(long, default_value_t = 128)]
    pub hidden_size: usize,
    /// Transformer blocks of fresh aggregators.
    #[arg(long, default_value_t = 2)]
    pub num_layers: usize,
    /// Attention heads of fresh aggregators.
    #[arg(long, default_value_t = 8)]
    pub heads: usize,
    /// Group-norm groups of fresh aggregators.
    #[arg(long, default_value_t = 32)]
    pub norm_groups: usize,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
}

/// Runs `afa train`.
pub fn run(args: &TrainArgs) -> anyhow::Result<()> {
    let device = args.source.device()?;
    let parts = args.source.open()?;
    let frozen = Frozen::from_parts(&parts, &device)?;
    let init = match &args.init_from {
        Some(path) => InitFrom::Checkpoint(path.clone()),
        None => InitFrom::Fresh(AggregatorShape {
            hidden_size: args.hidden_size,
            num_layers: args.num_layers,
            num_attn_heads: args.heads,
            norm_num_groups: args.norm_groups,
        }),
    };
    let options = TrainOptions {
        data: args.data.clone(),
        out: args.out.clone(),
        resolution: args.resolution,
        batch_size: args.batch_size,
        grad_accum: args.grad_accum,
        epochs: args.epochs,
        max_steps: args.max_steps,
        lr: args.lr,
        warmup_steps: args.warmup_steps,
        adamw: AdamWConfig {
            weight_decay: args.weight_decay,
            ..AdamWConfig::default()
        },
        seed: args.seed,
        save_every: args.save_every,
        val_every: args.val_every,
        val_images: args.val_images,
        caption_dropout: args.caption_dropout,
        cache_latents: args.cache_latents,
        resume: args.resume,
        init,
        quiet: args.quiet,
    };
    let summary = train(&frozen, &options)?;
    let fmt = |v: Option<f64>| v.map(|v| format!("{v:.5}")).unwrap_or_else(|| "-".into());
    println!(
        "trained {} steps: loss {}, validation loss {}; skipped {} unreadable images",
        summary.steps,
        fmt(summary.last_loss),
        fmt(summary.val_loss),
        summary.skipped_images
    );
    println!("wrote {}", summary.aggregators.display());
    Ok(())
}
