//! `afa bench`: speed and memory of the full-size SD1.5 components (random weights) and of AFA
//! ensemble steps, printed as markdown for `BENCHMARKS.md`.
use anyhow::Context;
use clap::Args;

use crate::bench::{BenchOptions, BenchPart, run};

/// `afa bench` flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Parts to measure: unet, vae, text, afa (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "unet,vae,text")]
    pub parts: Vec<String>,
    /// Timed runs per measurement after one warm-up (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// UNet latent sizes (pixels / 8).
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub unet_sizes: Vec<usize>,
    /// CPU threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Also time every UNet layer.
    #[arg(long)]
    pub unet_layers: bool,
    /// Ensemble sizes for the `afa` part.
    #[arg(long, value_delimiter = ',', default_value = "2,3")]
    pub afa_members: Vec<usize>,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// Runs `afa bench`.
pub fn run_bench(args: &BenchArgs) -> anyhow::Result<()> {
    let parts = args
        .parts
        .iter()
        .map(|p| {
            p.parse::<BenchPart>()
                .map_err(|e| anyhow::anyhow!("invalid --parts: {e}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let opts = BenchOptions {
        parts,
        repeats: args.repeats,
        unet_sizes: args.unet_sizes.clone(),
        threads: args.threads,
        unet_layers: args.unet_layers,
        afa_members: args.afa_members.clone(),
        seed: args.seed,
        ..Default::default()
    };
    let report = run(&opts).context("benchmark failed")?;
    println!("{report}");
    Ok(())
}
