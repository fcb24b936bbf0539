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
