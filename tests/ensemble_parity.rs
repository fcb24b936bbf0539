//! The AFA ensemble against the Python reference of the paper's method
//! (scripts/fixtures/afa_reference.py) on tiny N=2 and N=3 ensembles loaded from the official
//! folder layout, plus self-consistency checks. The reference comparison runs on AFA_TEST_DEVICE
//! in AFA_TEST_DTYPE (tests/common); the others stay on the CPU in f32.
mod common;

use std::path::Path;

use afa::ensemble::{EnsembleMode, points::aggregation_points};
use afa::loading::ensemble::{EnsembleLoadOptions, LoadedEnsemble, open_official};
use afa::pipeline::{BatchRequest, ImageSpec, Limits, MapsRequest, SdPipeline};
use afa::schedulers::SchedulerKind;
use candle_core::{DType, Device, Tensor};
use common::{Capture, bound, max_abs_diff, npy, official_folder};

fn load(tag: &str) -> LoadedEnsemble {
    load_on(tag, DType::F32, &Device::Cpu)
}

fn load_on(tag: &str, dtype: DType, device: &Device) -> LoadedEnsemble {
    let options = EnsembleLoadOptions {
        dtype,
        device: device.clone(),
        merge_weights: Some(vec![1.0; if tag == "n2" { 2 } else { 3 }]),
        aggregators: None,
    };
    open_official(&official_folder(tag))
        .unwrap()
        .build(&options)
        .unwrap()
}

fn reference(tag: &str, name: &str) -> Tensor {
    npy(Path::new("tests/fixtures/afa")
        .join(tag)
        .join("reference")
        .join(format!("{name}.npy")))
}

fn request(tag: &str, latents: Option<Tensor>) -> BatchRequest {
    BatchRequest {
        images: vec![ImageSpec {
            prompt: "a photo of a cat".into(),
            negative_prompt: "blurry".into(),
            seed: 0,
            guidance_scale: 7.5,
            init: None,
        }],
        width: 128,
        height: 128,
        steps: 10,
        scheduler: SchedulerKind::Ddim,
        strength: None,
        initial_latents: latents.or_else(|| Some(reference(tag, "latent_init"))),
        attention_maps: MapsRequest::Off,
    }
}

fn run(loaded: &LoadedEnsemble, mode: &EnsembleMode, req: &BatchRequest) -> Capture {
    let pipeline = common::ensemble_pipeline(loaded, mode);
    let mut capture = Capture::default();
    pipeline.generate(req, &mut capture).unwrap();
    capture
}

#[test]
fn afa_matches_the_reference_for_n2_and_n3() {
    for tag in ["n2", "n3"] {
        let loaded = load_on(tag, common::dtype(), &common::device());
        let n = loaded.ensemble.members().len();
        let cap = run(&loaded, &EnsembleMode::Afa, &request(tag, None));
        let tight = bound(1e-4, 5e-2);
        for e in 0..n {
            let name = format!("text_emb_e{e}");
            let err = max_abs_diff(&cap.0[&name], &reference(tag, &name));
            assert!(err <= tight, "{tag} {name}: {err}");
        }
        assert!(max_abs_diff(&cap.0["text_emb_mean"], &reference(tag, "text_emb_mean")) <= tight);
        for k in 0..25 {
            let name = format!("attention_maps_step0_{k}");
            let ours = &cap.0[&name];
            assert_eq!(ours.dims()[1], n, "{tag} {name}");
            let err = max_abs_diff(ours, &reference(tag, &name));
            assert!(err <= tight, "{tag} {name}: max abs error {err}");
        }
        let eps = max_abs_diff(
            &cap.0["noise_pred_step0"],
            &reference(tag, "noise_pred_step0"),
        );
        let lat = max_abs_diff(&cap.0["latent_final"], &reference(tag, "latent_final"));
        println!("{tag}: guided eps step 0 {eps:.3e}, final latent {lat:.3e}");
        assert!(eps <= bound(1e-3, 2.5e-1), "{tag} guided eps: {eps}");
        // The tiny random members' final latents reach |x| ~ 40 (std ~10).
        assert!(lat <= bound(1e-3, 1.0), "{tag} final latent: {lat}");
        if tag == "n2" {
            let img = max_abs_diff(&cap.0["image"], &reference(tag, "image"));
            println!("{tag}: image {img:.3e}");
            assert!(img <= bound(1e-3, 1e-1), "{tag} image: {img}");
        }
    }
}

#[test]
fn raw_denoiser_call_with_per_sample_timesteps() {
    for tag in ["n2", "n3"] {
        let loaded = load(tag);
        let n = loaded.ensemble.members().len();
        let per_expert: Vec<Tensor> = (0..n)
            .map(|e| reference(tag, &format!("single_call_context_e{e}")))
            .collect();
        let mean = Tensor::stack(&per_expert, 0).unwrap().mean(0).unwrap();
        let context = afa::ensemble::EnsembleContext::Experts { per_expert, mean };
        let x = reference(tag, "single_call_latent");
        let t = reference(tag, "single_call_t");
        let guidance = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let denoiser = loaded.ensemble.denoiser(&EnsembleMode::Afa).unwrap();
        let mut maps = Vec::new();
        let eps = denoiser
            .predict(&x, &t, &guidance, &context, Some(&mut maps))
            .unwrap();
        let err = max_abs_diff(&eps, &reference(tag, "single_call_eps"));
        assert!(err <= 1e-4, "{tag}: {err}");
        assert_eq!(maps.len(), 25);
        for map in &maps {
            let sums = map.sum(1).unwrap();
            let off = (sums - 1.0)
                .unwrap()
                .abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap();
            assert!(off < 1e-5, "maps must sum to 1 over experts");
        }
    }
}

#[test]
fn every_mode_runs_is_seed_deterministic_and_batch_independent() {
    let loaded = load("n3");
    let modes = [
        EnsembleMode::Afa,
        EnsembleMode::Mean,
        EnsembleMode::Single("expert1".into()),
        EnsembleMode::Merge,
        "magicfusion".parse().unwrap(),
    ];
    for mode in &modes {
        let mut req = request("n3", None);
        req.initial_latents = None;
        req.steps = 3;
        req.images.push(ImageSpec {
            seed: 99,
            prompt: "an astronaut".into(),
            ..req.images[0].clone()
        });
        let both = run(&loaded, mode, &req);
        let again = run(&loaded, mode, &req);
        assert_eq!(
            max_abs_diff(&both.0["latent_final"], &again.0["latent_final"]),
            0.0,
            "{mode}"
        );
        let mut alone = req.clone();
        alone.images.remove(0);
        let one = run(&loaded, mode, &alone);
        // Equal up to float rounding (matrix shapes differ with the batch size).
        let err = max_abs_diff(
            &both.0["latent_final"].narrow(0, 1, 1).unwrap(),
            &one.0["latent_final"],
        );
        assert!(err <= 1e-4, "{mode}: batch vs alone {err}");
    }
}

#[test]
fn single_member_mode_equals_that_model_alone() {
    let loaded = load("n2");
    let cap = run(
        &loaded,
        &EnsembleMode::Single("expert0".into()),
        &request("n2", None),
    );
    let eps0 = afa::loading::checkpoint::load_model(
        &afa::loading::checkpoint::ModelSource {
            model: "tests/fixtures/tiny-sd".into(),
            ..Default::default()
        },
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    let pipeline = SdPipeline {
        tokenizer: eps0.tokenizer,
        denoiser: afa::models::SingleUNet {
            text_encoder: eps0.text_encoder,
            unet: eps0.unet,
        },
        vae: eps0.vae,
        scheduler_config: eps0.scheduler,
        device: Device::Cpu,
        model_name: "tiny".into(),
        limits: Limits::default(),
    };
    let mut plain = Capture::default();
    pipeline.generate(&request("n2", None), &mut plain).unwrap();
    assert_eq!(
        max_abs_diff(&cap.0["latent_final"], &plain.0["latent_final"]),
        0.0
    );
}

#[test]
fn unknown_member_and_missing_merge_are_clear_errors() {
    let loaded = load("n2");
    let err = loaded
        .ensemble
        .denoiser(&EnsembleMode::Single("nope".into()))
        .unwrap_err();
    assert!(err.to_string().contains("expert0"), "{err}");
    let options = EnsembleLoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        merge_weights: None,
        aggregators: None,
    };
    let plain = open_official(&official_folder("n2"))
        .unwrap()
        .build(&options)
        .unwrap();
    assert!(plain.ensemble.denoiser(&EnsembleMode::Merge).is_err());
}

#[test]
fn aggregators_for_other_members_are_refused_naming_the_difference() {
    // n3's aggregators on n2's members: member count differs.
    let options = EnsembleLoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        merge_weights: None,
        aggregators: Some(Path::new("tests/fixtures/afa/n3").to_path_buf()),
    };
    let parts = open_official(&official_folder("n2")).unwrap();
    let err = parts.build(&options).unwrap_err().to_string();
    assert!(err.contains("3 members") && err.contains("has 2"), "{err}");
}

#[test]
fn sd15_points_and_parameter_counts_match_the_spec() {
    use afa::ensemble::points::{AggregatorShape, aggregator_configs};
    let config = afa::models::unet::UNetConfig::sd15();
    assert_eq!(aggregation_points(&config).len(), 25);
    for (n, expected) in [(2usize, 42_425_344usize), (3, 45_132_416)] {
        let varmap = candle_nn::VarMap::new();
        let vb = candle_nn::VarBuilder::from_varmap(&varmap, DType::F32, &Device::Cpu);
        for (k, cfg) in aggregator_configs(&config, n, 768, AggregatorShape::default())
            .iter()
            .enumerate()
        {
            afa::ensemble::Aggregator::new(cfg, vb.pp(format!("aggregator_{k}"))).unwrap();
        }
        let count: usize = varmap.all_vars().iter().map(|v| v.elem_count()).sum();
        assert_eq!(count, expected, "N={n}");
    }
}

#[test]
fn identical_experts_with_fresh_aggregators_reproduce_the_single_model() {
    use afa::ensemble::points::{AggregatorShape, aggregator_configs};
    use afa::ensemble::{Aggregator, Ensemble, EnsembleContext, Member};
    use std::sync::Arc;
    let source = afa::loading::checkpoint::ModelSource {
        model: "tests/fixtures/tiny-sd".into(),
        ..Default::default()
    };
    let model = afa::loading::checkpoint::load_model(&source, DType::F32, &Device::Cpu).unwrap();
    let unet = Arc::new(model.unet);
    let text = Arc::new(model.text_encoder);
    for n in [1usize, 2, 3] {
        let members: Vec<Member> = (0..n)
            .map(|i| Member {
                name: format!("copy{i}"),
                weight_hash: "same".into(),
                unet: unet.clone(),
                text_encoder: text.clone(),
            })
            .collect();
        let shape = AggregatorShape {
            hidden_size: 8,
            num_layers: 1,
            num_attn_heads: 2,
            norm_num_groups: 4,
        };
        // Zero weights: conv_out is zero as for a fresh aggregator, so every map is 1/N.
        let vb = candle_nn::VarBuilder::zeros(DType::F32, &Device::Cpu);
        let aggregators: Vec<Aggregator> = aggregator_configs(unet.config(), n, 16, shape)
            .iter()
            .enumerate()
            .map(|(k, c)| Aggregator::new(c, vb.pp(format!("aggregator_{k}"))).unwrap())
            .collect();
        let ensemble = Ensemble::new(members, aggregators, None).unwrap();
        let x = npy("tests/fixtures/unet/batch2_sample.npy");
        let t = npy("tests/fixtures/unet/batch2_timesteps.npy");
        let ids = Tensor::from_vec(
            (0..154u32)
                .map(|i| if i % 77 == 0 { 998 } else { 300 + i % 50 })
                .collect::<Vec<_>>(),
            (2, 77),
            &Device::Cpu,
        )
        .unwrap();
        let emb = text.forward(&ids).unwrap();
        let context = EnsembleContext::Experts {
            per_expert: vec![emb.clone(); n],
            mean: emb.clone(),
        };
        let guidance = Tensor::ones((1, 1, 1, 1), DType::F32, &Device::Cpu).unwrap();
        let mut maps = Vec::new();
        let eps = ensemble
            .denoiser(&EnsembleMode::Afa)
            .unwrap()
            .predict(&x, &t, &guidance, &context, Some(&mut maps))
            .unwrap();
        let single = unet.forward(&x, &t, &emb).unwrap();
        assert!(max_abs_diff(&eps, &single) <= 1e-5, "N={n}");
        for map in &maps {
            let v = map.flatten_all().unwrap().to_vec1::<f32>().unwrap();
            assert!(v.iter().all(|w| (w - 1.0 / n as f32).abs() < 1e-6));
        }
    }
}
