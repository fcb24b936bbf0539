//! `afa bench`: speed and memory of the full-size SD1.5 components (random weights), of AFA
//! ensemble steps and of whole generations, printed as markdown for `BENCHMARKS.md`.
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use super::device::{DeviceArg, DtypeArg};
use crate::bench::{BenchOptions, BenchPart, run};

/// `afa bench` flags.
#[derive(Debug, Clone, Args)]
pub struct BenchArgs {
    /// Parts to measure: unet, vae, text, afa, generate, throughput (comma separated).
    #[arg(long, value_delimiter = ',', default_value = "unet,vae,text")]
    pub parts: Vec<String>,
    /// Timed runs per measurement after one warm-up (the median is reported).
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// UNet latent sizes (pixels / 8).
    #[arg(long, value_delimiter = ',', default_value = "32,64")]
    pub unet_sizes: Vec<usize>,
    /// Images per UNet call of the unet and afa parts (2 = one image with CFG).
    #[arg(long, default_value_t = 2)]
    pub unet_batch: usize,
    /// VAE latent size of the vae part (64 decodes to 512 px).
    #[arg(long, default_value_t = 64)]
    pub vae_latent: usize,
    /// Images per decode of the vae part (a server decodes up to --max-batch).
    #[arg(long, default_value_t = 1)]
    pub vae_batch: usize,
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
    #[arg(long, value_enum, default_value_t = DeviceArg::Cpu)]
    pub device: DeviceArg,
    /// Weight precision (bf16 needs a GPU).
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    /// Image side in pixels of the generate and throughput parts.
    #[arg(long, default_value_t = 512)]
    pub gen_size: usize,
    /// DDIM steps of the one-model generation and of the throughput batches.
    #[arg(long, default_value_t = 50)]
    pub gen_steps: usize,
    /// DDIM steps of each AFA generation, paired with --gen-members (e.g. 20,30).
    #[arg(long, value_delimiter = ',', default_value = "20")]
    pub afa_gen_steps: Vec<usize>,
    /// Members of each AFA generation (e.g. 3,2).
    #[arg(long, value_delimiter = ',', default_value = "3")]
    pub gen_members: Vec<usize>,
    /// Images per batch of the throughput part.
    #[arg(long, value_delimiter = ',', default_value = "1,4,8")]
    pub throughput_batches: Vec<usize>,
    /// Also write the report to this file.
    #[arg(long)]
    pub out: Option<PathBuf>,
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
    let device = args.device.select()?;
    let dtype = args.dtype.for_device(&device)?;
    let opts = BenchOptions {
        parts,
        repeats: args.repeats,
        unet_sizes: args.unet_sizes.clone(),
        unet_batch: args.unet_batch,
        vae_latent: args.vae_latent,
        vae_batch: args.vae_batch,
        threads: args.threads,
        unet_layers: args.unet_layers,
        afa_members: args.afa_members.clone(),
        seed: args.seed,
        device,
        dtype,
        gen_size: args.gen_size,
        gen_steps: args.gen_steps,
        afa_gen_steps: args.afa_gen_steps.clone(),
        gen_members: args.gen_members.clone(),
        throughput_batches: args.throughput_batches.clone(),
        ..Default::default()
    };
    let report = run(&opts).context("benchmark failed")?;
    println!("{report}");
    if let Some(path) = &args.out {
        std::fs::write(path, report.to_string())
            .with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}
