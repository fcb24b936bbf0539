//! `afa generate`: load one model, run one batch (text-to-image, or from `--init-image` with an
//! optional `--mask`), write PNGs (and optional `.npy` dumps).
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};
use clap::Args;
use indicatif::{ProgressBar, ProgressStyle};

use super::device::{DeviceArg, DtypeArg};
use crate::loading::checkpoint::{LoadedModel, ModelSource, load_model};
use crate::loading::embedded::{EMBEDDED_ENSEMBLE_NAME, materialize_embedded_ensemble};
use crate::pipeline::image_input;
use crate::pipeline::{
    BatchOutput, BatchRequest, Denoiser, ImageSpec, InitImage, Limits, Observer, PipelineError,
    SdPipeline, SingleUNet, Strength,
};
use crate::schedulers::SchedulerKind;

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
    /// Image-to-image: start from this picture (PNG, JPEG or WebP), resized to the output
    /// size; without --width/--height the output takes the picture's size (rounded down to a
    /// multiple of 8).
    #[arg(long)]
    pub init_image: Option<PathBuf>,
    /// Inpainting (with --init-image): a picture of the same size, white where it is
    /// repainted, black where it is kept.
    #[arg(long, requires = "init_image")]
    pub mask: Option<PathBuf>,
    /// With --init-image: the fraction of the schedule run, 0..=1 (default 0.8; 1.0 with
    /// --mask).
    #[arg(long, requires = "init_image")]
    pub strength: Option<f64>,
}

/// The init image of `args` at `size`, and the strength, when `--init-image` is given.
fn init_from_args(
    args: &GenerateArgs,
    size: (usize, usize),
) -> anyhow::Result<Option<(Arc<InitImage>, Strength)>> {
    let Some(path) = &args.init_image else {
        return Ok(None);
    };
    let picture = read_picture(path, "init_image")?;
    let mask = match &args.mask {
        Some(m) => Some(image_input::to_native_mask(
            &read_picture(m, "mask")?,
            image_input::MaskConvention::WhiteRepaints,
            "mask",
        )?),
        None => None,
    };
    let default = if mask.is_some() { 1.0 } else { 0.8 };
    let strength = Strength::new(args.strength.unwrap_or(default))?;
    let init = image_input::init_image(&picture, mask.as_ref(), size)?;
    Ok(Some((Arc::new(init), strength)))
}

fn read_picture(path: &Path, field: &'static str) -> anyhow::Result<image::DynamicImage> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    image_input::decode_picture(&bytes, field, image_input::InputLimits::default())
        .with_context(|| path.display().to_string())
}

/// The output size: --width/--height, else the init picture's own size, else `default`.
fn output_size(args: &GenerateArgs, default: (usize, usize)) -> anyhow::Result<(usize, usize)> {
    if let (None, None, Some(path)) = (args.width, args.height, &args.init_image) {
        return Ok(image_input::natural_size(
            &read_picture(path, "init_image")?,
            8,
        ));
    }
    Ok((
        args.width.unwrap_or(default.0),
        args.height.unwrap_or(default.1),
    ))
}

fn parse_scheduler(s: &str) -> Result<SchedulerKind, String> {
    s.parse::<SchedulerKind>().map_err(|_| {
        let names: Vec<String> = SchedulerKind::ALL.iter().map(|k| k.to_string()).collect();
        format!("unknown scheduler '{s}' (one of: {})", names.join(", "))
    })
}

/// Default size of a single model (SD1.5's).
const SD15_SIDE: usize = 512;

/// Runs `afa generate`.
pub fn run(args: &GenerateArgs) -> anyhow::Result<()> {
    let device = args.device.select()?;
    let dtype = args.dtype.for_device(&device)?;
    if !args
        .out
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"))
    {
        bail!("--out must name a .png file, got {}", args.out.display());
    }
    if let Some(target) = ensemble_target(args)? {
        return super::generate_ensemble::run(args, target, dtype, &device);
    }
    if args.mode.is_some() || args.maps.is_some() || args.aggregators.is_some() {
        bail!(
            "--mode, --maps and --aggregators need an ensemble (--config/--ensemble, or an official AFA folder as --model)"
        );
    }
    let model_path = args
        .model
        .clone()
        .context("no --model (the embedded ensemble is used only without --model and --config)")?;
    let model_name = display_name(&model_path);
    let source = ModelSource {
        model: model_path,
        model_config: args.model_config.clone(),
        vae: args.vae.clone(),
        tokenizer: args.tokenizer.clone(),
    };
    let LoadedModel {
        unet,
        text_encoder,
        vae,
        tokenizer,
        scheduler,
    } = load_model(&source, dtype, &device)?;
    let pipeline = SdPipeline {
        tokenizer,
        denoiser: SingleUNet { text_encoder, unet },
        vae,
        scheduler_config: scheduler,
        device: device.clone(),
        model_name,
        limits: Limits::default(),
    };
    let request = build_request(args, (SD15_SIDE, SD15_SIDE), &device)?;
    generate_and_write(&pipeline, args, request).map(|_| ())
}

/// Which ensemble `afa generate` should run, if any.
pub(super) enum EnsembleTarget {
    /// An official AFA folder given as `--model`.
    Official(PathBuf),
    /// An ensemble declared in a models.toml.
    Declared {
        config: PathBuf,
        name: Option<String>,
    },
}

fn ensemble_target(args: &GenerateArgs) -> anyhow::Result<Option<EnsembleTarget>> {
    if args.model.is_none() && args.config.is_none() && args.ensemble.is_none() {
        for (flag, given) in [
            ("--model-config", args.model_config.is_some()),
            ("--vae", args.vae.is_some()),
            ("--tokenizer", args.tokenizer.is_some()),
        ] {
            if given {
                bail!("{flag} applies to --model; without --model the embedded ensemble runs");
            }
        }
        let config = materialize_embedded_ensemble(&crate::config::cache_root())
            .context("writing the embedded ensemble to the cache folder")?;
        if !args.quiet {
            eprintln!(
                "note: no --model given, using the {EMBEDDED_ENSEMBLE_NAME}: a demonstration world of coloured shapes (64x64), try \"a red circle on the left\""
            );
        }
        return Ok(Some(EnsembleTarget::Declared { config, name: None }));
    }
    if args.config.is_some() || args.ensemble.is_some() {
        if args.model.is_some() {
            bail!("give either --model or --config/--ensemble, not both");
        }
        let config = args
            .config
            .clone()
            .unwrap_or_else(|| PathBuf::from("models.toml"));
        return Ok(Some(EnsembleTarget::Declared {
            config,
            name: args.ensemble.clone(),
        }));
    }
    Ok(match &args.model {
        Some(p) if crate::loading::aggregators::is_official_folder(p) => {
            Some(EnsembleTarget::Official(p.clone()))
        }
        _ => None,
    })
}

/// Runs the batch and writes the PNGs (and dumps); returns the pipeline output.
pub(super) fn generate_and_write<D: Denoiser>(
    pipeline: &SdPipeline<D>,
    args: &GenerateArgs,
    request: BatchRequest,
) -> anyhow::Result<BatchOutput> {
    let mut observer = CliObserver::new(args, request.steps)?;
    let output = pipeline
        .generate(&request, &mut observer)
        .map_err(|e| match e {
            PipelineError::Invalid { field, reason } => {
                anyhow::anyhow!("invalid --{}: {reason}", flag_of(field))
            }
            other => anyhow::Error::new(other),
        })?;
    observer.finish();
    let paths = output_paths(&args.out, output.images.len());
    for (image, path) in output.images.iter().zip(&paths) {
        if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("creating {}", parent.display()))?;
        }
        std::fs::write(path, &image.png).with_context(|| format!("writing {}", path.display()))?;
        for w in &image.warnings {
            eprintln!("warning: {w}");
        }
        println!("{} (seed {})", path.display(), image.seed);
    }
    let t = output.timings;
    eprintln!(
        "timings: text {:.2}s, denoise {:.2}s, decode {:.2}s, png {:.2}s",
        t.text_encode.as_secs_f64(),
        t.denoise.as_secs_f64(),
        t.decode.as_secs_f64(),
        t.png_encode.as_secs_f64()
    );
    Ok(output)
}

/// The CLI flag for a pipeline field name.
fn flag_of(field: &str) -> String {
    match field {
        "guidance_scale" => "guidance".into(),
        "n" => "batch".into(),
        other => other.replace('_', "-"),
    }
}

fn display_name(path: &Path) -> String {
    path.file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

pub(super) fn build_request(
    args: &GenerateArgs,
    default_size: (usize, usize),
    device: &Device,
) -> anyhow::Result<BatchRequest> {
    let initial_latents = match &args.latents {
        Some(path) => Some(
            crate::npy::read(path)?
                .to_tensor(device)
                .with_context(|| format!("reading {}", path.display()))?,
        ),
        None => None,
    };
    let batch = match &initial_latents {
        Some(l) if args.batch != 1 && args.batch != l.dim(0)? => {
            bail!(
                "--batch {} does not match the {} latents in --latents",
                args.batch,
                l.dim(0)?
            )
        }
        Some(l) => l.dim(0)?,
        None => args.batch,
    };
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let first_seed = args.seed.unwrap_or_else(random_seed);
    let (width, height) = output_size(args, default_size)?;
    let init = init_from_args(args, (width, height))?;
    let images = (0..batch)
        .map(|i| ImageSpec {
            prompt: args.prompt.clone(),
            negative_prompt: args.negative_prompt.clone(),
            seed: first_seed.wrapping_add(i as u64),
            guidance_scale: args.guidance,
            init: init.as_ref().map(|(image, _)| image.clone()),
        })
        .collect();
    Ok(BatchRequest {
        images,
        width,
        height,
        steps: args.steps,
        scheduler: args.scheduler,
        strength: init.map(|(_, strength)| strength),
        initial_latents,
        attention_maps: if args.maps.is_some() {
            crate::pipeline::MapsRequest::PerStep(crate::pipeline::MapPoints::ALL)
        } else {
            crate::pipeline::MapsRequest::Off
        },
    })
}

/// A seed from the clock and process id, for runs without `--seed` (it is printed back).
fn random_seed() -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(0);
    let mut rng = crate::pipeline::ImageRng::new(nanos ^ ((std::process::id() as u64) << 32));
    rng.next_u64() >> 1
}

/// `out.png` for one image, else `out-0.png`, `out-1.png`, ...
fn output_paths(out: &Path, count: usize) -> Vec<PathBuf> {
    if count == 1 {
        return vec![out.to_path_buf()];
    }
    let stem = out
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let ext = out
        .extension()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    (0..count)
        .map(|i| out.with_file_name(format!("{stem}-{i}.{ext}")))
        .collect()
}

/// Progress bar plus optional `.npy` dumps.
struct CliObserver {
    bar: Option<ProgressBar>,
    dump: Option<PathBuf>,
}

impl CliObserver {
    fn new(args: &GenerateArgs, steps: usize) -> anyhow::Result<Self> {
        if let Some(dir) = &args.dump {
            std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        }
        let bar = (!args.quiet).then(|| {
            let bar = ProgressBar::new(steps as u64);
            bar.set_style(
                ProgressStyle::with_template("{spinner} denoising [{bar:30}] {pos}/{len} steps, {elapsed} elapsed, ETA {eta}")
                    .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            bar
        });
        Ok(Self {
            bar,
            dump: args.dump.clone(),
        })
    }

    fn finish(&self) {
        if let Some(bar) = &self.bar {
            bar.finish_and_clear();
        }
    }
}

impl Observer for CliObserver {
    fn wants_tensors(&self) -> bool {
        self.dump.is_some()
    }

    fn tensor(&mut self, name: &str, value: &Tensor) -> Result<(), PipelineError> {
        let Some(dir) = &self.dump else { return Ok(()) };
        let path = dir.join(format!("{name}.npy"));
        let io = |e: crate::npy::NpyError| PipelineError::Internal(format!("--dump: {e}"));
        if value.dtype() == DType::I64 {
            let v = value.flatten_all()?.to_vec1::<i64>()?;
            crate::npy::write_i64(&path, value.dims(), &v).map_err(io)
        } else {
            crate::npy::write_tensor(&path, value).map_err(io)
        }
    }

    fn step(&mut self, done: usize, _total: usize) {
        if let Some(bar) = &self.bar {
            bar.set_position(done as u64);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_outputs_get_suffixes() {
        assert_eq!(
            output_paths(Path::new("a/out.png"), 1),
            vec![PathBuf::from("a/out.png")]
        );
        assert_eq!(
            output_paths(Path::new("a/out.png"), 2),
            vec![PathBuf::from("a/out-0.png"), PathBuf::from("a/out-1.png")]
        );
    }
}
