//! Command line: clap definitions of every subcommand and dispatch to `commands`.
use std::path::PathBuf;

use anyhow::{Context, bail};
use candle_core::{DType, Device, DeviceLocation};
use clap::{Args, Parser, Subcommand, ValueEnum};

use crate::commands;
use crate::schedulers::SchedulerKind;

/// afa: serve and run ensembles of Stable Diffusion 1.5 fine-tunes (AFA).
#[derive(Debug, Parser)]
#[command(name = "afa", version, about)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Generate images from a prompt with the embedded demonstration ensemble (the default), one
    /// model, or an
    /// ensemble (an official AFA folder as --model, or --config models.toml --ensemble NAME).
    Generate(Box<GenerateArgs>),
    /// Measure speed and memory of the full-size components and of AFA steps (random weights).
    Bench(commands::bench::BenchArgs),
    /// Convert aggregator checkpoints between the official folder layout and our single file.
    Convert(commands::convert::ConvertArgs),
    /// Serve the ensembles of models.toml over HTTP (native and OpenAI-compatible APIs).
    Serve(commands::serve::ServeArgs),
    /// Validate a models.toml (files, members, aggregators) and exit 0 or 1.
    CheckModels(commands::check_models::CheckModelsArgs),
    /// Train the SABW aggregators of an ensemble (frozen members; docs/training.md).
    Train(commands::train::TrainArgs),
    /// Estimate how much an aggregator could gain for a member set before training (§7.2).
    Probe(commands::probe::ProbeArgs),
    /// Create or upgrade the job database (serve also does this at start-up).
    Migrate(commands::migrate::MigrateArgs),
    /// The demonstration world: render a captioned dataset, judge pictures against captions.
    Demo(commands::demo::DemoArgs),
    /// Measure every mode of an ensemble on the demonstration world (loss, alignment, routing).
    Eval(commands::eval::EvalArgs),
    /// Manage the API keys of the job store (create prints the key once; list; revoke).
    Keys(commands::keys::KeysArgs),
}

/// Weight precision.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DtypeArg {
    F32,
    F16,
    Bf16,
}

impl DtypeArg {
    /// The candle dtype.
    pub fn dtype(self) -> DType {
        match self {
            DtypeArg::F32 => DType::F32,
            DtypeArg::F16 => DType::F16,
            DtypeArg::Bf16 => DType::BF16,
        }
    }

    /// The dtype, checked against the device it will run on (`--dtype` is named in errors).
    pub fn for_device(self, device: &Device) -> anyhow::Result<DType> {
        let dtype = self.dtype();
        crate::models::check_precision(dtype, device)
            .map_err(|e| anyhow::anyhow!("--dtype {e}"))?;
        Ok(dtype)
    }
}

/// Where tensors live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// CUDA when compiled in and present, else CPU.
    Auto,
    Cpu,
    Cuda,
}

impl DeviceArg {
    /// The device of `--device` (CUDA device 0): the one device selection of `generate`,
    /// `train`, `bench` and `serve`.
    pub fn select(self) -> anyhow::Result<Device> {
        Ok(select_devices(self, &[])?.remove(0))
    }
}

/// The devices to serve on: `ordinals` (from `--devices`, CUDA device numbers) when given,
/// else the one device of `device`. An ordinal that is repeated, or a CUDA device that cannot
/// be opened, is an error naming it.
pub fn select_devices(device: DeviceArg, ordinals: &[usize]) -> anyhow::Result<Vec<Device>> {
    let cuda = |ordinal: usize| {
        Device::new_cuda(ordinal).with_context(|| {
            format!("CUDA device {ordinal} (was afa built with --features cuda? is it present?)")
        })
    };
    if ordinals.is_empty() {
        return Ok(vec![match device {
            DeviceArg::Cpu => Device::Cpu,
            DeviceArg::Cuda => cuda(0).context("--device cuda")?,
            DeviceArg::Auto => Device::cuda_if_available(0).unwrap_or(Device::Cpu),
        }]);
    }
    if device == DeviceArg::Cpu {
        bail!("--devices lists CUDA devices; it cannot be combined with --device cpu");
    }
    let mut seen = std::collections::BTreeSet::new();
    if let Some(twice) = ordinals.iter().find(|&&o| !seen.insert(o)) {
        bail!("--devices names CUDA device {twice} twice");
    }
    ordinals
        .iter()
        .map(|&ordinal| cuda(ordinal).context("--devices"))
        .collect()
}

/// How a device is named in logs, `/info` and `/metrics`: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        DeviceLocation::Cpu => "cpu".into(),
        DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// `afa generate` flags (later tools rely on these names).
#[derive(Debug, Clone, Args)]
pub struct GenerateArgs {
    /// A diffusers folder or a single-file `.safetensors` checkpoint. Default: the embedded
    /// demonstration ensemble (coloured shapes, 64x64; assets/demo/README.md).
    #[arg(long)]
    pub model: Option<PathBuf>,
    /// For a single-file checkpoint: a diffusers folder whose configs (and tokenizer) describe
    /// its architecture. Default: Stable Diffusion 1.5.
    #[arg(long)]
    pub model_config: Option<PathBuf>,
    /// A VAE `.safetensors` replacing the model's own.
    #[arg(long)]
    pub vae: Option<PathBuf>,
    /// A tokenizer folder (`vocab.json` + `merges.txt`) replacing the model's own.
    #[arg(long)]
    pub tokenizer: Option<PathBuf>,
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value = "")]
    pub negative_prompt: String,
    #[arg(long, default_value_t = 30)]
    pub steps: usize,
    /// Classifier-free guidance scale.
    #[arg(long, default_value_t = 7.5)]
    pub guidance: f64,
    /// Image width in pixels (default 512 for a model, the ensemble's default for an ensemble).
    #[arg(long)]
    pub width: Option<usize>,
    /// Image height in pixels (default 512 for a model, the ensemble's default for an ensemble).
    #[arg(long)]
    pub height: Option<usize>,
    /// Seed of the first image; image i uses seed + i. Random when absent.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Images per prompt.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    #[arg(long, default_value = "ddim", value_parser = parse_scheduler)]
    pub scheduler: SchedulerKind,
    #[arg(long, value_enum, default_value_t = DtypeArg::F32)]
    pub dtype: DtypeArg,
    #[arg(long, value_enum, default_value_t = DeviceArg::Auto)]
    pub device: DeviceArg,
    /// Output PNG; batches get `-N` suffixes (`out-0.png`, `out-1.png`, ...).
    #[arg(long, default_value = "out.png")]
    pub out: PathBuf,
    /// Start from this initial noise (f32 `[B,4,H/8,W/8]` `.npy`) instead of the seed.
    #[arg(long)]
    pub latents: Option<PathBuf>,
    /// Write intermediate tensors as `.npy` files into this folder.
    #[arg(long)]
    pub dump: Option<PathBuf>,
    /// No progress bar.
    #[arg(long)]
    pub quiet: bool,
    /// models.toml declaring the ensemble to run (with --ensemble).
    #[arg(long)]
    pub config: Option<PathBuf>,
    /// An ensemble of --config (default: its default ensemble; --config defaults to ./models.toml).
    #[arg(long)]
    pub ensemble: Option<String>,
    /// How an ensemble predicts noise: afa, mean, single:<member>, merge, magicfusion.
    #[arg(long)]
    pub mode: Option<String>,
    /// Use these aggregators (our file or an official folder) with the ensemble's members.
    #[arg(long)]
    pub aggregators: Option<PathBuf>,
    /// Write the attention maps (heat-map PNGs, an index.html with the legend, raw .npy) here.
    #[arg(long)]
    pub maps: Option<PathBuf>,
}

fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse::<SchedulerKind>().map_err(|_| {
        let names: Vec<String> = SchedulerKind::ALL.iter().map(|k| k.to_string()).collect();
        format!("unknown scheduler '{s}' (one of: {})", names.join(", "))
    })
}

/// Parses the command line, runs the command, and returns the process exit code.
pub fn main() -> i32 {
    let cli = Cli::parse();
    if !matches!(cli.command, Command::Serve(_)) {
        crate::telemetry::init_warnings();
    }
    let result = match cli.command {
        Command::Generate(args) => commands::generate::run(&args),
        Command::Convert(args) => commands::convert::run(&args),
        Command::Bench(args) => commands::bench::run_bench(&args),
        Command::Serve(args) => commands::serve::run(&args),
        Command::CheckModels(args) => commands::check_models::run(&args),
        Command::Train(args) => commands::train::run(&args),
        Command::Probe(args) => commands::probe::run(&args),
        Command::Migrate(args) => commands::migrate::run(&args),
        Command::Keys(args) => commands::keys::run(&args),
        Command::Demo(args) => commands::demo::run(&args),
        Command::Eval(args) => commands::eval::run(&args),
    };
    match result {
        Ok(()) => 0,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            1
        }
    }
}

/// The error and its causes on one line, each cause once (our error types already print their
/// source), cut before any multi-line backtrace a candle error may carry.
fn one_line(error: &anyhow::Error) -> String {
    let mut out = String::new();
    for cause in error.chain() {
        let text = cause.to_string();
        let text = text.lines().next().unwrap_or("").trim_end();
        if text.is_empty() || out.contains(text) {
            continue;
        }
        if !out.is_empty() {
            out.push_str(": ");
        }
        out.push_str(text);
    }
    if out.is_empty() {
        "unknown error".into()
    } else {
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_printed_once_on_one_line() {
        let io = std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        let load = crate::loading::LoadError::io(std::path::Path::new("x/vocab.json"), io);
        let e = anyhow::Error::new(load).context("loading the tokenizer");
        assert_eq!(
            one_line(&e),
            "loading the tokenizer: x/vocab.json: no such file"
        );
    }
}
