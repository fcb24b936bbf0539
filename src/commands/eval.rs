//! `afa eval`: every mode of an ensemble on the demonstration world (`demo::eval`): denoising
//! loss with paired standard errors against AFA, the pixel judge's prompt alignment over every
//! caption at fixed seeds, and AFA's routing per shape. Prints a Markdown report; `--json`
//! and `--out` keep the numbers and the pictures.
use std::path::PathBuf;

use anyhow::Context;
use candle_core::{DType, Device};
use clap::Args;

use crate::config::ModelRegistry;
use crate::demo::eval::{EvalOptions, evaluate};
use crate::ensemble::EnsembleMode;
use crate::loading::ensemble::{EnsembleLoadOptions, open_declared};
use crate::schedulers::SchedulerKind;

#[derive(Debug, Args)]
pub struct EvalArgs {
    #[arg(long, default_value = "models.toml")]
    pub config: PathBuf,
    /// Default: the registry's default ensemble.
    #[arg(long)]
    pub ensemble: Option<String>,
    /// Comma-separated modes. Default: afa (if trained), single:<each member>, mean, merge,
    /// magicfusion.
    #[arg(long, value_delimiter = ',')]
    pub modes: Vec<String>,
    /// Seeds per caption (60 captions each).
    #[arg(long, default_value_t = 4)]
    pub seeds: usize,
    #[arg(long, default_value_t = 0)]
    pub seed_base: u64,
    /// Sampling steps (default: the ensemble's).
    #[arg(long)]
    pub steps: Option<usize>,
    /// Guidance scale (default: the ensemble's).
    #[arg(long)]
    pub guidance: Option<f64>,
    /// Held-out renders per scene for the denoising loss.
    #[arg(long, default_value_t = 2)]
    pub heldout: usize,
    #[arg(long, default_value_t = 3)]
    pub heldout_seed: u64,
    #[arg(long, value_delimiter = ',', default_value = "100,300,500,700,900")]
    pub timesteps: Vec<usize>,
    /// Images per batch.
    #[arg(long, default_value_t = 60)]
    pub batch: usize,
    /// Write the generated pictures here, one folder per mode (judge again with `afa demo judge`).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Write the report as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

pub fn run(args: &EvalArgs) -> anyhow::Result<()> {
    let registry = ModelRegistry::load(&args.config)?;
    let entry = registry
        .ensemble(args.ensemble.as_deref())
        .with_context(|| format!("no such ensemble in {}", args.config.display()))?
        .clone();
    let parts = open_declared(&registry, &entry)?;
    let members = parts.members.len();
    let has_aggregators = parts.aggregators.is_some();
    let names: Vec<String> = parts.members.iter().map(|(n, _)| n.clone()).collect();
    let device = Device::Cpu;
    let loaded = parts.build(&EnsembleLoadOptions {
        dtype: DType::F32,
        device: device.clone(),
        merge_weights: Some(entry.merge_weights.clone().unwrap_or(vec![1.0; members])),
        aggregators: None,
    })?;
    let modes: Vec<EnsembleMode> = if args.modes.is_empty() {
        let mut m: Vec<String> = Vec::new();
        if has_aggregators {
            m.push("afa".into());
        }
        m.extend(names.iter().map(|n| format!("single:{n}")));
        m.extend(["mean", "merge", "magicfusion"].map(String::from));
        m
    } else {
        args.modes.clone()
    }
    .iter()
    .map(|s| s.parse().map_err(|e| anyhow::anyhow!("--modes: {e}")))
    .collect::<anyhow::Result<_>>()?;
    let scheduler: SchedulerKind = entry
        .defaults
        .scheduler
        .parse()
        .map_err(|_| anyhow::anyhow!("unknown scheduler '{}'", entry.defaults.scheduler))?;
    let opts = EvalOptions {
        modes,
        seeds: args.seeds,
        seed_base: args.seed_base,
        steps: args.steps.unwrap_or(entry.defaults.steps),
        guidance: args.guidance.unwrap_or(entry.defaults.guidance_scale),
        scheduler,
        heldout_per_scene: args.heldout,
        heldout_seed: args.heldout_seed,
        timesteps: args.timesteps.clone(),
        batch: args.batch,
        out: args.out.clone(),
    };
    let started = std::time::Instant::now();
    let report = evaluate(&loaded, &opts, &device, |mode| {
        eprintln!("[{:>6.1}s] {mode}", started.elapsed().as_secs_f64())
    })?;
    println!(
        "Ensemble `{}` ({}), {} steps {scheduler}, guidance {}, {} seeds x 60 captions per mode.\n",
        entry.name,
        report.members.join(", "),
        opts.steps,
        opts.guidance,
        opts.seeds
    );
    println!("{}", report.markdown());
    if let Some(path) = &args.json {
        std::fs::write(path, serde_json::to_string_pretty(&report)?)
            .with_context(|| path.display().to_string())?;
    }
    Ok(())
}
