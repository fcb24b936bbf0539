//! The "cross-noise routing gain" probe (`afa-method.md` §7.2): before spending compute on
//! training, estimate how much an aggregator could gain for a member set.
//!
//! For sampled images (centre crops) and timesteps, every member predicts the noise of several
//! independent noise draws. Per latent element:
//! - the *oracle* takes whichever member is closest to the true noise (an upper bound that no
//!   router can reach, since it peeks at the noise);
//! - the *routed* estimate picks, for each held-out draw, the member that won that element most
//!   often on the *other* draws of the same image and timestep (majority vote; ties go to the
//!   best single member). What survives this is the learnable part of the headroom.
//!
//! Both are reported as the relative MSE reduction over the best single member. The fork's rule
//! of thumb: train only when the routed gain exceeds 2%.
use std::path::PathBuf;

use candle_core::{DType, Tensor};

use super::data::{Crop, Dataset, load_pixels};
use super::frozen::Frozen;
use super::objective::{encode_pixels, noised, sample_latents, token_ids};
use super::{Result, Stream, TrainerError, below, rng};

/// The routed gain above which training is worth it (§7.2).
pub const GAIN_GATE: f64 = 0.02;

/// What to probe.
#[derive(Debug, Clone)]
pub struct ProbeOptions {
    pub data: PathBuf,
    pub resolution: usize,
    /// Images sampled from the dataset.
    pub images: usize,
    /// Timesteps per image (uniform in [0, num_train_timesteps)).
    pub timesteps: usize,
    /// Independent noise draws per image and timestep (at least 2).
    pub draws: usize,
    pub seed: u64,
}

/// The probe's findings (MSEs are means over every latent element of every sample).
#[derive(Debug, Clone, PartialEq)]
pub struct ProbeReport {
    /// Each member's own MSE, in member order.
    pub member_mse: Vec<(String, f64)>,
    /// Index of the best single member.
    pub best: usize,
    pub oracle_mse: f64,
    pub routed_mse: f64,
    /// 1 - oracle / best single.
    pub oracle_gain: f64,
    /// 1 - routed / best single.
    pub routed_gain: f64,
    pub samples: usize,
}

impl ProbeReport {
    /// A one-line verdict against the 2% gate.
    pub fn verdict(&self) -> String {
        if self.routed_gain > GAIN_GATE {
            format!(
                "worth training: a learned routing could lower the MSE by about {:.2}% over the best member (gate {:.0}%)",
                100.0 * self.routed_gain,
                100.0 * GAIN_GATE
            )
        } else {
            format!(
                "little learnable headroom: {:.2}% routed gain is below the {:.0}% gate; expect a flat training loss with these members",
                100.0 * self.routed_gain,
                100.0 * GAIN_GATE
            )
        }
    }
}

/// Squared errors of one (image, timestep): `errors[d][n]` is member n's per-element squared
/// error on draw d.
type SampleErrors = Vec<Vec<Vec<f32>>>;

/// Runs the probe.
pub fn probe(frozen: &Frozen, opts: &ProbeOptions) -> Result<ProbeReport> {
    if opts.draws < 2 || opts.images == 0 || opts.timesteps == 0 {
        return Err(TrainerError::Invalid(
            "the probe needs at least 1 image, 1 timestep and 2 noise draws".into(),
        ));
    }
    let dataset = Dataset::open(&opts.data)?;
    let schedule = frozen.scheduler.noise_schedule()?;
    let device = &frozen.device;
    let latent = opts.resolution / frozen.vae.scale_factor();
    let shape = (opts.draws, 4, latent, latent);
    let per_draw = 4 * latent * latent;
    let mut pick = rng(opts.seed, Stream::Probe, 0, 0);
    let mut samples: Vec<SampleErrors> = Vec::new();
    for i in 0..opts.images.min(dataset.records.len()) {
        let rec = &dataset.records[below(&mut pick, dataset.records.len())];
        let pixels = load_pixels(&rec.path, opts.resolution, Crop::CENTER, device)?.unsqueeze(0)?;
        let dist = encode_pixels(&frozen.vae, &pixels)?;
        let ids = token_ids(
            &frozen.tokenizer,
            std::slice::from_ref(&rec.caption),
            device,
        )?;
        let contexts = frozen
            .members
            .iter()
            .map(|m| Ok(m.text_encoder.forward(&ids)?.repeat((opts.draws, 1, 1))?))
            .collect::<Result<Vec<Tensor>>>()?;
        for j in 0..opts.timesteps {
            let mut g = rng(opts.seed, Stream::Probe, 1 + i as u64, j as u64);
            let t = below(&mut g, frozen.scheduler.num_train_timesteps);
            let vae_noise = Tensor::from_vec(g.normals(opts.draws * per_draw), shape, device)?;
            let noise = Tensor::from_vec(g.normals(opts.draws * per_draw), shape, device)?;
            let dist_d = crate::models::vae::DiagonalGaussian {
                mean: dist.mean.repeat((opts.draws, 1, 1, 1))?,
                logvar: dist.logvar.repeat((opts.draws, 1, 1, 1))?,
            };
            let x0 = sample_latents(&frozen.vae, &dist_d, &vae_noise)?;
            let ts = vec![t; opts.draws];
            let x_t = noised(&schedule, &x0, &noise, &ts)?;
            let tt = Tensor::from_vec(vec![t as f32; opts.draws], opts.draws, device)?;
            let mut per_member = Vec::new();
            for (m, ctx) in frozen.members.iter().zip(&contexts) {
                let eps = m.unet.forward(&x_t, &tt, ctx)?.to_dtype(DType::F32)?;
                per_member.push((eps - &noise)?.sqr()?.flatten_from(1)?.to_vec2::<f32>()?);
            }
            // [n][d][e] -> [d][n][e]
            let errors = (0..opts.draws)
                .map(|d| per_member.iter().map(|m| m[d].clone()).collect())
                .collect();
            samples.push(errors);
        }
    }
    Ok(summarise(frozen, &samples))
}

fn summarise(frozen: &Frozen, samples: &[SampleErrors]) -> ProbeReport {
    let n = frozen.members.len();
    let mut totals = vec![0f64; n];
    let mut oracle = 0f64;
    let mut count = 0usize;
    for s in samples {
        for draw in s {
            for (m, errs) in draw.iter().enumerate() {
                totals[m] += errs.iter().map(|&e| e as f64).sum::<f64>();
            }
            let elems = draw[0].len();
            count += elems;
            for e in 0..elems {
                oracle += draw.iter().map(|m| m[e]).fold(f32::INFINITY, f32::min) as f64;
            }
        }
    }
    let mse: Vec<f64> = totals.iter().map(|t| t / count.max(1) as f64).collect();
    let best = (0..n)
        .min_by(|&a, &b| mse[a].total_cmp(&mse[b]))
        .unwrap_or(0);
    let routed = routed_total(samples, best) / count.max(1) as f64;
    let oracle = oracle / count.max(1) as f64;
    ProbeReport {
        member_mse: frozen
            .members
            .iter()
            .map(|m| m.name.clone())
            .zip(mse.iter().copied())
            .collect(),
        best,
        oracle_mse: oracle,
        routed_mse: routed,
        oracle_gain: 1.0 - oracle / mse[best],
        routed_gain: 1.0 - routed / mse[best],
        samples: samples.len(),
    }
}

/// Summed squared error when each held-out draw is routed per element by a majority vote of
/// the winners on the other draws (ties to `best`, then to the lower index).
fn routed_total(samples: &[SampleErrors], best: usize) -> f64 {
    let mut total = 0f64;
    for s in samples {
        let (members, elems) = (s[0].len(), s[0][0].len());
        // winner[d][e]: the member closest to the noise on draw d.
        let winner: Vec<Vec<usize>> = s
            .iter()
            .map(|draw| {
                (0..elems)
                    .map(|e| {
                        (0..members)
                            .min_by(|&a, &b| draw[a][e].total_cmp(&draw[b][e]))
                            .unwrap_or(0)
                    })
                    .collect()
            })
            .collect();
        let mut votes = vec![0usize; members];
        for (held, held_errors) in s.iter().enumerate() {
            for e in 0..elems {
                votes.iter_mut().for_each(|v| *v = 0);
                for (d, w) in winner.iter().enumerate() {
                    if d != held {
                        votes[w[e]] += 1;
                    }
                }
                let top = votes.iter().copied().max().unwrap_or(0);
                let choice = if votes[best] == top {
                    best
                } else {
                    votes.iter().position(|&v| v == top).unwrap_or(best)
                };
                total += held_errors[choice][e] as f64;
            }
        }
    }
    total
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn routing_follows_the_consistent_winner() {
        // Member 1 is better on element 0 in every draw, member 0 on element 1.
        let s: SampleErrors = (0..3)
            .map(|d| vec![vec![2.0, 0.1 + d as f32 * 0.01], vec![1.0, 0.5]])
            .collect();
        let routed = routed_total(&[s], 0);
        let expected: f64 = (0..3).map(|d| 1.0 + 0.1 + d as f64 * 0.01).sum();
        assert!((routed - expected).abs() < 1e-5, "{routed} vs {expected}");
    }
}
