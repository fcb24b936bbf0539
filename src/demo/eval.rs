//! The evaluation behind `afa eval`: every mode of one ensemble on the demonstration world.
//!
//! - Denoising loss: the conditional eps-MSE on held-out renders (posterior-mean latents) at
//!   fixed timesteps with fixed noises (noise of image i at timestep t from seed `i * 1000 + t`),
//!   per image averaged over the timesteps, with the paired standard error of each mode's
//!   difference to AFA. MagicFusion is a guided method: it is scored at guidance 1 (its fused
//!   noise then blends the members' conditional predictions).
//! - Prompt alignment: every scene's caption at `seeds` seeds, generated with the ensemble's
//!   sampler, judged by pixels (colour, shape, position, all three) with binomial standard errors.
//! - Routing: for AFA, the mean weight of each member at each aggregation point, over the
//!   conditional rows, pixels and steps, per shape of the prompt.
//! - The VAE round trip of the held-out renders, judged like generated images.
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use image::RgbImage;

use super::judge::{Tally, judge};
use super::render::render;
use super::world::{IMAGE_SIZE, Scene, Shape};
use crate::ensemble::EnsembleMode;
use crate::loading::ensemble::LoadedEnsemble;
use crate::pipeline::noise::ImageRng;
use crate::pipeline::{
    BatchRequest, CollectedMaps, ImageSpec, Limits, MapsRequest, SdPipeline, to_rgb8,
};
use crate::schedulers::{NoiseSchedule, SchedulerKind};

/// What to measure.
#[derive(Debug, Clone)]
pub struct EvalOptions {
    pub modes: Vec<EnsembleMode>,
    /// Seeds per caption for the alignment part (seed s of every caption is `seed_base + s`).
    pub seeds: usize,
    pub seed_base: u64,
    pub steps: usize,
    pub guidance: f64,
    pub scheduler: SchedulerKind,
    /// Held-out renders per scene for the denoising loss, and the seed of their jitter.
    pub heldout_per_scene: usize,
    pub heldout_seed: u64,
    pub timesteps: Vec<usize>,
    /// Images per generation batch.
    pub batch: usize,
    /// Write every generated image here (`{mode}/NNNNNN.png` + `metadata.jsonl`).
    pub out: Option<PathBuf>,
}

/// One mode's results.
#[derive(Debug, Clone, serde::Serialize)]
pub struct ModeReport {
    pub mode: String,
    /// Mean eps-MSE over held-out images and timesteps.
    pub eps_mse: f64,
    /// Mean eps-MSE per timestep of `EvalOptions::timesteps`.
    pub eps_mse_per_t: Vec<f64>,
    /// Mean of (this mode's per-image MSE - AFA's) and its standard error.
    pub vs_afa: Option<(f64, f64)>,
    /// Correct judgements: colour, shape, position, all three.
    pub correct: [usize; 4],
    pub images: usize,
    /// `routing[shape][point][member]`: mean expert weight (AFA and mean only).
    pub routing: Option<Routing>,
}

impl ModeReport {
    fn tally(&self) -> Tally {
        Tally {
            correct: self.correct,
            total: self.images,
        }
    }

    /// Accuracy of attribute `i` (colour, shape, position, all three) and its standard error.
    pub fn accuracy(&self, i: usize) -> (f64, f64) {
        self.tally().accuracy(i)
    }
}

/// The whole evaluation.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub members: Vec<String>,
    pub timesteps: Vec<usize>,
    pub heldout_images: usize,
    /// The judge on the VAE round trip of the held-out renders: colour, shape, position, all.
    pub vae_round_trip_correct: [usize; 4],
    pub modes: Vec<ModeReport>,
}

type Result<T> = anyhow::Result<T>;

/// `routing[shape][point][member]`: mean expert weight.
pub type Routing = Vec<Vec<Vec<f64>>>;

/// `[B, 3, 64, 64]` in [-1, 1] from 8-bit pictures.
fn pixels(images: &[RgbImage], device: &Device) -> Result<Tensor> {
    let n = IMAGE_SIZE;
    let flat: Vec<f32> = images
        .iter()
        .flat_map(|img| img.as_raw().iter().map(|&v| v as f32 / 127.5 - 1.0))
        .collect();
    Ok(Tensor::from_vec(flat, (images.len(), n, n, 3), device)?.permute((0, 3, 1, 2))?)
}

/// `[B, 3, H, W]` in [-1, 1] -> pictures (the pipeline's own 8-bit conversion).
fn pictures(image: &Tensor) -> Result<Vec<RgbImage>> {
    let (_, _, h, w) = image.dims4()?;
    to_rgb8(&image.to_dtype(DType::F32)?)?
        .into_iter()
        .map(|raw| {
            RgbImage::from_raw(w as u32, h as u32, raw).ok_or_else(|| anyhow::anyhow!("size"))
        })
        .collect()
}

struct Heldout {
    scenes: Vec<Scene>,
    /// Scaled posterior-mean latents `[B, 4, h, w]` f32.
    latents: Tensor,
    /// `[2B, 77]` u32: empty prompts, then the captions.
    ids: Tensor,
}

fn heldout(
    loaded: &LoadedEnsemble,
    opts: &EvalOptions,
    device: &Device,
) -> Result<(Heldout, [usize; 4])> {
    let mut scenes = Vec::new();
    let mut images = Vec::new();
    for k in 0..opts.heldout_per_scene {
        for (j, scene) in Scene::all().into_iter().enumerate() {
            let index = (k * 60 + j) as u64;
            images.push(render(
                &scene,
                opts.heldout_seed.wrapping_mul(1_000_000) + index,
            ));
            scenes.push(scene);
        }
    }
    let vae = &loaded.vae;
    let x = pixels(&images, device)?.to_dtype(vae.dtype())?;
    let mean = vae.encode(&x)?.mode();
    let latents = vae.scale_latents(&mean)?.to_dtype(DType::F32)?;
    let decoded = vae.decode(&vae.unscale_latents(&latents.to_dtype(vae.dtype())?)?)?;
    let mut round_trip = Tally::default();
    for (img, scene) in pictures(&decoded)?.iter().zip(&scenes) {
        round_trip.add(judge(img).score(scene));
    }
    let mut rows: Vec<u32> = Vec::new();
    let texts = scenes
        .iter()
        .map(|_| String::new())
        .chain(scenes.iter().map(|s| s.caption()));
    let mut len = 0;
    for text in texts {
        let t = loaded.tokenizer.encode(&text);
        len = t.ids.len();
        rows.extend(t.ids);
    }
    let ids = Tensor::from_vec(rows, (2 * scenes.len(), len), device)?;
    Ok((
        Heldout {
            scenes,
            latents,
            ids,
        },
        round_trip.correct,
    ))
}

/// Per held-out image, the eps-MSE at each timestep: `[t][image]`.
fn denoising_loss(
    loaded: &LoadedEnsemble,
    mode: &EnsembleMode,
    data: &Heldout,
    opts: &EvalOptions,
    device: &Device,
) -> Result<Vec<Vec<f64>>> {
    let denoiser = loaded.ensemble.denoiser(mode)?;
    let schedule = NoiseSchedule::new(&loaded.scheduler)?;
    let b = data.scenes.len();
    let dims = data.latents.dims().to_vec();
    let per_image: usize = dims[1..].iter().product();
    let mut out = Vec::new();
    for &t in &opts.timesteps {
        let mut mse = Vec::with_capacity(b);
        for start in (0..b).step_by(opts.batch.max(1)) {
            let end = (start + opts.batch.max(1)).min(b);
            let n = end - start;
            let noise: Vec<f32> = (start..end)
                .flat_map(|i| ImageRng::new(i as u64 * 1000 + t as u64).normals(per_image))
                .collect();
            let mut shape = dims.clone();
            shape[0] = n;
            let noise = Tensor::from_vec(noise, shape.as_slice(), device)?;
            let x0 = data.latents.narrow(0, start, n)?;
            let x_t = schedule.add_noise(&x0, &noise, &vec![t; n])?;
            let rows: Vec<u32> = (start..end)
                .chain(b + start..b + end)
                .map(|r| r as u32)
                .collect();
            let ids = data
                .ids
                .index_select(&Tensor::new(rows.as_slice(), device)?, 0)?;
            let context = denoiser.encode(&ids)?;
            let doubled = Tensor::cat(&[&x_t, &x_t], 0)?;
            let t_batch = Tensor::full(t as f32, 2 * n, device)?;
            let guidance = Tensor::ones((n, 1, 1, 1), DType::F32, device)?;
            let eps = denoiser.predict(&doubled, &t_batch, &guidance, &context, None)?;
            let cond = eps.narrow(0, n, n)?;
            let err = (cond - &noise)?.sqr()?.flatten_from(1)?.mean(1)?;
            mse.extend(err.to_vec1::<f32>()?.into_iter().map(f64::from));
        }
        out.push(mse);
    }
    Ok(out)
}

/// Generates every caption at every seed; judges and (optionally) writes the pictures.
fn alignment(
    loaded: &LoadedEnsemble,
    mode: &EnsembleMode,
    opts: &EvalOptions,
    device: &Device,
) -> Result<(Tally, Option<Routing>)> {
    let pipeline = SdPipeline {
        tokenizer: loaded.tokenizer.clone(),
        denoiser: loaded.ensemble.denoiser(mode)?,
        vae: loaded.vae.clone(),
        scheduler_config: loaded.scheduler.clone(),
        device: device.clone(),
        model_name: format!("demo ({mode})"),
        limits: Limits {
            max_batch: opts.batch.max(1),
            ..Limits::default()
        },
    };
    let wants_maps = matches!(mode, EnsembleMode::Afa | EnsembleMode::Mean);
    let jobs: Vec<(Scene, u64)> = (0..opts.seeds as u64)
        .flat_map(|s| {
            Scene::all()
                .into_iter()
                .map(move |scene| (scene, opts.seed_base + s))
        })
        .collect();
    let dir = opts
        .out
        .as_ref()
        .map(|d| d.join(mode.to_string().replace(':', "-")));
    if let Some(d) = &dir {
        std::fs::create_dir_all(d)?;
    }
    let mut listing = String::new();
    let mut tally = Tally::default();
    let members = loaded.ensemble.members().len();
    // sums[shape][point][member], counts[shape]
    let mut sums: Vec<Vec<Vec<f64>>> = vec![Vec::new(); Shape::ALL.len()];
    let mut counts = vec![0usize; Shape::ALL.len()];
    for (chunk_index, chunk) in jobs.chunks(opts.batch.max(1)).enumerate() {
        let request = BatchRequest {
            images: chunk
                .iter()
                .map(|(scene, seed)| ImageSpec {
                    prompt: scene.caption(),
                    negative_prompt: String::new(),
                    seed: *seed,
                    guidance_scale: opts.guidance,
                    init: None,
                })
                .collect(),
            width: IMAGE_SIZE,
            height: IMAGE_SIZE,
            steps: opts.steps,
            scheduler: opts.scheduler,
            strength: None,
            initial_latents: None,
            attention_maps: if wants_maps {
                MapsRequest::Averaged(crate::pipeline::MapPoints::ALL)
            } else {
                MapsRequest::Off
            },
        };
        let output = pipeline.generate(&request, &mut ())?;
        for (image, (scene, seed)) in output.images.iter().zip(chunk) {
            let img =
                RgbImage::from_raw(image.width as u32, image.height as u32, image.rgb.clone())
                    .ok_or_else(|| anyhow::anyhow!("image size"))?;
            tally.add(judge(&img).score(scene));
            if let Some(d) = &dir {
                let file = format!("{:06}.png", chunk_index * opts.batch.max(1) + image.index);
                std::fs::write(d.join(&file), &image.png)?;
                let line =
                    serde_json::json!({"file_name": file, "text": scene.caption(), "seed": seed});
                listing.push_str(&format!("{line}\n"));
            }
        }
        if let Some(CollectedMaps::Averaged(points)) = &output.attention_maps {
            let b = chunk.len();
            for (row, (scene, _)) in chunk.iter().enumerate() {
                let s = Shape::ALL
                    .iter()
                    .position(|x| *x == scene.shape)
                    .unwrap_or(0);
                if sums[s].is_empty() {
                    sums[s] = vec![vec![0.0; members]; points.len()];
                }
                for (k, map) in points.iter().enumerate() {
                    // map: [2B, N, h, w]; the conditional row of this image.
                    let w = map
                        .get(b + row)?
                        .flatten_from(1)?
                        .mean(1)?
                        .to_vec1::<f32>()?;
                    for (acc, v) in sums[s][k].iter_mut().zip(w) {
                        *acc += v as f64;
                    }
                }
                counts[s] += 1;
            }
        }
    }
    if let Some(d) = &dir {
        std::fs::write(d.join("metadata.jsonl"), listing)?;
    }
    let routing = wants_maps.then(|| {
        sums.iter()
            .zip(&counts)
            .map(|(per_point, &c)| {
                per_point
                    .iter()
                    .map(|m| m.iter().map(|v| v / c.max(1) as f64).collect())
                    .collect()
            })
            .collect()
    });
    Ok((tally, routing))
}

fn mean(v: &[f64]) -> f64 {
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// Mean and standard error of the mean.
fn mean_se(v: &[f64]) -> (f64, f64) {
    let m = mean(v);
    let n = v.len().max(2) as f64;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0);
    (m, (var / n).sqrt())
}

/// Runs the evaluation. `report` is told each mode's name as it starts.
pub fn evaluate(
    loaded: &LoadedEnsemble,
    opts: &EvalOptions,
    device: &Device,
    mut report: impl FnMut(&str),
) -> Result<EvalReport> {
    let (data, vae_round_trip_correct) = heldout(loaded, opts, device)?;
    let mut per_image: Vec<Vec<f64>> = Vec::new();
    let mut modes = Vec::new();
    for mode in &opts.modes {
        report(&mode.to_string());
        let losses = denoising_loss(loaded, mode, &data, opts, device)?;
        let images = data.scenes.len();
        let image_mse: Vec<f64> = (0..images)
            .map(|i| mean(&losses.iter().map(|l| l[i]).collect::<Vec<_>>()))
            .collect();
        let (tally, routing) = alignment(loaded, mode, opts, device)?;
        modes.push(ModeReport {
            mode: mode.to_string(),
            eps_mse: mean(&image_mse),
            eps_mse_per_t: losses.iter().map(|l| mean(l)).collect(),
            vs_afa: None,
            correct: tally.correct,
            images: tally.total,
            routing,
        });
        per_image.push(image_mse);
    }
    if let Some(a) = opts.modes.iter().position(|m| *m == EnsembleMode::Afa) {
        for (k, m) in modes.iter_mut().enumerate() {
            if k != a {
                let d: Vec<f64> = per_image[k]
                    .iter()
                    .zip(&per_image[a])
                    .map(|(x, y)| x - y)
                    .collect();
                m.vs_afa = Some(mean_se(&d));
            }
        }
    }
    Ok(EvalReport {
        members: loaded
            .ensemble
            .members()
            .iter()
            .map(|m| m.name.clone())
            .collect(),
        timesteps: opts.timesteps.clone(),
        heldout_images: data.scenes.len(),
        vae_round_trip_correct,
        modes,
    })
}

impl EvalReport {
    /// A Markdown summary: one table of losses and accuracies, one of the routing.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        s.push_str(&format!(
            "Held-out renders: {} (eps-MSE at t = {:?}); VAE round trip judged {}/{} all-three.\n\n",
            self.heldout_images, self.timesteps, self.vae_round_trip_correct[3], self.heldout_images
        ));
        s.push_str(
            "| mode | eps-MSE | vs AFA (paired SE) | colour | shape | position | all three |\n",
        );
        s.push_str("|---|---|---|---|---|---|---|\n");
        for m in &self.modes {
            let vs = match m.vs_afa {
                Some((d, se)) => format!("{d:+.5} ± {se:.5} ({:.1} SE)", d / se.max(1e-12)),
                None => "—".into(),
            };
            let acc = |i| {
                let (p, se) = m.accuracy(i);
                format!("{:.1}% ± {:.1}", 100.0 * p, 100.0 * se)
            };
            s.push_str(&format!(
                "| {} | {:.5} | {vs} | {} | {} | {} | {} |\n",
                m.mode,
                m.eps_mse,
                acc(0),
                acc(1),
                acc(2),
                acc(3)
            ));
        }
        for m in &self.modes {
            let Some(routing) = &m.routing else { continue };
            s.push_str(&format!(
                "\nRouting of `{}`: mean weight of {} per aggregation point, by the prompt's shape.\n\n",
                m.mode,
                self.members.join(" / ")
            ));
            let points = routing.iter().map(Vec::len).max().unwrap_or(0);
            s.push_str("| shape |");
            for k in 0..points {
                s.push_str(&format!(" {k} |"));
            }
            s.push_str("\n|---|");
            s.push_str(&"---|".repeat(points));
            s.push('\n');
            for (shape, per_point) in Shape::ALL.iter().zip(routing) {
                s.push_str(&format!("| {shape} |"));
                for w in per_point {
                    let parts: Vec<String> = w.iter().map(|v| format!("{v:.2}")).collect();
                    s.push_str(&format!(" {} |", parts.join("/")));
                }
                s.push('\n');
            }
        }
        s
    }
}
