//! `afa train` on the tiny N=2 ensemble and a small generated image dataset: one step changes
//! only the aggregators, losses decrease, a resumed run matches an uninterrupted one step for
//! step, and the saved aggregators load, fit the members and move the maps away from uniform.
mod common;

use std::path::{Path, PathBuf};

use afa::ensemble::points::{AggregatorShape, aggregation_points, aggregator_configs};
use afa::ensemble::{Ensemble, EnsembleContext, EnsembleMode};
use afa::loading::aggregators::AggregatorCheckpoint;
use afa::loading::ensemble::open_official;
use afa::trainer::adamw::{AdamW, AdamWConfig};
use afa::trainer::objective::{afa_loss, gradients, text_context};
use afa::trainer::{AggregatorParams, Frozen, InitFrom, TrainOptions, train};
use candle_core::{DType, Device, Tensor};

use common::{official_folder, scratch};

const TINY: AggregatorShape = AggregatorShape {
    hidden_size: 8,
    num_layers: 1,
    num_attn_heads: 2,
    norm_num_groups: 4,
};

fn frozen() -> Frozen {
    let parts = open_official(&official_folder("n2")).unwrap();
    Frozen::from_parts(&parts, &Device::Cpu).unwrap()
}

/// Writes `n` 64x64 PNGs (coloured stripes and gradients) with captions, plus one truncated
/// PNG that the loader must skip.
fn dataset(n: usize) -> PathBuf {
    let dir = scratch("trainer-data");
    let colours = ["red", "green", "blue", "yellow"];
    let mut lines = String::new();
    for i in 0..n {
        let c = i % 4;
        let img = image::RgbImage::from_fn(64 + 16 * (i % 2) as u32, 64, |x, y| {
            let v = ((x * (i as u32 + 1) + y * 3) % 256) as u8;
            let mut p = [v / 3; 3];
            if c < 3 {
                p[c] = 255 - v / 2;
            } else {
                p = [255 - v / 2, 255 - v / 2, v / 4];
            }
            image::Rgb(p)
        });
        let name = format!("img{i}.png");
        img.save(dir.join(&name)).unwrap();
        lines.push_str(&format!(
            "{{\"file_name\": \"{name}\", \"text\": \"a {} striped picture number {i}\"}}\n",
            colours[c]
        ));
    }
    std::fs::write(dir.join("broken.png"), b"\x89PNG\r\n\x1a\n\0\0\0\rIHDR").unwrap();
    lines.push_str("{\"file_name\": \"broken.png\", \"text\": \"truncated\"}\n");
    std::fs::write(dir.join("metadata.jsonl"), lines).unwrap();
    dir
}

fn options(data: &Path, out: &Path, max_steps: u64) -> TrainOptions {
    TrainOptions {
        data: data.to_path_buf(),
        out: out.to_path_buf(),
        resolution: 64,
        batch_size: 2,
        grad_accum: 2,
        epochs: None,
        max_steps: Some(max_steps),
        lr: 1e-4,
        warmup_steps: 0,
        adamw: AdamWConfig::default(),
        seed: 7,
        save_every: 0,
        val_every: 0,
        val_images: Some(2),
        caption_dropout: 0.1,
        cache_latents: false,
        resume: false,
        init: InitFrom::Fresh(TINY),
        quiet: true,
    }
}

/// The JSON lines of `OUT/log.jsonl`.
fn log_lines(out: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(out.join("log.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn to_vec(t: &Tensor) -> Vec<f32> {
    t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
}

#[test]
fn one_step_changes_only_aggregator_parameters() {
    let frozen = frozen();
    let first = &frozen.members[0];
    let configs = aggregator_configs(
        first.unet.config(),
        2,
        first.text_encoder.config().hidden_size,
        TINY,
    );
    let params = AggregatorParams::fresh(&configs, 3, &Device::Cpu).unwrap();
    let before: Vec<Vec<Vec<f32>>> = params
        .named_tensors()
        .unwrap()
        .iter()
        .map(|set| set.iter().map(|(_, t)| to_vec(t)).collect())
        .collect();
    let ensemble = Ensemble::new(
        frozen.members.clone(),
        params.build_trainable().unwrap(),
        None,
    )
    .unwrap();
    let x = Tensor::randn(0f32, 1f32, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let noise = Tensor::randn(0f32, 1f32, (2, 4, 8, 8), &Device::Cpu).unwrap();
    let captions = vec!["a red cat".to_string(), String::new()];
    let ctx = text_context(&ensemble, &frozen.tokenizer, &captions, &Device::Cpu).unwrap();
    let single = |e: &Ensemble| {
        let d = e.denoiser(&EnsembleMode::Single("expert1".into())).unwrap();
        let ids =
            afa::trainer::objective::token_ids(&frozen.tokenizer, &captions, &Device::Cpu).unwrap();
        let c = d.encode(&ids).unwrap();
        let t = Tensor::new(&[500f32, 20.], &Device::Cpu).unwrap();
        let g = Tensor::ones((2, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        to_vec(&d.predict(&x, &t, &g, &c, None).unwrap())
    };
    let member_before = single(&ensemble);

    let loss = afa_loss(&ensemble, &x, &[500, 20], &noise, &ctx).unwrap();
    let grads = gradients(&loss, 1.0, &params).unwrap();
    let mut opt = AdamW::new(&params, AdamWConfig::default()).unwrap();
    opt.step(&params, &grads, 1e-3).unwrap();

    // Zero-init conv_out: only conv_out gets a gradient on the first step (§6), but weight
    // decay moves every non-zero parameter, and every conv_out moves away from zero.
    for (k, set) in params.named_tensors().unwrap().iter().enumerate() {
        for ((name, t), old) in set.iter().zip(&before[k]) {
            let new = to_vec(t);
            let moved = new.iter().zip(old).any(|(a, b)| a != b);
            let all_zero = old.iter().all(|v| *v == 0.0);
            if name == "conv_out.weight" || !all_zero {
                assert!(moved, "aggregator {k} {name} did not change");
            }
        }
    }
    assert_eq!(
        member_before,
        single(&ensemble),
        "a member's prediction changed"
    );
}

#[test]
fn training_lowers_losses_and_saves_usable_aggregators() {
    let frozen = frozen();
    let data = dataset(10);
    let out = scratch("trainer-out");
    let mut opts = options(&data, &out, 40);
    opts.lr = 3e-3;
    opts.val_every = 20;
    opts.save_every = 20;
    let summary = train(&frozen, &opts).unwrap();
    assert_eq!(summary.steps, 40);
    assert_eq!(summary.skipped_images, 1);
    let lines = log_lines(&out);
    let vals: Vec<f64> = lines
        .iter()
        .filter_map(|l| l["val_loss"].as_f64())
        .collect();
    let losses: Vec<f64> = lines.iter().filter_map(|l| l["loss"].as_f64()).collect();
    assert_eq!(losses.len(), 40);
    assert_eq!(vals.len(), 3, "validation at steps 0, 20, 40");
    println!("val {vals:?}");
    assert!(
        vals[2] < vals[0],
        "validation loss did not decrease: {vals:?}"
    );
    let head: f64 = losses[..10].iter().sum::<f64>() / 10.0;
    let tail: f64 = losses[30..].iter().sum::<f64>() / 10.0;
    println!("train loss first 10 {head:.4}, last 10 {tail:.4}");
    assert!(
        tail < head,
        "training loss did not decrease: {head} -> {tail}"
    );
    assert!(
        out.join("checkpoints/step-20/optimizer.safetensors")
            .is_file()
    );

    // The final file loads, fits the members, and its maps are no longer uniform.
    let checkpoint = AggregatorCheckpoint::open_file(&out.join("aggregators.safetensors")).unwrap();
    let channels: Vec<usize> = aggregation_points(frozen.members[0].unet.config())
        .iter()
        .map(|p| p.channels)
        .collect();
    checkpoint.check_against(&frozen.stamps, &channels).unwrap();
    let mut swapped = frozen.stamps.clone();
    swapped.reverse();
    assert!(checkpoint.check_against(&swapped, &channels).is_err());
    let aggs = checkpoint.build(DType::F32, &Device::Cpu).unwrap();
    let ensemble = Ensemble::new(frozen.members.clone(), aggs, None).unwrap();
    let d = ensemble.denoiser(&EnsembleMode::Afa).unwrap();
    let ids = afa::trainer::objective::token_ids(
        &frozen.tokenizer,
        &["a red striped picture".into()],
        &Device::Cpu,
    )
    .unwrap();
    let ctx: EnsembleContext = d.encode(&ids).unwrap();
    let x = Tensor::randn(0f32, 1f32, (1, 4, 8, 8), &Device::Cpu).unwrap();
    let t = Tensor::new(&[400f32], &Device::Cpu).unwrap();
    let g = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
    let mut maps = Vec::new();
    d.predict(&x, &t, &g, &ctx, Some(&mut maps)).unwrap();
    assert_eq!(maps.len(), channels.len());
    let dev = maps
        .iter()
        .map(|m| {
            (m - 0.5)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        })
        .fold(0f32, f32::max);
    println!("largest |map - 1/2| after training: {dev}");
    assert!(dev > 1e-3, "maps stayed uniform ({dev})");
}

#[test]
fn resumed_run_matches_uninterrupted_run() {
    let frozen = frozen();
    let data = dataset(9);
    let straight = scratch("trainer-straight");
    let mut opts = options(&data, &straight, 6);
    opts.save_every = 3;
    opts.val_every = 3;
    train(&frozen, &opts).unwrap();

    let split = scratch("trainer-split");
    let mut first = options(&data, &split, 3);
    first.save_every = 3;
    first.val_every = 3;
    train(&frozen, &first).unwrap();
    // Without --resume an existing run is not overwritten.
    assert!(train(&frozen, &first).is_err());
    let mut second = first.clone();
    second.max_steps = Some(6);
    second.resume = true;
    train(&frozen, &second).unwrap();

    let a = log_lines(&straight);
    let b = log_lines(&split);
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(&b) {
        assert_eq!(x, y, "logs differ");
    }
    let ta = candle_core::safetensors::load(straight.join("aggregators.safetensors"), &Device::Cpu)
        .unwrap();
    let tb = candle_core::safetensors::load(split.join("aggregators.safetensors"), &Device::Cpu)
        .unwrap();
    assert_eq!(ta.len(), tb.len());
    for (name, t) in &ta {
        assert_eq!(to_vec(t), to_vec(&tb[name]), "{name} differs after resume");
    }
    // A changed setting is refused with the field named.
    let mut changed = second.clone();
    changed.seed = 8;
    changed.max_steps = Some(9);
    let err = train(&frozen, &changed).unwrap_err().to_string();
    assert!(err.contains("seed"), "{err}");
}

#[test]
fn probe_reports_gains_and_a_verdict() {
    use afa::trainer::probe::{ProbeOptions, probe};
    let frozen = frozen();
    let data = dataset(4);
    let opts = ProbeOptions {
        data,
        resolution: 64,
        images: 2,
        timesteps: 2,
        draws: 3,
        seed: 1,
    };
    let report = probe(&frozen, &opts).unwrap();
    println!("{report:?}\n{}", report.verdict());
    assert_eq!(report.samples, 4);
    assert_eq!(report.member_mse.len(), 2);
    let best = report.member_mse[report.best].1;
    assert!(report.member_mse.iter().all(|(_, m)| *m >= best));
    // The oracle can only beat the best member; routing lies between (or slightly above best).
    assert!(report.oracle_mse <= report.routed_mse && report.oracle_gain > 0.0);
    assert!(report.oracle_mse <= best);
    assert_eq!(
        report,
        probe(&frozen, &opts).unwrap(),
        "the probe is not deterministic"
    );
}
