//! Training-step benchmark for `BENCHMARKS.md` ("Training"): the full SD1.5 configuration with
//! N = 2 members of seeded random weights, the paper's aggregators (D 128, L 2, 8 heads),
//! batch 1 at 256 px (32x32 latents), CPU. One step = AFA forward + backward through both
//! members + AdamW. Ignored by default (minutes and ~16 GiB of RAM at 256 px); run with
//! `AFA_BENCH_LATENT=32 AFA_BENCH_DISTINCT=1 cargo test --test trainer_bench -- --ignored --nocapture`.
use std::sync::Arc;
use std::time::Instant;

use afa::bench::RandomWeights;
use afa::ensemble::points::{AggregatorShape, aggregator_configs};
use afa::ensemble::{Ensemble, EnsembleContext, Member};
use afa::models::clip::{ClipTextConfig, ClipTextModel};
use afa::models::unet::{StagedUNet, UNetConfig};
use afa::trainer::AggregatorParams;
use afa::trainer::adamw::{AdamW, AdamWConfig};
use afa::trainer::objective::{afa_loss, gradients};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

fn vm_hwm_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .unwrap_or(0.0)
        / 1024.0
}

/// Member `i`. With `shared`, every member points at member 0's UNet weights but keeps its own
/// weight hash, so the ensemble still runs (and differentiates) each member separately: the
/// compute of N distinct members with the weight memory of one (this machine has 23 GB).
fn member(i: u64, shared: Option<&Member>) -> Member {
    let vb =
        |s| VarBuilder::from_backend(Box::new(RandomWeights { seed: s }), DType::F32, Device::Cpu);
    let unet = match shared {
        Some(m) => m.unet.clone(),
        None => Arc::new(StagedUNet::new(&UNetConfig::sd15(), vb(100 + i)).unwrap()),
    };
    Member {
        name: format!("random{i}"),
        weight_hash: format!("random{i}"),
        unet,
        // The step takes text embeddings directly: a small text encoder saves ~0.5 GB per member.
        text_encoder: Arc::new(ClipTextModel::new(&tiny_text(), vb(200 + i)).unwrap()),
    }
}

/// A 1-layer CLIP with SD1.5's width (768), unused by the timed step.
fn tiny_text() -> ClipTextConfig {
    ClipTextConfig {
        num_hidden_layers: 1,
        ..ClipTextConfig::sd15()
    }
}

#[test]
#[ignore]
fn sd15_training_step_seconds() {
    let side: usize = std::env::var("AFA_BENCH_LATENT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let steps: usize = std::env::var("AFA_BENCH_STEPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(2);
    let shared = std::env::var("AFA_BENCH_DISTINCT").is_err();
    let first = member(0, None);
    let second = member(1, shared.then_some(&first));
    println!("members share UNet weights: {shared}");
    let members = vec![first, second];
    let configs = aggregator_configs(&UNetConfig::sd15(), 2, 768, AggregatorShape::default());
    let params = AggregatorParams::fresh(&configs, 0, &Device::Cpu).unwrap();
    println!("aggregator parameters: {}", params.count());
    let ensemble = Ensemble::new(members, params.build_trainable().unwrap(), None).unwrap();
    let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
    let x = Tensor::randn(0f32, 1f32, (1, 4, side, side), &Device::Cpu).unwrap();
    let noise = Tensor::randn(0f32, 1f32, (1, 4, side, side), &Device::Cpu).unwrap();
    let ctx: Vec<Tensor> = (0..2)
        .map(|_| Tensor::randn(0f32, 1f32, (1, 77, 768), &Device::Cpu).unwrap())
        .collect();
    let mean = Tensor::stack(&ctx, 0).unwrap().mean(0).unwrap();
    let context = EnsembleContext::Experts {
        per_expert: ctx,
        mean,
    };
    let mut times = Vec::new();
    for i in 0..=steps {
        let start = Instant::now();
        let loss = afa_loss(&ensemble, &x, &[500], &noise, &context).unwrap();
        let forward = start.elapsed().as_secs_f64();
        let grads = gradients(&loss, 1.0, &params).unwrap();
        opt.step(&params, &grads, 1e-4).unwrap();
        let total = start.elapsed().as_secs_f64();
        println!(
            "step {i}{}: {total:.2} s (forward {forward:.2} s), loss {:.4}, VmHWM {:.0} MiB",
            if i == 0 { " (warm-up)" } else { "" },
            loss.to_scalar::<f32>().unwrap(),
            vm_hwm_mib()
        );
        if i > 0 {
            times.push(total);
        }
    }
    times.sort_by(f64::total_cmp);
    println!(
        "training step, N=2, batch 1, {} px: median {:.2} s over {} steps; peak RSS (VmHWM) {:.0} MiB",
        side * 8,
        times[times.len() / 2],
        times.len(),
        vm_hwm_mib()
    );
}
