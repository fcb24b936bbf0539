//! The original-layout (LDM) single-file fixture maps key for key onto the tiny diffusers model:
//! `tests/fixtures/tiny-sd-single.safetensors` was written from `tests/fixtures/tiny-sd` by
//! `scripts/fixtures/single_file.py`, an inverse mapping written independently of the Rust table.
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use afa::loading::single_file::{
    Component, MapResult, SingleFileLayout, map_key, normalize_diffusers_name,
};
use candle_core::{DType, Device, Tensor};
use safetensors::SafeTensors;
use safetensors::tensor::TensorView;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn config(sub: &str) -> serde_json::Value {
    let bytes = read(&fixtures().join("tiny-sd").join(sub).join("config.json"));
    serde_json::from_slice(&bytes).unwrap()
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    let items = v.as_array().expect("array");
    items
        .iter()
        .map(|s| s.as_str().unwrap().to_string())
        .collect()
}

/// The layout as the loader builds it from the UNet and VAE configs.
fn tiny_layout() -> SingleFileLayout {
    let (unet, vae) = (config("unet"), config("vae"));
    SingleFileLayout::from_configs(
        &strings(&unet["down_block_types"]),
        &strings(&unet["up_block_types"]),
        unet["layers_per_block"].as_u64().unwrap() as usize,
        vae["block_out_channels"].as_array().unwrap().len(),
        vae["layers_per_block"].as_u64().unwrap() as usize,
    )
}

fn to_tensor(view: &TensorView<'_>) -> Tensor {
    let dtype = match view.dtype() {
        safetensors::Dtype::F32 => DType::F32,
        other => panic!("fixture tensors are f32, found {other:?}"),
    };
    Tensor::from_raw_buffer(view.data(), dtype, view.shape(), &Device::Cpu).unwrap()
}

const COMPONENT_FILES: [(Component, &str); 3] = [
    (Component::Unet, "unet/diffusion_pytorch_model.safetensors"),
    (Component::Vae, "vae/diffusion_pytorch_model.safetensors"),
    (Component::TextEncoder, "text_encoder/model.safetensors"),
];

#[test]
fn every_single_file_key_maps_onto_the_diffusers_model() {
    let layout = tiny_layout();
    let buffers: Vec<(Component, Vec<u8>)> = COMPONENT_FILES
        .iter()
        .map(|(c, f)| (*c, read(&fixtures().join("tiny-sd").join(f))))
        .collect();
    // (component, normalized diffusers name) -> tensor
    let mut expected = BTreeMap::new();
    for (component, bytes) in &buffers {
        for (name, view) in SafeTensors::deserialize(bytes).unwrap().tensors() {
            let name = normalize_diffusers_name(*component, &name).into_owned();
            assert!(
                expected
                    .insert((*component, name), to_tensor(&view))
                    .is_none()
            );
        }
    }
    let single = read(&fixtures().join("tiny-sd-single.safetensors"));
    let single = SafeTensors::deserialize(&single).unwrap();

    let (mut produced, mut ignored, mut unknown) = (BTreeSet::new(), Vec::new(), Vec::new());
    for (key, view) in single.tensors() {
        let mapped = match map_key(&key, &layout) {
            MapResult::Mapped(m) => m,
            MapResult::Ignored => {
                ignored.push(key);
                continue;
            }
            MapResult::Unknown => {
                unknown.push(key);
                continue;
            }
        };
        let id = (mapped.component, mapped.name.clone());
        let want = expected
            .get(&id)
            .unwrap_or_else(|| panic!("{key} -> {id:?}: no such diffusers tensor"));
        assert!(produced.insert(id.clone()), "{key}: {id:?} produced twice");
        let got = mapped.transform.apply(to_tensor(&view)).unwrap();
        assert_eq!(got.dims(), want.dims(), "{key} -> {id:?}");
        let diff = (got - want).unwrap().abs().unwrap().flatten_all().unwrap();
        let max = diff.max(0).unwrap().to_scalar::<f32>().unwrap();
        assert_eq!(max, 0.0, "{key} -> {id:?}: values differ");
    }

    assert!(unknown.is_empty(), "unknown keys: {unknown:?}");
    let missing: Vec<_> = expected.keys().filter(|k| !produced.contains(*k)).collect();
    assert!(missing.is_empty(), "never produced: {missing:?}");
    ignored.sort();
    let want_ignored = [
        "alphas_cumprod",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "model_ema.decay",
        "model_ema.num_updates",
    ];
    assert_eq!(ignored, want_ignored);
    let per_component = |c| produced.iter().filter(|(pc, _)| *pc == c).count();
    assert_eq!(per_component(Component::Unet), 684);
    assert_eq!(per_component(Component::Vae), 180);
    assert_eq!(per_component(Component::TextEncoder), 36);
}

#[test]
fn keys_outside_the_architecture_are_unknown() {
    let layout = tiny_layout();
    for key in [
        "model.diffusion_model.input_blocks.12.0.in_layers.0.weight",
        "model.diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q",
        "model.diffusion_model.output_blocks.0.1.norm.weight",
        // valid for SD1.5 (two VAE layers per block), not for the tiny VAE (one)
        "first_stage_model.encoder.down.0.block.1.conv1.weight",
        "first_stage_model.decoder.up.0.block.2.conv1.weight",
        "conditioner.embedders.0.transformer.text_model.final_layer_norm.weight",
        "cond_stage_model.model.ln_final.weight",
        "some_lora.alpha",
    ] {
        assert_eq!(map_key(key, &layout), MapResult::Unknown, "{key}");
    }
    assert_eq!(
        map_key(
            "model.diffusion_model.input_blocks.11.0.in_layers.0.weight",
            &layout
        ),
        map_key(
            "model.diffusion_model.input_blocks.11.0.in_layers.0.weight",
            &SingleFileLayout::sd15()
        ),
    );
}
