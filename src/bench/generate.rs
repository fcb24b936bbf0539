//! The `generate` and `throughput` parts of `afa bench`: whole text-to-image generations
//! through `SdPipeline` on full-size random weights (the embedded CLIP vocabulary, SD1.5's
//! DDIM config, classifier-free guidance 7.5), timed from the request to the PNG bytes.
use std::sync::Arc;
use std::time::Instant;

use super::afa::random_ensemble;
use super::{
    BenchError, BenchOptions, BenchReport, random_vb, reset_peak_rss, row, time_warm_runs,
};
use crate::ensemble::EnsembleMode;
use crate::loading::tokenizer_files::embedded_tokenizer;
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{StagedUNet, UNetConfig};
use crate::models::vae::{AutoencoderKL, VaeConfig};
use crate::pipeline::{
    BatchRequest, Denoiser, ImageSpec, Limits, MapsRequest, SdPipeline, SingleUNet,
};
use crate::schedulers::{SchedulerConfig, SchedulerKind};

fn pipeline<D: Denoiser>(
    opts: &BenchOptions,
    denoiser: D,
    vae: AutoencoderKL,
) -> Result<SdPipeline<D>, BenchError> {
    let max_batch = opts.throughput_batches.iter().copied().max().unwrap_or(1);
    Ok(SdPipeline {
        tokenizer: embedded_tokenizer()?,
        denoiser,
        vae,
        scheduler_config: SchedulerConfig::default(),
        device: opts.device.clone(),
        model_name: "bench".into(),
        limits: Limits {
            max_batch: max_batch.max(Limits::default().max_batch),
            ..Limits::default()
        },
    })
}

/// `images` images of `opts.gen_size` pixels, `steps` DDIM steps, CFG 7.5, seeds 0, 1, ...
fn request(opts: &BenchOptions, images: usize, steps: usize) -> BatchRequest {
    BatchRequest {
        images: (0..images)
            .map(|i| ImageSpec {
                prompt: "a lighthouse at dusk, oil painting".into(),
                negative_prompt: "blurry".into(),
                seed: i as u64,
                guidance_scale: 7.5,
                init: None,
            })
            .collect(),
        width: opts.gen_size,
        height: opts.gen_size,
        steps,
        scheduler: SchedulerKind::Ddim,
        strength: None,
        initial_latents: None,
        attention_maps: MapsRequest::Off,
    }
}

fn single_model(opts: &BenchOptions) -> Result<SdPipeline<SingleUNet>, BenchError> {
    let denoiser = SingleUNet {
        text_encoder: ClipTextModel::new(&ClipTextConfig::sd15(), random_vb(opts.seed ^ 7, opts))?,
        unet: StagedUNet::new(&UNetConfig::sd15(), random_vb(opts.seed + 101, opts))?,
    };
    let vae = AutoencoderKL::new(&VaeConfig::sd15(), random_vb(opts.seed, opts))?;
    pipeline(opts, denoiser, vae)
}

/// Times `repeats` runs of `req` after a warm-up of one step at the same size (every shape,
/// text encode and decode once: a whole warm-up generation would double a 512 px run).
fn time_generation<D: Denoiser>(
    opts: &BenchOptions,
    p: &SdPipeline<D>,
    req: &BatchRequest,
) -> Result<Vec<f64>, BenchError> {
    let run = |req: &BatchRequest| {
        p.generate(req, &mut ())
            .map(drop)
            .map_err(|e| candle_core::Error::Msg(e.to_string()))
    };
    run(&BatchRequest {
        steps: 1,
        ..req.clone()
    })?;
    time_warm_runs(opts.repeats, &opts.device, || run(req))
}

/// One image with one model for `gen_steps`, then with AFA for each pair of `gen_members` and
/// `afa_gen_steps`.
pub(super) fn bench_generate(
    opts: &BenchOptions,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let s = opts.gen_size;
    reset_peak_rss();
    let start = Instant::now();
    let single = single_model(opts)?;
    let build_s = start.elapsed().as_secs_f64();
    let req = request(opts, 1, opts.gen_steps);
    let times = time_generation(opts, &single, &req)?;
    let name = format!("generate, 1 model, {} DDIM steps, CFG", opts.gen_steps);
    report.rows.push(row(&name, &[1, 3, s, s], &times, build_s));
    drop(single);

    for (&n, &steps) in opts.gen_members.iter().zip(&opts.afa_gen_steps) {
        reset_peak_rss();
        let start = Instant::now();
        let text = Arc::new(ClipTextModel::new(
            &ClipTextConfig::sd15(),
            random_vb(opts.seed ^ 7, opts),
        )?);
        let ensemble = random_ensemble(opts, n, &text)?;
        let vae = AutoencoderKL::new(&VaeConfig::sd15(), random_vb(opts.seed, opts))?;
        let denoiser = ensemble
            .denoiser(&EnsembleMode::Afa)
            .map_err(|e| BenchError::Option(e.to_string()))?;
        let afa = pipeline(opts, denoiser, vae)?;
        let build_s = start.elapsed().as_secs_f64();
        let times = time_generation(opts, &afa, &request(opts, 1, steps))?;
        let name = format!("generate, AFA N={n}, {steps} DDIM steps, CFG");
        report.rows.push(row(&name, &[1, 3, s, s], &times, build_s));
    }
    Ok(())
}

/// Images per second of one model at each batch size of `throughput_batches` (`gen_steps`).
pub(super) fn bench_throughput(
    opts: &BenchOptions,
    report: &mut BenchReport,
) -> Result<(), BenchError> {
    let s = opts.gen_size;
    reset_peak_rss();
    let start = Instant::now();
    let single = single_model(opts)?;
    let build_s = start.elapsed().as_secs_f64();
    for &b in &opts.throughput_batches {
        let req = request(opts, b, opts.gen_steps);
        let times = time_generation(opts, &single, &req)?;
        let name = format!("batch of {b}, 1 model, {} DDIM steps, CFG", opts.gen_steps);
        let r = row(&name, &[b, 3, s, s], &times, build_s);
        report.notes.push(format!(
            "max-batch {b}: {:.3} images/s ({} px, {} DDIM steps, 1 model, {} {})",
            b as f64 / r.median_s,
            s,
            opts.gen_steps,
            report.machine.dtype,
            report.machine.device
        ));
        report.rows.push(r);
    }
    Ok(())
}
