//! The `afa` part of `afa bench`: the cost of one AFA denoiser call (N full-size SD1.5 members
//! plus 25 aggregators with the paper's D = 128, L = 2, 8 heads) against N single-UNet calls at
//! the same batch (2, as with classifier-free guidance), and the share spent in the aggregators
//! (the AFA call minus the same lockstep with uniform averaging instead of aggregators).
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Tensor};

use super::{
    BenchError, BenchOptions, BenchReport, peak_rss_mib, random_input, random_vb, reset_peak_rss,
    row, time_runs,
};
use crate::ensemble::points::{AggregatorShape, aggregator_configs};
use crate::ensemble::{Aggregator, Ensemble, EnsembleContext, EnsembleMode, Member};
use crate::models::clip::{ClipTextConfig, ClipTextModel};
use crate::models::unet::{StagedUNet, UNetConfig};

/// N full-size SD1.5 members (seeds `opts.seed + 101 + i`) sharing `text`, and 25 aggregators
/// of the paper's shape, all random, in `opts.dtype` on `opts.device`.
pub(super) fn random_ensemble(
    opts: &BenchOptions,
    n: usize,
    text: &Arc<ClipTextModel>,
) -> Result<Ensemble, BenchError> {
    let config = UNetConfig::sd15();
    let members: Vec<Member> = (0..n)
        .map(|i| {
            Ok(Member {
                name: format!("m{i}"),
                weight_hash: format!("{i}"),
                unet: Arc::new(StagedUNet::new(
                    &config,
                    random_vb(opts.seed + 101 + i as u64, opts),
                )?),
                text_encoder: text.clone(),
            })
        })
        .collect::<Result<_, BenchError>>()?;
    let vb = random_vb(opts.seed ^ 0xa99, opts);
    let aggregators: Vec<Aggregator> =
        aggregator_configs(&config, n, 768, AggregatorShape::default())
            .iter()
            .enumerate()
            .map(|(k, c)| Aggregator::new(c, vb.pp(format!("aggregator_{k}"))))
            .collect::<candle_core::Result<_>>()?;
    Ensemble::new(members, aggregators, None).map_err(|e| BenchError::Option(e.to_string()))
}

/// Times AFA steps for every ensemble size of `opts.afa_members` and latent size.
pub(super) fn bench_afa(opts: &BenchOptions, report: &mut BenchReport) -> Result<(), BenchError> {
    // One text encoder serves every member here: its cost is outside the denoiser call.
    let text = Arc::new(ClipTextModel::new(
        &ClipTextConfig::sd15(),
        random_vb(opts.seed ^ 7, opts),
    )?);
    for &n in &opts.afa_members {
        if n == 0 || n > 8 {
            return Err(BenchError::Option(format!(
                "ensemble size {n} is outside 1..=8"
            )));
        }
        reset_peak_rss();
        let start = Instant::now();
        let ensemble = random_ensemble(opts, n, &text)?;
        let build_s = start.elapsed().as_secs_f64();
        for &size in &opts.unet_sizes {
            let b = opts.unet_batch;
            let x = random_input(&[b, 4, size, size], 1.0, opts.seed ^ 1, opts)?;
            let t = Tensor::from_vec(vec![500f32; b], b, &opts.device)?;
            let per_expert: Vec<Tensor> = (0..n)
                .map(|i| random_input(&[b, 77, 768], 1.0, opts.seed ^ (20 + i as u64), opts))
                .collect::<candle_core::Result<_>>()?;
            let mean = Tensor::stack(&per_expert, 0)?.mean(0)?;
            let context = EnsembleContext::Experts {
                per_expert: per_expert.clone(),
                mean,
            };
            let guidance = Tensor::ones((b / 2).max(1), DType::F32, &opts.device)?.reshape((
                (b / 2).max(1),
                1,
                1,
                1,
            ))?;
            let step = |mode: &EnsembleMode| -> candle_core::Result<()> {
                let d = ensemble
                    .denoiser(mode)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))?;
                d.predict(&x, &t, &guidance, &context, None)
                    .map(drop)
                    .map_err(|e| candle_core::Error::Msg(e.to_string()))
            };
            let afa = time_runs(opts.repeats, &opts.device, || step(&EnsembleMode::Afa))?;
            let mean = time_runs(opts.repeats, &opts.device, || step(&EnsembleMode::Mean))?;
            let singles = time_runs(opts.repeats, &opts.device, || {
                for (m, ctx) in ensemble.members().iter().zip(&per_expert) {
                    m.unet.forward(&x, &t, ctx)?;
                }
                Ok(())
            })?;
            let dims = x.dims();
            report
                .rows
                .push(row(&format!("AFA step, N={n}"), dims, &afa, build_s));
            report.rows.push(row(
                &format!("uniform-mean lockstep, N={n}"),
                dims,
                &mean,
                build_s,
            ));
            report.rows.push(row(
                &format!("{n} single UNet steps"),
                dims,
                &singles,
                build_s,
            ));
            let median = |v: &[f64]| v[v.len() / 2];
            let (a, m, s) = (median(&afa), median(&mean), median(&singles));
            report.notes.push(format!(
                "N={n}, latent {size}x{size}: AFA step / {n} single steps = {:.2}x; aggregators take {:.0}% of the AFA step; peak RSS {:.0} MiB",
                a / s,
                100.0 * (a - m).max(0.0) / a,
                peak_rss_mib()
            ));
        }
    }
    Ok(())
}
