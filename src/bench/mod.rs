//! `afa bench`: speed of the full-size SD1.5 components on random weights.
//!
//! Every component is built at full SD1.5 size from deterministic random weights (a seeded
//! [`RandomWeights`] backend for `VarBuilder::from_backend`: N(0, 1/fan_in) for weights, ones for
//! norm scales, zeros for biases), so no download is needed and runs are comparable across
//! machines and with `scripts/bench_torch.py`, which measures the same things in PyTorch.
//! Each measurement is one warm-up run followed by `repeats` timed runs; the report gives the
//! median (and min/max), the build time, the peak RSS of the part and the machine.
//! Everything runs on `BenchOptions::device` in `BenchOptions::dtype` (f32 on the CPU by
//! default); on a GPU every timed run ends with a device synchronisation.
mod afa;
mod attention;
mod generate;

use std::fmt;
use std::str::FromStr;
use std::time::Instant;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::{Init, VarBuilder, var_builder::SimpleBackend};

use crate::models::ModelError;
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{Conditioning, LayerInput, SkipStack, StagedUNet, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};

/// Errors of the benchmark.
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("invalid benchmark option: {0}")]
    Option(String),
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
    #[error(transparent)]
    Load(#[from] crate::loading::LoadError),
}

/// A component to time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BenchPart {
    /// UNet forward, batch `unet_batch`, at each of `unet_sizes` latent sizes.
    Unet,
    /// VAE decode of a `[vae_batch, 4, vae_latent, vae_latent]` latent.
    Vae,
    /// CLIP text encoder on `[text_batch, 77]` ids.
    Text,
    /// One AFA step (N members + 25 aggregators) against N single UNet steps.
    Afa,
    /// Whole generations (text encode, DDIM with CFG, VAE decode; PNG encoding excluded):
    /// one model for `gen_steps`, then AFA with each `gen_members[i]` members for
    /// `afa_gen_steps[i]` steps.
    Generate,
    /// Images per second of one model at each of `throughput_batches` images per batch.
    Throughput,
    /// The default attention path (fused on the CPU, flash on a GPU) against the sliced one.
    Attention,
}

impl BenchPart {
    /// Every part, in report order.
    pub const ALL: [BenchPart; 3] = [BenchPart::Unet, BenchPart::Vae, BenchPart::Text];
}

impl FromStr for BenchPart {
    type Err = BenchError;

    /// `unet`, `vae`, `text` (or `clip`).
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.to_ascii_lowercase().as_str() {
            "unet" => Ok(BenchPart::Unet),
            "vae" => Ok(BenchPart::Vae),
            "text" | "clip" => Ok(BenchPart::Text),
            "afa" => Ok(BenchPart::Afa),
            "generate" | "gen" => Ok(BenchPart::Generate),
            "throughput" => Ok(BenchPart::Throughput),
            "attention" => Ok(BenchPart::Attention),
            other => Err(BenchError::Option(format!(
                "unknown part {other:?} (expected unet, vae, text, afa, generate, throughput or attention)"
            ))),
        }
    }
}

/// What to measure.
#[derive(Debug, Clone)]
pub struct BenchOptions {
    pub parts: Vec<BenchPart>,
    /// Timed runs per measurement after one warm-up run (the median is reported).
    pub repeats: usize,
    /// UNet latent sizes (pixels / 8), each square.
    pub unet_sizes: Vec<usize>,
    pub unet_batch: usize,
    /// VAE latent size (square); 64 decodes to 512 px.
    pub vae_latent: usize,
    /// Images per VAE decode.
    pub vae_batch: usize,
    pub text_batch: usize,
    /// CPU threads; sets `RAYON_NUM_THREADS` (which limits candle's CPU backend) when given.
    /// Must be decided before any other candle op of the process runs.
    pub threads: Option<usize>,
    /// Also time each UNet layer (one extra run per size) and report the slowest layers.
    pub unet_layers: bool,
    /// Ensemble sizes of the `afa` part.
    pub afa_members: Vec<usize>,
    pub seed: u64,
    /// Where everything runs (weights, inputs).
    pub device: Device,
    /// Weight precision (f32, or f16/bf16 on a GPU; f16 also runs on the CPU).
    pub dtype: DType,
    /// Image side in pixels of the `generate` and `throughput` parts.
    pub gen_size: usize,
    /// DDIM steps of the single-model generation and of the throughput runs.
    pub gen_steps: usize,
    /// DDIM steps of each AFA generation (paired with `gen_members`).
    pub afa_gen_steps: Vec<usize>,
    /// Members of each AFA generation.
    pub gen_members: Vec<usize>,
    /// Images per batch of the `throughput` part.
    pub throughput_batches: Vec<usize>,
}

impl Default for BenchOptions {
    fn default() -> Self {
        Self {
            parts: BenchPart::ALL.to_vec(),
            repeats: 3,
            unet_sizes: vec![32, 64],
            unet_batch: 2,
            vae_latent: 64,
            vae_batch: 1,
            text_batch: 2,
            threads: None,
            unet_layers: false,
            afa_members: vec![2, 3],
            seed: 0,
            device: Device::Cpu,
            dtype: DType::F32,
            gen_size: 512,
            gen_steps: 50,
            afa_gen_steps: vec![20],
            gen_members: vec![3],
            throughput_batches: vec![1, 4, 8],
        }
    }
}

/// One timed measurement.
#[derive(Debug, Clone)]
pub struct BenchRow {
    /// What ran, e.g. `UNet forward`.
    pub name: String,
    /// Input shape, e.g. `[2, 4, 64, 64]`.
    pub input: String,
    pub median_s: f64,
    pub min_s: f64,
    pub max_s: f64,
    pub repeats: usize,
    /// Seconds to build the component (random weights included).
    pub build_s: f64,
    /// Peak RSS in MiB while this part ran (process-wide when the kernel cannot reset it).
    pub peak_rss_mib: f64,
}

/// The machine the benchmark ran on.
#[derive(Debug, Clone)]
pub struct MachineInfo {
    pub cpu: String,
    pub logical_cores: usize,
    /// Threads candle's CPU backend uses.
    pub threads: usize,
    /// SIMD candle's own kernels were compiled with (gemm picks AVX-512 etc. at run time).
    pub simd: String,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Weight precision.
    pub dtype: String,
}

impl MachineInfo {
    /// Reads `/proc/cpuinfo` and candle's settings.
    pub fn detect(device: &Device, dtype: DType) -> Self {
        let cpu = std::fs::read_to_string("/proc/cpuinfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .find(|l| l.starts_with("model name"))
                    .and_then(|l| l.split_once(':'))
                    .map(|(_, v)| v.trim().to_string())
            })
            .unwrap_or_else(|| "unknown".to_string());
        let simd = [
            ("avx", candle_core::utils::with_avx()),
            ("f16c", candle_core::utils::with_f16c()),
            ("neon", candle_core::utils::with_neon()),
        ]
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect::<Vec<_>>()
        .join("+");
        Self {
            cpu,
            logical_cores: std::thread::available_parallelism().map_or(1, |n| n.get()),
            threads: candle_core::utils::get_num_threads(),
            simd: if simd.is_empty() { "none".into() } else { simd },
            device: match device.location() {
                candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
                _ => "cpu".into(),
            },
            dtype: format!("{dtype:?}").to_lowercase(),
        }
    }
}

/// Time of one UNet layer (from `BenchOptions::unet_layers`).
#[derive(Debug, Clone)]
pub struct LayerTime {
    /// Latent size of the run.
    pub latent: usize,
    pub layer: String,
    pub seconds: f64,
}

/// The benchmark's result; `Display` renders markdown.
#[derive(Debug, Clone)]
pub struct BenchReport {
    pub machine: MachineInfo,
    pub rows: Vec<BenchRow>,
    pub layers: Vec<LayerTime>,
    /// Derived ratios, one line each.
    pub notes: Vec<String>,
}

impl fmt::Display for BenchReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let m = &self.machine;
        writeln!(
            f,
            "candle {} {} {} | {} | {} logical cores | {} threads | simd {}\n",
            candle_version(),
            m.dtype,
            m.device,
            m.cpu,
            m.logical_cores,
            m.threads,
            m.simd
        )?;
        writeln!(
            f,
            "| part | input | median s | min s | max s | runs | build s | peak RSS MiB |"
        )?;
        writeln!(f, "|---|---|---:|---:|---:|---:|---:|---:|")?;
        for r in &self.rows {
            writeln!(
                f,
                "| {} | {} | {:.3} | {:.3} | {:.3} | {} | {:.1} | {:.0} |",
                r.name, r.input, r.median_s, r.min_s, r.max_s, r.repeats, r.build_s, r.peak_rss_mib
            )?;
        }
        for note in &self.notes {
            writeln!(f, "\n{note}")?;
        }
        if !self.layers.is_empty() {
            writeln!(f, "\n| latent | UNet layer | s |\n|---:|---|---:|")?;
            for l in &self.layers {
                writeln!(f, "| {} | {} | {:.3} |", l.latent, l.layer, l.seconds)?;
            }
        }
        Ok(())
    }
}

fn candle_version() -> &'static str {
    "0.11.1"
}

/// Runs the benchmark described by `opts`.
pub fn run(opts: &BenchOptions) -> Result<BenchReport, BenchError> {
    validate(opts)?;
    if let Some(n) = opts.threads {
        // SAFETY: called from the CLI's main thread before any candle op has started the
        // rayon pool or other threads that read the environment.
        unsafe { std::env::set_var("RAYON_NUM_THREADS", n.to_string()) };
    }
    let mut report = BenchReport {
        machine: MachineInfo::detect(&opts.device, opts.dtype),
        rows: Vec::new(),
        layers: Vec::new(),
        notes: Vec::new(),
    };
    for part in &opts.parts {
        match part {
            BenchPart::Unet => bench_unet(opts, &mut report)?,
            BenchPart::Vae => report.rows.push(bench_vae(opts)?),
            BenchPart::Text => report.rows.push(bench_text(opts)?),
            BenchPart::Afa => afa::bench_afa(opts, &mut report)?,
            BenchPart::Attention => attention::bench_attention(opts, &mut report)?,
            BenchPart::Generate => generate::bench_generate(opts, &mut report)?,
            BenchPart::Throughput => generate::bench_throughput(opts, &mut report)?,
        }
    }
    Ok(report)
}

fn validate(opts: &BenchOptions) -> Result<(), BenchError> {
    let bad = |m: &str| Err(BenchError::Option(m.to_string()));
    if opts.repeats == 0 {
        return bad("repeats must be at least 1");
    }
    if opts.parts.is_empty() {
        return bad("no part to benchmark");
    }
    if opts.unet_batch == 0 || opts.text_batch == 0 {
        return bad("batch sizes must be at least 1");
    }
    if opts.unet_sizes.iter().any(|&s| s == 0 || s % 8 != 0) || opts.vae_latent == 0 {
        return bad("UNet latent sizes must be positive multiples of 8; VAE latent positive");
    }
    if opts.threads == Some(0) {
        return bad("threads must be at least 1");
    }
    if opts.gen_size == 0 || !opts.gen_size.is_multiple_of(64) {
        return bad("the generation size must be a positive multiple of 64 pixels");
    }
    if opts.gen_steps == 0
        || opts.afa_gen_steps.contains(&0)
        || opts.gen_members.iter().any(|n| !(1..=8).contains(n))
    {
        return bad("generation steps must be at least 1 and members within 1..=8");
    }
    if opts.gen_members.is_empty() || opts.gen_members.len() != opts.afa_gen_steps.len() {
        return bad(
            "give one AFA step count per member count (--gen-members 3,2 --afa-gen-steps 20,30)",
        );
    }
    if opts.throughput_batches.is_empty() || opts.throughput_batches.contains(&0) {
        return bad("throughput batches must be at least 1");
    }
    if let Err(e) = crate::models::check_precision(opts.dtype, &opts.device) {
        return bad(&e);
    }
    Ok(())
}

/// Random weights (see [`RandomWeights`]) in `opts.dtype` on `opts.device`.
pub(crate) fn random_vb(seed: u64, opts: &BenchOptions) -> VarBuilder<'static> {
    VarBuilder::from_backend(
        Box::new(RandomWeights { seed }),
        opts.dtype,
        opts.device.clone(),
    )
}

/// A `dims` N(0, std^2) input in `opts.dtype` on `opts.device`.
pub(crate) fn random_input(
    dims: &[usize],
    std: f32,
    seed: u64,
    opts: &BenchOptions,
) -> candle_core::Result<Tensor> {
    random_tensor(dims, std, seed)?
        .to_dtype(opts.dtype)?
        .to_device(&opts.device)
}

fn bench_unet(opts: &BenchOptions, report: &mut BenchReport) -> Result<(), BenchError> {
    reset_peak_rss();
    let start = Instant::now();
    let unet = StagedUNet::new(&UNetConfig::sd15(), random_vb(opts.seed, opts))?;
    let build_s = start.elapsed().as_secs_f64();
    let b = opts.unet_batch;
    for &size in &opts.unet_sizes {
        let sample = random_input(&[b, 4, size, size], 1.0, opts.seed ^ 1, opts)?;
        let context = random_input(&[b, 77, 768], 1.0, opts.seed ^ 2, opts)?;
        let timesteps = Tensor::from_vec(vec![500f32; b], b, &opts.device)?;
        let times = time_runs(opts.repeats, &opts.device, || {
            unet.forward(&sample, &timesteps, &context).map(drop)
        })?;
        report
            .rows
            .push(row("UNet forward", sample.dims(), &times, build_s));
        if opts.unet_layers {
            report
                .layers
                .extend(unet_layer_times(&unet, &sample, &timesteps, &context)?);
        }
    }
    Ok(())
}

/// One UNet pass with each layer timed. Shapes as `StagedUNet::forward`.
fn unet_layer_times(
    unet: &StagedUNet,
    sample: &Tensor,
    timesteps: &Tensor,
    context: &Tensor,
) -> Result<Vec<LayerTime>, BenchError> {
    let latent = sample.dim(3)?;
    let temb = unet.time_embedding(timesteps)?;
    let cond = Conditioning {
        temb: &temb,
        context,
    };
    let mut skips = SkipStack::default();
    let mut hidden = sample.clone();
    let mut out = Vec::new();
    for (i, info) in unet.plan().iter().enumerate() {
        let take = skips.take(info)?;
        let input = LayerInput {
            hidden: &hidden,
            skip: take.skip.as_ref(),
            upsample_to: take.upsample_to,
        };
        let start = Instant::now();
        hidden = unet.run_layer(i, &input, &cond)?;
        out.push(LayerTime {
            latent,
            layer: format!("{:?}", info.layer),
            seconds: start.elapsed().as_secs_f64(),
        });
        if info.pushes_skip {
            skips.push(hidden.clone());
        }
    }
    Ok(out)
}

fn bench_vae(opts: &BenchOptions) -> Result<BenchRow, BenchError> {
    reset_peak_rss();
    let start = Instant::now();
    let vae = AutoencoderKL::new(&VaeConfig::sd15(), random_vb(opts.seed, opts))?;
    let build_s = start.elapsed().as_secs_f64();
    let s = opts.vae_latent;
    let z = random_input(&[opts.vae_batch.max(1), 4, s, s], 1.0, opts.seed ^ 3, opts)?;
    let times = time_runs(opts.repeats, &opts.device, || vae.decode(&z).map(drop))?;
    Ok(row("VAE decode", z.dims(), &times, build_s))
}

fn bench_text(opts: &BenchOptions) -> Result<BenchRow, BenchError> {
    reset_peak_rss();
    let start = Instant::now();
    let clip = ClipTextModel::new(&ClipTextConfig::sd15(), random_vb(opts.seed, opts))?;
    let build_s = start.elapsed().as_secs_f64();
    let b = opts.text_batch;
    let mut rng = SplitMix64::new(opts.seed ^ 4);
    let ids: Vec<u32> = (0..b * 77).map(|_| (rng.next() % 49408) as u32).collect();
    let ids = Tensor::from_vec(ids, (b, 77), &opts.device)?;
    let times = time_runs(opts.repeats, &opts.device, || clip.forward(&ids).map(drop))?;
    Ok(row("text encode", ids.dims(), &times, build_s))
}

/// One untimed warm-up run, then `repeats` timed runs, each ended by a synchronisation of
/// `device` (GPU work is asynchronous); returns the sorted times in seconds.
pub(crate) fn time_runs(
    repeats: usize,
    device: &Device,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> Result<Vec<f64>, BenchError> {
    f()?;
    time_warm_runs(repeats, device, f)
}

/// `repeats` timed runs of `f`, already warmed up, each ended by a synchronisation of `device`;
/// returns the sorted times in seconds.
pub(crate) fn time_warm_runs(
    repeats: usize,
    device: &Device,
    mut f: impl FnMut() -> candle_core::Result<()>,
) -> Result<Vec<f64>, BenchError> {
    device.synchronize()?;
    let mut times = Vec::with_capacity(repeats);
    for _ in 0..repeats {
        let start = Instant::now();
        f()?;
        device.synchronize()?;
        times.push(start.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

/// A report row from sorted `times`.
pub(crate) fn row(name: &str, dims: &[usize], times: &[f64], build_s: f64) -> BenchRow {
    let n = times.len();
    let median_s = if n % 2 == 1 {
        times[n / 2]
    } else {
        (times[n / 2 - 1] + times[n / 2]) / 2.0
    };
    BenchRow {
        name: name.to_string(),
        input: format!("{dims:?}"),
        median_s,
        min_s: times[0],
        max_s: times[n - 1],
        repeats: n,
        build_s,
        peak_rss_mib: peak_rss_mib(),
    }
}

/// `VmHWM` of this process in MiB (0 when unavailable).
pub fn peak_rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<f64>().ok())
        })
        .map_or(0.0, |kb| kb / 1024.0)
}

/// Resets `VmHWM` to the current RSS (Linux `clear_refs` 5); best effort.
pub(crate) fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// splitmix64: a tiny, fast, seedable generator.
#[derive(Debug, Clone)]
struct SplitMix64(u64);

impl SplitMix64 {
    fn new(seed: u64) -> Self {
        Self(seed)
    }

    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Two independent N(0, 1) samples (Box-Muller).
    fn normal_pair(&mut self) -> (f32, f32) {
        let x = self.next();
        let u1 = ((x >> 40) as f32 + 0.5) * (1.0 / (1u64 << 24) as f32);
        let u2 = ((x & 0xFF_FFFF) as f32) * (1.0 / (1u64 << 24) as f32);
        let r = (-2.0 * u1.ln()).sqrt();
        let (s, c) = (std::f32::consts::TAU * u2).sin_cos();
        (r * c, r * s)
    }
}

/// Elements generated from one seed; fixed so the values do not depend on the thread count.
const CHUNK: usize = 1 << 16;

/// `n` N(0, std^2) values from `seed`, generated in parallel chunks.
fn normal_values(n: usize, std: f32, seed: u64) -> Vec<f32> {
    let mut out = vec![0f32; n];
    let threads = std::thread::available_parallelism().map_or(1, |t| t.get());
    let per_thread = n.div_ceil(CHUNK).div_ceil(threads).max(1) * CHUNK;
    std::thread::scope(|scope| {
        for (t, part) in out.chunks_mut(per_thread).enumerate() {
            scope.spawn(move || {
                for (c, chunk) in part.chunks_mut(CHUNK).enumerate() {
                    let index = (t * per_thread / CHUNK + c) as u64;
                    let mut rng = SplitMix64::new(seed ^ index.wrapping_mul(0xD6E8_FEB8_6659_FD93));
                    for pair in chunk.chunks_mut(2) {
                        let (a, b) = rng.normal_pair();
                        pair[0] = a * std;
                        if let Some(v) = pair.get_mut(1) {
                            *v = b * std;
                        }
                    }
                }
            });
        }
    });
    out
}

/// A `dims` f32 tensor of N(0, std^2) values on the CPU.
pub(crate) fn random_tensor(dims: &[usize], std: f32, seed: u64) -> candle_core::Result<Tensor> {
    let n = dims.iter().product();
    Tensor::from_vec(normal_values(n, std, seed), dims, &Device::Cpu)
}

/// 64-bit FNV-1a of a tensor name, to give every tensor its own stream.
fn name_hash(name: &str) -> u64 {
    name.bytes().fold(0xCBF2_9CE4_8422_2325, |h, b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

/// Deterministic random weights for `VarBuilder::from_backend`: tensors of rank >= 2 are
/// N(0, 1/fan_in) (fan_in = product of all but the first dimension), rank-1 `*.weight` (norm
/// scales) are ones, every other rank-1 tensor (biases) zeros. Every name exists.
#[derive(Debug, Clone, Copy)]
pub struct RandomWeights {
    pub seed: u64,
}

impl SimpleBackend for RandomWeights {
    fn get(
        &self,
        s: Shape,
        name: &str,
        _hint: Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let dims = s.dims();
        let t = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let std = 1.0 / (fan_in.max(1) as f32).sqrt();
            random_tensor(dims, std, self.seed ^ name_hash(name))?
        } else if name.ends_with("weight") {
            Tensor::ones(s, DType::F32, &Device::Cpu)?
        } else {
            Tensor::zeros(s, DType::F32, &Device::Cpu)?
        };
        t.to_dtype(dtype)?.to_device(dev)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> candle_core::Result<Tensor> {
        candle_core::bail!("random weights need a shape for {name}")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn random_weights_are_deterministic_and_scaled() -> candle_core::Result<()> {
        let opts = BenchOptions::default();
        let vb = random_vb(7, &opts);
        let a = vb.get((64, 256), "a.weight")?;
        let a2 = random_vb(7, &opts).get((64, 256), "a.weight")?;
        let diff = (&a - &a2)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert_eq!(diff, 0.0);
        let var = a.sqr()?.mean_all()?.to_scalar::<f32>()?;
        assert!((var * 256.0 - 1.0).abs() < 0.05, "variance {var}");
        let ones = vb.get(8, "norm.weight")?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(ones, 8.0);
        let zeros = vb.get(8, "norm.bias")?.sum_all()?.to_scalar::<f32>()?;
        assert_eq!(zeros, 0.0);
        Ok(())
    }

    #[test]
    fn parts_parse_and_options_validate() {
        assert_eq!("CLIP".parse::<BenchPart>().unwrap(), BenchPart::Text);
        assert!("foo".parse::<BenchPart>().is_err());
        let opts = BenchOptions {
            repeats: 0,
            ..Default::default()
        };
        assert!(validate(&opts).is_err());
        assert!(validate(&BenchOptions::default()).is_ok());
    }
}
