//! `afa probe`: the cross-noise routing gain of a member set (`afa-method.md` §7.2), to decide
//! whether training aggregators is worth it before spending the compute.
use std::path::PathBuf;

use clap::Args;

use super::train::EnsembleSource;
use crate::trainer::Frozen;
use crate::trainer::probe::{ProbeOptions, probe};

/// `afa probe` flags.
#[derive(Debug, Clone, Args)]
pub struct ProbeArgs {
    #[command(flatten)]
    pub source: EnsembleSource,
    /// Images with captions (same layouts as `afa train --data`).
    #[arg(long)]
    pub data: PathBuf,
    /// Square size in pixels (centre crop).
    #[arg(long, default_value_t = 512)]
    pub resolution: usize,
    /// Images sampled from --data.
    #[arg(long, default_value_t = 16)]
    pub images: usize,
    /// Timesteps per image.
    #[arg(long, default_value_t = 4)]
    pub timesteps: usize,
    /// Noise draws per image and timestep (the routing of one is learned on the others).
    #[arg(long, default_value_t = 4)]
    pub draws: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `afa probe`.
pub fn run(args: &ProbeArgs) -> anyhow::Result<()> {
    let device = args.source.device()?;
    let parts = args.source.open()?;
    let frozen = Frozen::from_parts(&parts, &device)?;
    let report = probe(
        &frozen,
        &ProbeOptions {
            data: args.data.clone(),
            resolution: args.resolution,
            images: args.images,
            timesteps: args.timesteps,
            draws: args.draws,
            seed: args.seed,
        },
    )?;
    println!(
        "samples (image x timestep): {}, noise draws each: {}",
        report.samples, args.draws
    );
    for (i, (name, mse)) in report.member_mse.iter().enumerate() {
        let mark = if i == report.best {
            "  (best single member)"
        } else {
            ""
        };
        println!("  member {name:<24} eps MSE {mse:.6}{mark}");
    }
    println!(
        "  per-element oracle     eps MSE {:.6}  gain {:+.2}%",
        report.oracle_mse,
        100.0 * report.oracle_gain
    );
    println!(
        "  cross-noise routing    eps MSE {:.6}  gain {:+.2}%",
        report.routed_mse,
        100.0 * report.routed_gain
    );
    println!("verdict: {}", report.verdict());
    Ok(())
}
