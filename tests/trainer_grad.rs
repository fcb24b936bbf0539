//! Gradient parity of one training step (`afa-method.md` §6) on the tiny N=2 ensemble: the
//! gradients of every aggregator parameter, flowing through the frozen members' layers, match
//! PyTorch autograd (`tests/fixtures/afa/n2/grad`, made by `scripts/fixtures/afa_reference.py`).
mod common;

use std::sync::Arc;

use afa::ensemble::{Ensemble, EnsembleContext, Member};
use afa::loading::ensemble::open_official;
use afa::trainer::objective::{afa_loss, gradients};
use afa::trainer::params::AggregatorParams;
use candle_core::{DType, Device, Tensor};

use common::{npy, official_folder};

/// The members of an opened official folder, built in f32 on the CPU.
fn build_members(parts: &afa::loading::ensemble::EnsembleParts) -> Vec<Member> {
    parts
        .members
        .iter()
        .map(|(name, m)| {
            let built = m.build_denoiser(DType::F32, &Device::Cpu).unwrap();
            Member {
                name: name.clone(),
                weight_hash: m.weight_hash(),
                unet: Arc::new(built.unet),
                text_encoder: Arc::new(built.text_encoder),
            }
        })
        .collect()
}

fn norm(t: &Tensor) -> f64 {
    t.sqr()
        .unwrap()
        .sum_all()
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
        .sqrt() as f64
}

#[test]
fn aggregator_gradients_match_pytorch() {
    let dir = official_folder("n2");
    let parts = open_official(&dir).unwrap();
    let members = build_members(&parts);
    let params =
        AggregatorParams::from_checkpoint(parts.aggregators.as_ref().unwrap(), &Device::Cpu)
            .unwrap();
    let ensemble = Ensemble::new(members, params.build_trainable().unwrap(), None).unwrap();

    let g = std::path::Path::new("tests/fixtures/afa/n2/grad");
    let x_t = npy(g.join("x_t.npy"));
    let t: Vec<usize> = npy(g.join("t.npy"))
        .to_vec1::<f32>()
        .unwrap()
        .iter()
        .map(|&v| v as usize)
        .collect();
    let per_expert = vec![npy(g.join("text_e0.npy")), npy(g.join("text_e1.npy"))];
    let mean = Tensor::stack(&per_expert, 0).unwrap().mean(0).unwrap();
    let context = EnsembleContext::Experts { per_expert, mean };
    let eps = npy(g.join("eps.npy"));

    let loss = afa_loss(&ensemble, &x_t, &t, &eps, &context).unwrap();
    let loss_ref = npy(g.join("loss.npy"))
        .flatten_all()
        .unwrap()
        .to_vec1::<f32>()
        .unwrap()[0];
    let loss_v = loss.to_scalar::<f32>().unwrap();
    assert!(
        ((loss_v - loss_ref) / loss_ref).abs() < 1e-4,
        "loss {loss_v} vs reference {loss_ref}"
    );

    let grads = gradients(&loss, 1.0, &params).unwrap();
    let mut worst_overall = 0f64;
    let mut failures = Vec::new();
    for (k, set) in params.vars().iter().enumerate() {
        let reference = candle_core::safetensors::load(
            g.join(format!("aggregator_{k}.safetensors")),
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(
            reference.len(),
            set.len(),
            "aggregator {k}: parameter count"
        );
        let mut worst = (0f64, String::new());
        for ((name, _), grad) in set.iter().zip(&grads[k]) {
            let r = reference
                .get(name)
                .unwrap_or_else(|| panic!("aggregator {k}: no reference gradient for {name}"));
            let r = r.to_dtype(DType::F32).unwrap();
            let rel = norm(&(grad - &r).unwrap()) / norm(&r).max(1e-30);
            if rel > worst.0 {
                worst = (rel, name.clone());
            }
            if rel > 1e-3 {
                failures.push(format!("aggregator {k} {name}: relative error {rel:.3e}"));
            }
        }
        println!(
            "aggregator {k:2}: worst relative error {:.3e} ({})",
            worst.0, worst.1
        );
        worst_overall = worst_overall.max(worst.0);
    }
    println!(
        "loss {loss_v} (reference {loss_ref}); worst relative gradient error {worst_overall:.3e}"
    );
    assert!(
        failures.is_empty(),
        "gradient mismatches:\n{}",
        failures.join("\n")
    );
}
