//! Opt-in: full-size random SD1.5 weights (written by `scripts/fullsize_check.py`) loaded from
//! the diffusers folder and from the original-key single file give the same tensors as
//! diffusers/transformers. Needs ~12 GB of RAM and minutes; run with
//! `AFA_FULLSIZE_DIR=/tmp/afa-fullsize cargo test --release --test fullsize_optin -- --ignored --nocapture`.
mod common;

use std::path::PathBuf;

use afa::loading::checkpoint::{ModelSource, load_model};
use candle_core::{DType, Device, Tensor};
use common::{max_abs_diff, npy};

fn dir() -> Option<PathBuf> {
    std::env::var_os("AFA_FULLSIZE_DIR").map(PathBuf::from)
}

#[test]
#[ignore = "needs AFA_FULLSIZE_DIR with full-size weights (scripts/fullsize_check.py)"]
fn full_size_layouts_match_diffusers() {
    let Some(root) = dir() else {
        eprintln!("AFA_FULLSIZE_DIR not set; skipping");
        return;
    };
    let reference = root.join("reference");
    let sources = [
        (
            "diffusers folder",
            ModelSource {
                model: root.join("sd15-random"),
                ..Default::default()
            },
        ),
        (
            "single file",
            ModelSource {
                model: root.join("sd15-random.safetensors"),
                tokenizer: Some(root.join("sd15-random").join("tokenizer")),
                ..Default::default()
            },
        ),
    ];
    for (label, source) in sources {
        let model = load_model(&source, DType::F32, &Device::Cpu).unwrap();
        let ids: Vec<u32> = npy(reference.join("ids.npy"))
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|&v| v as u32)
            .collect();
        let prompt = model.tokenizer.encode("a photo of a cat").ids;
        assert_eq!(&prompt[..], &ids[77..], "{label}: token ids");
        let ids = Tensor::from_vec(ids, (2, 77), &Device::Cpu).unwrap();
        let emb = model.text_encoder.forward(&ids).unwrap();
        let text_err = max_abs_diff(&emb, &npy(reference.join("text_emb.npy")));
        let t = Tensor::new(&[981f32, 1.0], &Device::Cpu).unwrap();
        let eps = model
            .unet
            .forward(&npy(reference.join("unet_latent.npy")), &t, &emb)
            .unwrap();
        let unet_err = max_abs_diff(&eps, &npy(reference.join("unet_eps.npy")));
        let image = model.vae.decode(&npy(reference.join("vae_z.npy"))).unwrap();
        let vae_err = max_abs_diff(&image, &npy(reference.join("vae_image.npy")));
        println!(
            "{label}: max abs error text {text_err:.2e}, unet {unet_err:.2e}, vae {vae_err:.2e}"
        );
        assert!(
            text_err <= 1e-4 && unet_err <= 1e-3 && vae_err <= 1e-3,
            "{label}"
        );
    }
}

#[test]
#[ignore = "needs AFA_FULLSIZE_DIR with the N=2 ensemble of scripts/fullsize_afa_check.py"]
fn full_size_official_ensemble_matches_the_reference() {
    use afa::ensemble::EnsembleMode;
    use afa::loading::ensemble::{EnsembleLoadOptions, open_official};
    use afa::pipeline::{BatchRequest, ImageSpec, Limits, MapsRequest, SdPipeline};
    use afa::schedulers::SchedulerKind;
    let Some(root) = dir() else {
        eprintln!("AFA_FULLSIZE_DIR not set; skipping");
        return;
    };
    let reference = root.join("afa-n2-reference");
    let options = EnsembleLoadOptions {
        dtype: DType::F32,
        device: Device::Cpu,
        merge_weights: None,
        aggregators: None,
    };
    let loaded = open_official(&root.join("afa-n2"))
        .unwrap()
        .build(&options)
        .unwrap();
    let pipeline = SdPipeline {
        tokenizer: loaded.tokenizer.clone(),
        denoiser: loaded.ensemble.denoiser(&EnsembleMode::Afa).unwrap(),
        vae: loaded.vae.clone(),
        scheduler_config: loaded.scheduler.clone(),
        device: Device::Cpu,
        model_name: "afa-n2".into(),
        limits: Limits::default(),
    };
    let request = BatchRequest {
        images: vec![ImageSpec {
            prompt: "a photo of a cat".into(),
            negative_prompt: "blurry".into(),
            seed: 0,
            guidance_scale: 7.5,
            init: None,
        }],
        width: 256,
        height: 256,
        steps: 10,
        scheduler: SchedulerKind::Ddim,
        strength: None,
        initial_latents: Some(npy(reference.join("latent_init.npy"))),
        attention_maps: MapsRequest::Off,
    };
    let mut cap = common::Capture::default();
    pipeline.generate(&request, &mut cap).unwrap();
    let mut worst_map = 0f32;
    for k in 0..25 {
        let name = format!("attention_maps_step0_{k}");
        worst_map = worst_map.max(max_abs_diff(
            &cap.0[&name],
            &npy(reference.join(format!("{name}.npy"))),
        ));
    }
    let eps = max_abs_diff(
        &cap.0["noise_pred_step0"],
        &npy(reference.join("noise_pred_step0.npy")),
    );
    let lat = max_abs_diff(
        &cap.0["latent_final"],
        &npy(reference.join("latent_final.npy")),
    );
    println!(
        "full-size N=2 AFA: max abs error maps {worst_map:.2e}, eps step 0 {eps:.2e}, final latent {lat:.2e}"
    );
    assert!(worst_map <= 1e-4 && eps <= 1e-3 && lat <= 1e-3);
}
