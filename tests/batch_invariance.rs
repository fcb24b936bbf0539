//! Same seed, same pixels, whatever the batch (issue 9): the CPU path is batch-invariant, bit
//! for bit, for every component and end to end through the server's batching.
mod common;

use afa::ensemble::EnsembleMode;
use afa::loading::ensemble::{EnsembleLoadOptions, LoadedEnsemble, open_official};
use afa::pipeline::{BatchRequest, ImageSpec, MapsRequest};
use afa::schedulers::SchedulerKind;
use candle_core::{DType, Device, Tensor};
use common::official_folder;

fn load() -> LoadedEnsemble {
    open_official(&official_folder("n2"))
        .unwrap()
        .build(&EnsembleLoadOptions {
            dtype: DType::F32,
            device: Device::Cpu,
            merge_weights: Some(vec![1.0, 1.0]),
            aggregators: None,
        })
        .unwrap()
}

fn seeded(shape: &[usize], seed: u64) -> Tensor {
    let n: usize = shape.iter().product();
    let v = afa::pipeline::ImageRng::new(seed).normals(n);
    Tensor::from_vec(v, shape, &Device::Cpu).unwrap()
}

fn same(a: &Tensor, b: &Tensor, what: &str) {
    let a: Vec<f32> = a.flatten_all().unwrap().to_vec1().unwrap();
    let b: Vec<f32> = b.flatten_all().unwrap().to_vec1().unwrap();
    let diff = a
        .iter()
        .zip(&b)
        .filter(|(x, y)| x.to_bits() != y.to_bits())
        .count();
    assert_eq!(diff, 0, "{what}: {diff} of {} values differ", a.len());
}

#[test]
fn components_are_bitwise_batch_invariant() {
    let loaded = load();
    let ids = |prompts: &[&str]| {
        let rows: Vec<u32> = prompts
            .iter()
            .flat_map(|p| loaded.tokenizer.encode(p).ids)
            .collect();
        Tensor::from_vec(rows, (prompts.len(), 77), &Device::Cpu).unwrap()
    };
    let member = &loaded.ensemble.members()[0];
    let alone = member.text_encoder.forward(&ids(&["a cat"])).unwrap();
    let batch = member
        .text_encoder
        .forward(&ids(&["a cat", "a dog on a hill", "x"]))
        .unwrap();
    same(&alone, &batch.narrow(0, 0, 1).unwrap(), "text encoder");

    for (b, extra) in [(2usize, 2usize), (1, 1), (2, 6), (4, 4)] {
        let t: Vec<f32> = (0..b + extra).map(|i| 500.0 + i as f32).collect();
        let tb = Tensor::new(t.as_slice(), &Device::Cpu).unwrap();
        let e_small = member
            .unet
            .time_embedding(&tb.narrow(0, 0, b).unwrap())
            .unwrap();
        let e_big = member.unet.time_embedding(&tb).unwrap();
        same(
            &e_small,
            &e_big.narrow(0, 0, b).unwrap(),
            &format!("time embedding {b} vs {}", b + extra),
        );
    }
    for mode in [EnsembleMode::Single("expert0".into()), EnsembleMode::Afa] {
        let d = loaded.ensemble.denoiser(&mode).unwrap();
        let x1 = seeded(&[1, 4, 16, 16], 1);
        let x3 = Tensor::cat(&[&x1, &seeded(&[2, 4, 16, 16], 2)], 0).unwrap();
        let c1 = d.encode(&ids(&["a cat"])).unwrap();
        let c3 = d.encode(&ids(&["a cat", "a dog", "rain"])).unwrap();
        let t1 = Tensor::new(&[500f32], &Device::Cpu).unwrap();
        let t3 = Tensor::new(&[500f32, 20.0, 999.0], &Device::Cpu).unwrap();
        let g1 = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let g3 = Tensor::ones((3, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let e1 = d.predict(&x1, &t1, &g1, &c1, None).unwrap();
        let e3 = d.predict(&x3, &t3, &g3, &c3, None).unwrap();
        same(
            &e1,
            &e3.narrow(0, 0, 1).unwrap(),
            &format!("denoiser {mode}"),
        );
    }
    let z1 = seeded(&[1, 4, 16, 16], 5);
    let z3 = Tensor::cat(&[&z1, &seeded(&[2, 4, 16, 16], 6)], 0).unwrap();
    let d1 = loaded.vae.decode(&z1).unwrap();
    let d3 = loaded.vae.decode(&z3).unwrap();
    same(&d1, &d3.narrow(0, 0, 1).unwrap(), "vae decode");
}

/// The promise end to end: image 0 (seed 42) has the same PNG bytes alone and in
/// batches of 2, 3 and 4 whose other images have other prompts, negative prompts, seeds and
/// guidance scales; 10 steps; for AFA, a single member, the merge and MagicFusion.
#[test]
fn same_seed_same_png_bytes_whatever_the_batch() {
    let loaded = load();
    let mates = [
        ("a dog on a hill", "", 3.0),
        ("rain over the sea", "blurry", 12.0),
        ("x", "low quality, text", 1.0),
    ];
    for mode in [
        EnsembleMode::Afa,
        EnsembleMode::Single("expert1".into()),
        EnsembleMode::Merge,
        "magicfusion".parse().unwrap(),
    ] {
        let pipeline = common::ensemble_pipeline(&loaded, &mode);
        let mut first: Option<Vec<u8>> = None;
        for n in 1..=4 {
            let mut images = vec![ImageSpec {
                prompt: "a photo of a cat".into(),
                negative_prompt: "blurry".into(),
                seed: 42,
                guidance_scale: 7.5,
                init: None,
            }];
            for (i, (prompt, negative, guidance)) in mates.iter().take(n - 1).enumerate() {
                images.push(ImageSpec {
                    prompt: prompt.to_string(),
                    negative_prompt: negative.to_string(),
                    seed: 1000 + i as u64,
                    guidance_scale: *guidance,
                    init: None,
                });
            }
            let request = BatchRequest {
                images,
                width: 128,
                height: 128,
                steps: 10,
                scheduler: SchedulerKind::Ddim,
                strength: None,
                initial_latents: None,
                attention_maps: MapsRequest::Off,
            };
            let out = pipeline.generate(&request, &mut ()).unwrap();
            let png = out.images[0].png.clone();
            match &first {
                None => first = Some(png),
                Some(alone) => assert!(*alone == png, "{mode}: n = {n} changes image 0"),
            }
        }
    }
}
