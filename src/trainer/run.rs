//! The training loop of `afa train`: data split, batches, gradient accumulation, AdamW, the
//! progress bar, `OUT/log.jsonl`, held-out validation, checkpoints, resume, and the final
//! `OUT/aggregators.safetensors`.
//!
//! Log lines are JSON objects: `{"step", "loss", "lr"}` after every optimizer step, plus
//! `"val_loss"` on steps where validation ran (step 0 carries the untrained validation loss
//! and `"loss": null`).
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use super::adamw::{AdamW, AdamWConfig};
use super::data::{Crop, Dataset, Record, load_pixels};
use super::frozen::Frozen;
use super::objective::{self, afa_loss, noised, sample_latents, text_context};
use super::params::AggregatorParams;
use super::state::{self, CheckpointContents, RunFingerprint, RunState};
use super::{Result, Stream, TrainerError, below, rng, uniform};
use crate::ensemble::points::{AggregatorShape, aggregation_points, aggregator_configs};
use crate::ensemble::{Ensemble, EnsembleContext};
use crate::loading::aggregators::AggregatorCheckpoint;
use crate::models::vae::DiagonalGaussian;
use crate::schedulers::NoiseSchedule;

/// Where the aggregators start.
#[derive(Debug, Clone)]
pub enum InitFrom {
    /// Fresh seeded aggregators of this shape.
    Fresh(AggregatorShape),
    /// An aggregator checkpoint (our file or an official folder).
    Checkpoint(PathBuf),
}

/// How to train.
#[derive(Debug, Clone)]
pub struct TrainOptions {
    pub data: PathBuf,
    pub out: PathBuf,
    /// Square training size in pixels.
    pub resolution: usize,
    pub batch_size: usize,
    pub grad_accum: usize,
    /// Stop after this many epochs (10 when neither this nor `max_steps` is given).
    pub epochs: Option<usize>,
    /// Stop after this many optimizer steps.
    pub max_steps: Option<u64>,
    pub lr: f64,
    /// Linear warm-up from 0 over this many steps (0: constant from the start).
    pub warmup_steps: u64,
    pub adamw: AdamWConfig,
    pub seed: u64,
    /// Checkpoint every K steps (0: only at the end).
    pub save_every: u64,
    /// Validation loss every K steps (0: only at the start and the end).
    pub val_every: u64,
    /// Held-out images for the validation loss (default: a tenth of the data, at most 16).
    pub val_images: Option<usize>,
    /// Per-sample probability of replacing the caption by "".
    pub caption_dropout: f64,
    /// Encode each image once (centre crop) and sample from the cached posterior.
    pub cache_latents: bool,
    pub resume: bool,
    pub init: InitFrom,
    pub quiet: bool,
}

/// What a run did.
#[derive(Debug, Clone, PartialEq)]
pub struct TrainSummary {
    pub steps: u64,
    /// Loss of the last step (`None` when no step ran).
    pub last_loss: Option<f64>,
    pub val_loss: Option<f64>,
    pub skipped_images: usize,
    pub aggregators: PathBuf,
}

/// The fixed held-out batch: latents noised with fixed draws, and its text contexts.
struct Validation {
    /// Per batch: x_t `[b, 4, h, w]`, timesteps, noise, contexts.
    batches: Vec<(Tensor, Vec<usize>, Tensor, EnsembleContext)>,
    count: usize,
}

struct Trainer<'a> {
    frozen: &'a Frozen,
    opts: &'a TrainOptions,
    train: Vec<Record>,
    schedule: NoiseSchedule,
    latent_cache: HashMap<usize, (Tensor, Tensor)>,
    /// (epoch, order of `train` indices) of the current epoch.
    order: Option<(u64, Vec<usize>)>,
    steps_per_epoch: u64,
}

/// Trains aggregators for `frozen` as `opts` says.
pub fn train(frozen: &Frozen, opts: &TrainOptions) -> Result<TrainSummary> {
    validate(opts)?;
    let dataset = Dataset::open(&opts.data)?;
    for (path, why) in &dataset.skipped {
        tracing::warn!("skipping unreadable image {}: {why}", path.display());
    }
    if !opts.quiet {
        eprintln!(
            "data: {} images ({} skipped as unreadable)",
            dataset.records.len(),
            dataset.skipped.len()
        );
    }
    let val_count = opts
        .val_images
        .unwrap_or((dataset.records.len() / 10).min(16));
    let (train_set, val_set) = split(&dataset.records, val_count, opts.seed)?;
    let per_step = (opts.batch_size * opts.grad_accum) as u64;
    let steps_per_epoch = train_set.len() as u64 / per_step;
    if steps_per_epoch == 0 {
        return Err(TrainerError::Invalid(format!(
            "{} training images are fewer than batch size x grad accumulation = {per_step}",
            train_set.len()
        )));
    }
    let total = match (opts.epochs, opts.max_steps) {
        (Some(e), Some(m)) => m.min(e as u64 * steps_per_epoch),
        (None, Some(m)) => m,
        (e, None) => e.unwrap_or(10) as u64 * steps_per_epoch,
    };
    let fingerprint = RunFingerprint {
        seed: opts.seed,
        batch_size: opts.batch_size,
        grad_accum: opts.grad_accum,
        resolution: opts.resolution,
        train_images: train_set.len(),
        val_images: val_set.len(),
        caption_dropout: opts.caption_dropout,
        cache_latents: opts.cache_latents,
        lr: opts.lr,
        warmup_steps: opts.warmup_steps,
    };
    let (params, mut optimizer, start) = initial_state(frozen, opts, &fingerprint)?;
    std::fs::create_dir_all(&opts.out).map_err(|e| TrainerError::io(&opts.out, e))?;
    let log_path = opts.out.join("log.jsonl");
    state::truncate_log(&log_path, start)?;
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log_path)
        .map_err(|e| TrainerError::io(&log_path, e))?;
    let mut trainer = Trainer {
        frozen,
        opts,
        train: train_set,
        schedule: frozen.scheduler.noise_schedule()?,
        latent_cache: HashMap::new(),
        order: None,
        steps_per_epoch,
    };
    let validation = trainer.validation_set(&val_set)?;
    let mut val_loss = None;
    if start == 0 && validation.count > 0 {
        val_loss = Some(validation_loss(frozen, &params, &validation)?);
        write_log(&mut log, &log_path, 0, None, trainer.lr_at(0), val_loss)?;
    }
    let ensemble = Ensemble::new(frozen.members.clone(), params.build_trainable()?, None)?;
    let bar = progress(total, start, opts.quiet);
    let mut last_loss = None;
    for step in start..total {
        let lr = trainer.lr_at(step);
        let loss = trainer.step(&ensemble, &params, &mut optimizer, (step, lr))?;
        last_loss = Some(loss);
        let done = step + 1;
        let validate_now = validation.count > 0
            && (done == total || (opts.val_every > 0 && done.is_multiple_of(opts.val_every)));
        let v = if validate_now {
            let v = validation_loss(frozen, &params, &validation)?;
            val_loss = Some(v);
            Some(v)
        } else {
            None
        };
        write_log(&mut log, &log_path, done, Some(loss), lr, v)?;
        if done == total || (opts.save_every > 0 && done.is_multiple_of(opts.save_every)) {
            let state = RunState {
                step: done,
                fingerprint: fingerprint.clone(),
            };
            let contents = CheckpointContents {
                params: &params,
                optimizer: &optimizer,
                stamps: &frozen.stamps,
                state: &state,
            };
            state::save_checkpoint(&opts.out, &contents)?;
        }
        bar.set_message(match val_loss {
            Some(v) => format!("loss {loss:.4} val {v:.4}"),
            None => format!("loss {loss:.4}"),
        });
        bar.inc(1);
    }
    bar.finish();
    let final_path = opts.out.join("aggregators.safetensors");
    state::write_aggregators(&final_path, &params, &frozen.stamps)?;
    Ok(TrainSummary {
        steps: total.max(start),
        last_loss,
        val_loss,
        skipped_images: dataset.skipped.len(),
        aggregators: final_path,
    })
}

fn validate(opts: &TrainOptions) -> Result<()> {
    let bad = |m: &str| Err(TrainerError::Invalid(m.to_string()));
    if opts.batch_size == 0 || opts.grad_accum == 0 {
        return bad("--batch-size and --grad-accum must be at least 1");
    }
    if opts.resolution == 0 || !opts.resolution.is_multiple_of(8) {
        return bad("--resolution must be a positive multiple of 8");
    }
    if !(opts.lr > 0.0 && opts.lr.is_finite()) {
        return bad("--lr must be positive");
    }
    if !(0.0..=1.0).contains(&opts.caption_dropout) {
        return bad("caption dropout must be in [0, 1]");
    }
    if opts.epochs == Some(0) || opts.max_steps == Some(0) {
        return bad("--epochs and --max-steps must be at least 1");
    }
    Ok(())
}

/// Splits `records` into (train, held-out) with a seeded choice of `val` held-out images.
fn split(records: &[Record], val: usize, seed: u64) -> Result<(Vec<Record>, Vec<Record>)> {
    if val >= records.len() {
        return Err(TrainerError::Invalid(format!(
            "--val-images {val} leaves no training images out of {}",
            records.len()
        )));
    }
    let perm = permutation(records.len(), &mut rng(seed, Stream::Validation, 0, 0));
    let mut held: Vec<usize> = perm[..val].to_vec();
    held.sort_unstable();
    let train = (0..records.len())
        .filter(|i| held.binary_search(i).is_err())
        .map(|i| records[i].clone())
        .collect();
    let val = held.iter().map(|&i| records[i].clone()).collect();
    Ok((train, val))
}

/// A Fisher-Yates permutation of 0..n.
fn permutation(n: usize, r: &mut crate::pipeline::noise::ImageRng) -> Vec<usize> {
    let mut v: Vec<usize> = (0..n).collect();
    for i in (1..n).rev() {
        let j = below(r, i + 1);
        v.swap(i, j);
    }
    v
}

/// Parameters, optimizer and first step: from the newest checkpoint (`--resume`), an
/// `--init-from` checkpoint, or fresh.
fn initial_state(
    frozen: &Frozen,
    opts: &TrainOptions,
    fingerprint: &RunFingerprint,
) -> Result<(AggregatorParams, AdamW, u64)> {
    let first = frozen
        .members
        .first()
        .ok_or_else(|| TrainerError::Invalid("the ensemble has no members".into()))?;
    let channels: Vec<usize> = aggregation_points(first.unet.config())
        .iter()
        .map(|p| p.channels)
        .collect();
    let has_run =
        opts.out.join("log.jsonl").is_file() || state::latest_checkpoint(&opts.out).is_some();
    if opts.resume {
        let (step, dir) =
            state::latest_checkpoint(&opts.out).ok_or_else(|| TrainerError::Resume {
                path: state::checkpoints_dir(&opts.out),
                reason: "no checkpoint to resume from".into(),
            })?;
        let r = state::load_checkpoint(
            &dir,
            (&frozen.stamps, &channels),
            fingerprint,
            opts.adamw,
            &frozen.device,
        )?;
        if !opts.quiet {
            eprintln!("resuming from {} (step {step})", dir.display());
        }
        return Ok((r.params, r.optimizer, r.state.step));
    }
    if has_run {
        return Err(TrainerError::Invalid(format!(
            "{} already holds a run; pass --resume to continue it or choose another --out",
            opts.out.display()
        )));
    }
    let params = match &opts.init {
        InitFrom::Checkpoint(path) => {
            let c = AggregatorCheckpoint::open(path)?;
            c.check_against(&frozen.stamps, &channels)?;
            AggregatorParams::from_checkpoint(&c, &frozen.device)?
        }
        InitFrom::Fresh(shape) => {
            let text_dim = first.text_encoder.config().hidden_size;
            let configs =
                aggregator_configs(first.unet.config(), frozen.members.len(), text_dim, *shape);
            AggregatorParams::fresh(&configs, opts.seed, &frozen.device)?
        }
    };
    let optimizer = AdamW::new(&params, opts.adamw)?;
    Ok((params, optimizer, 0))
}

impl Trainer<'_> {
    /// The learning rate of (0-based) step `step`: linear warm-up, then constant.
    fn lr_at(&self, step: u64) -> f64 {
        let w = self.opts.warmup_steps;
        if w == 0 {
            self.opts.lr
        } else {
            self.opts.lr * ((step + 1) as f64 / w as f64).min(1.0)
        }
    }

    /// The `train` index of `row` (0..B*A) of step `step`.
    fn row_index(&mut self, step: u64, row: usize) -> usize {
        let epoch = step / self.steps_per_epoch;
        if self.order.as_ref().map(|(e, _)| *e) != Some(epoch) {
            let mut r = rng(self.opts.seed, Stream::Order, epoch, 0);
            self.order = Some((epoch, permutation(self.train.len(), &mut r)));
        }
        let within = (step % self.steps_per_epoch) as usize;
        let per_step = self.opts.batch_size * self.opts.grad_accum;
        self.order
            .as_ref()
            .map(|(_, o)| o[within * per_step + row])
            .unwrap_or(0)
    }

    /// The VAE posterior of `record` at `crop` (cached per image with `--cache-latents`).
    fn posterior(&mut self, index: usize, crop: Crop) -> Result<(Tensor, Tensor)> {
        if self.opts.cache_latents
            && let Some(hit) = self.latent_cache.get(&index)
        {
            return Ok(hit.clone());
        }
        let crop = if self.opts.cache_latents {
            Crop::CENTER
        } else {
            crop
        };
        let device = &self.frozen.device;
        let pixels = load_pixels(&self.train[index].path, self.opts.resolution, crop, device)?;
        let d = objective::encode_pixels(&self.frozen.vae, &pixels.unsqueeze(0)?)?;
        let pair = (d.mean, d.logvar);
        if self.opts.cache_latents {
            self.latent_cache.insert(index, pair.clone());
        }
        Ok(pair)
    }

    /// Builds micro-batch `micro` of step `step`: (x0 `[B, 4, h, w]`, captions, t, noise).
    fn micro_batch(
        &mut self,
        step: u64,
        micro: usize,
    ) -> Result<(Tensor, Vec<String>, Vec<usize>, Tensor)> {
        let b = self.opts.batch_size;
        let latent = self.opts.resolution / self.frozen.vae.scale_factor();
        let per_row = 4 * latent * latent;
        let (mut means, mut logvars, mut vae_noise, mut noise) = (vec![], vec![], vec![], vec![]);
        let (mut captions, mut ts) = (vec![], vec![]);
        let steps = self.frozen.scheduler.num_train_timesteps;
        for r in 0..b {
            let row = micro * b + r;
            let index = self.row_index(step, row);
            let mut g = rng(self.opts.seed, Stream::Row, step, row as u64);
            let crop = Crop {
                x: uniform(&mut g),
                y: uniform(&mut g),
            };
            let drop = uniform(&mut g) < self.opts.caption_dropout;
            ts.push(below(&mut g, steps));
            vae_noise.extend(g.normals(per_row));
            noise.extend(g.normals(per_row));
            let (m, lv) = self.posterior(index, crop)?;
            means.push(m);
            logvars.push(lv);
            captions.push(if drop {
                String::new()
            } else {
                self.train[index].caption.clone()
            });
        }
        let device = &self.frozen.device;
        let shape = (b, 4, latent, latent);
        let dist = DiagonalGaussian {
            mean: Tensor::cat(&means, 0)?,
            logvar: Tensor::cat(&logvars, 0)?,
        };
        let vae_noise = Tensor::from_vec(vae_noise, shape, device)?;
        let x0 = sample_latents(&self.frozen.vae, &dist, &vae_noise)?;
        Ok((x0, captions, ts, Tensor::from_vec(noise, shape, device)?))
    }

    /// One optimizer step (`at` = (0-based step, lr)); returns the mean micro-batch loss.
    fn step(
        &mut self,
        ensemble: &Ensemble,
        params: &AggregatorParams,
        optimizer: &mut AdamW,
        at: (u64, f64),
    ) -> Result<f64> {
        let (step, lr) = at;
        let accum = self.opts.grad_accum;
        let mut grads = Vec::new();
        let mut total = 0.0;
        for micro in 0..accum {
            let (x0, captions, t, noise) = self.micro_batch(step, micro)?;
            let context = text_context(
                ensemble,
                &self.frozen.tokenizer,
                &captions,
                &self.frozen.device,
            )?;
            let x_t = noised(&self.schedule, &x0, &noise, &t)?;
            let loss = afa_loss(ensemble, &x_t, &t, &noise, &context)?;
            total += loss.to_scalar::<f32>()? as f64;
            objective::accumulate(
                &mut grads,
                objective::gradients(&loss, 1.0 / accum as f64, params)?,
            )?;
        }
        optimizer.step(params, &grads, lr)?;
        Ok(total / accum as f64)
    }

    /// The fixed held-out set: centre crops, and noise, timesteps and VAE samples drawn once
    /// from the validation stream, so the loss is comparable across checkpoints.
    fn validation_set(&self, records: &[Record]) -> Result<Validation> {
        let device = &self.frozen.device;
        let latent = self.opts.resolution / self.frozen.vae.scale_factor();
        let shape = (1, 4, latent, latent);
        let mut rows = Vec::new();
        let ensemble = Ensemble::new(self.frozen.members.clone(), Vec::new(), None)?;
        for (i, rec) in records.iter().enumerate() {
            let mut g = rng(self.opts.seed, Stream::Validation, 1, i as u64);
            let t = below(&mut g, self.frozen.scheduler.num_train_timesteps);
            let vae_noise = Tensor::from_vec(g.normals(4 * latent * latent), shape, device)?;
            let noise = Tensor::from_vec(g.normals(4 * latent * latent), shape, device)?;
            let pixels = load_pixels(&rec.path, self.opts.resolution, Crop::CENTER, device)?;
            let dist = objective::encode_pixels(&self.frozen.vae, &pixels.unsqueeze(0)?)?;
            let x0 = sample_latents(&self.frozen.vae, &dist, &vae_noise)?;
            rows.push((
                noised(&self.schedule, &x0, &noise, &[t])?,
                t,
                noise,
                rec.caption.clone(),
            ));
        }
        let mut batches = Vec::new();
        for chunk in rows.chunks(self.opts.batch_size.max(1)) {
            let x: Vec<Tensor> = chunk.iter().map(|r| r.0.clone()).collect();
            let n: Vec<Tensor> = chunk.iter().map(|r| r.2.clone()).collect();
            let captions: Vec<String> = chunk.iter().map(|r| r.3.clone()).collect();
            let context = text_context(&ensemble, &self.frozen.tokenizer, &captions, device)?;
            let t = chunk.iter().map(|r| r.1).collect();
            batches.push((Tensor::cat(&x, 0)?, t, Tensor::cat(&n, 0)?, context));
        }
        Ok(Validation {
            batches,
            count: records.len(),
        })
    }
}

/// Mean MSE over the held-out set with the current parameters (no graph is recorded).
fn validation_loss(frozen: &Frozen, params: &AggregatorParams, v: &Validation) -> Result<f64> {
    let ensemble = Ensemble::new(frozen.members.clone(), params.build_frozen()?, None)?;
    let mut sum = 0.0;
    for (x_t, t, noise, context) in &v.batches {
        let loss = afa_loss(&ensemble, x_t, t, noise, context)?;
        sum += loss.to_scalar::<f32>()? as f64 * t.len() as f64;
    }
    Ok(sum / v.count.max(1) as f64)
}

fn write_log(
    log: &mut std::fs::File,
    path: &Path,
    step: u64,
    loss: Option<f64>,
    lr: f64,
    val_loss: Option<f64>,
) -> Result<()> {
    let mut line = serde_json::json!({"step": step, "loss": loss, "lr": lr});
    if let Some(v) = val_loss {
        line["val_loss"] = serde_json::json!(v);
    }
    writeln!(log, "{line}").map_err(|e| TrainerError::io(path, e))
}

fn progress(total: u64, start: u64, quiet: bool) -> ProgressBar {
    let bar = ProgressBar::new(total);
    if quiet {
        bar.set_draw_target(ProgressDrawTarget::hidden());
    }
    bar.set_style(
        ProgressStyle::with_template(
            "{elapsed_precise} [{bar:30}] {pos}/{len} {msg} {per_sec} ETA {eta}",
        )
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar.set_position(start);
    bar.reset_eta();
    bar
}
