//! Parity of the VAE (`afa::models::vae`) and the CLIP text encoder (`afa::models::clip`) with
//! diffusers/transformers on the tiny SD1.5-architecture model, against the fixtures written by
//! `scripts/fixtures/components.py`; plus batch independence and weight-mismatch reporting.
//! The parity checks honour AFA_TEST_DEVICE / AFA_TEST_DTYPE (tests/common).
mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use afa::loading::{LoadError, SafetensorsFile, WeightSet};
use afa::models::clip::{ClipTextConfig, ClipTextModel};
use afa::models::vae::{AutoencoderKL, VaeConfig};
use candle_core::{DType, Device, Tensor};

type TestResult = Result<(), Box<dyn std::error::Error>>;

/// f32: 1e-4 on any device; half precision: the documented looser bound.
fn tolerance() -> f32 {
    common::bound(1e-4, 5e-2)
}

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures")
}

fn fixture(name: &str) -> Result<Tensor, Box<dyn std::error::Error>> {
    Ok(afa::npy::read(root().join("components").join(name))?.to_tensor(&Device::Cpu)?)
}

fn config<T: serde::de::DeserializeOwned>(rel: &str) -> Result<T, Box<dyn std::error::Error>> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        root().join("tiny-sd").join(rel),
    )?)?)
}

fn weights(
    rel: &str,
    component: &str,
    rename: impl Fn(&str) -> Option<String>,
) -> Result<WeightSet, LoadError> {
    let file = Arc::new(SafetensorsFile::open(&root().join("tiny-sd").join(rel))?);
    Ok(WeightSet::from_file(component, file, rename))
}

fn vae_weights() -> Result<WeightSet, LoadError> {
    weights("vae/diffusion_pytorch_model.safetensors", "vae", |k| {
        Some(k.to_string())
    })
}

/// The tiny text encoder is stored without the `text_model.` prefix; a `position_ids` buffer,
/// if present, is dropped (the model computes positions itself).
fn clip_weights() -> Result<WeightSet, LoadError> {
    weights("text_encoder/model.safetensors", "text_encoder", |k| {
        let name = if k.starts_with("text_model.") {
            k.to_string()
        } else {
            format!("text_model.{k}")
        };
        (!name.ends_with("embeddings.position_ids")).then_some(name)
    })
}

fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32, candle_core::Error> {
    Ok(common::max_abs_diff(a, b))
}

fn assert_close(what: &str, got: &Tensor, want: &Tensor) -> TestResult {
    let err = max_abs_diff(got, want)?;
    println!("{what}: max abs error {err:.3e}");
    let tolerance = tolerance();
    assert!(
        err <= tolerance,
        "{what}: max abs error {err} > {tolerance}"
    );
    Ok(())
}

fn load_clip() -> Result<ClipTextModel, Box<dyn std::error::Error>> {
    let cfg: ClipTextConfig = config("text_encoder/config.json")?;
    let (dtype, device) = (common::dtype(), common::device());
    Ok(clip_weights()?.build(dtype, &device, |vb| ClipTextModel::new(&cfg, vb))?)
}

fn load_vae() -> Result<AutoencoderKL, Box<dyn std::error::Error>> {
    let cfg: VaeConfig = config("vae/config.json")?;
    let (dtype, device) = (common::dtype(), common::device());
    Ok(vae_weights()?.build(dtype, &device, |vb| AutoencoderKL::new(&cfg, vb))?)
}

#[test]
fn clip_matches_transformers() -> TestResult {
    let model = load_clip()?;
    let ids = fixture("clip_ids.npy")?
        .to_dtype(DType::U32)?
        .to_device(&common::device())?;
    let hidden = model.forward(&ids)?;
    assert_close(
        "clip last_hidden_state",
        &hidden,
        &fixture("clip_hidden.npy")?,
    )
}

#[test]
fn clip_batch_rows_equal_single_prompts() -> TestResult {
    let model = load_clip()?;
    let ids = fixture("clip_ids.npy")?
        .to_dtype(DType::U32)?
        .to_device(&common::device())?;
    let batch = model.forward(&ids)?;
    for row in 0..2 {
        let alone = model.forward(&ids.narrow(0, row, 1)?)?;
        let err = max_abs_diff(&batch.narrow(0, row, 1)?, &alone)?;
        assert!(
            err <= common::bound(1e-6, 1e-2),
            "row {row}: batch differs from single prompt by {err}"
        );
    }
    Ok(())
}

#[test]
fn vae_decode_matches_diffusers() -> TestResult {
    let vae = load_vae()?;
    assert_eq!(vae.scale_factor(), 8);
    assert_eq!(vae.scaling_factor(), 0.18215);
    let decoded = vae.decode(&common::on_test_device(&fixture("vae_latent.npy")?))?;
    assert_close("vae decode", &decoded, &fixture("vae_decoded.npy")?)
}

#[test]
fn vae_encode_matches_diffusers() -> TestResult {
    let vae = load_vae()?;
    let dist = vae.encode(&common::on_test_device(&fixture("vae_image.npy")?))?;
    assert_close("vae encode mean", &dist.mean, &fixture("vae_enc_mean.npy")?)?;
    assert_close(
        "vae encode logvar",
        &dist.logvar,
        &fixture("vae_enc_logvar.npy")?,
    )?;
    assert_close("vae mode", &dist.mode(), &dist.mean)?;
    // sample = mean + exp(logvar / 2) * noise.
    let noise = Tensor::ones(dist.mean.shape(), dist.mean.dtype(), dist.mean.device())?;
    let expected = (&dist.mean + (&dist.logvar * 0.5)?.exp()?)?;
    assert_close("vae sample", &dist.sample(&noise)?, &expected)
}

#[test]
fn vae_latent_scaling_round_trips() -> TestResult {
    let vae = load_vae()?;
    let z = fixture("vae_latent.npy")?;
    let back = vae.unscale_latents(&vae.scale_latents(&z)?)?;
    assert_close("scale/unscale round trip", &back, &z)
}

#[test]
fn wrong_latent_channels_names_mis_shaped_tensors() -> TestResult {
    let mut cfg: VaeConfig = config("vae/config.json")?;
    cfg.latent_channels = 3;
    let err = vae_weights()?
        .build(DType::F32, &Device::Cpu, |vb| AutoencoderKL::new(&cfg, vb))
        .expect_err("a VAE with the wrong latent width must not load");
    let LoadError::TensorMismatch {
        mis_shaped,
        missing,
        unexpected,
        ..
    } = &err
    else {
        panic!("expected TensorMismatch, got {err}");
    };
    let names: Vec<&str> = mis_shaped.iter().map(|m| m.name.as_str()).collect();
    for name in [
        "quant_conv.weight",
        "post_quant_conv.weight",
        "encoder.conv_out.weight",
        "decoder.conv_in.weight",
    ] {
        assert!(names.contains(&name), "{name} not reported: {names:?}");
    }
    assert!(missing.is_empty() && unexpected.is_empty(), "{err}");
    assert!(err.to_string().contains("quant_conv.weight"), "{err}");
    Ok(())
}

#[test]
fn missing_and_unexpected_tensors_are_named() -> TestResult {
    let set = weights("vae/diffusion_pytorch_model.safetensors", "vae", |k| {
        (k != "decoder.conv_out.bias").then(|| k.replace("encoder.conv_in.", "encoder.stem."))
    })?;
    let cfg: VaeConfig = config("vae/config.json")?;
    let err = set
        .build(DType::F32, &Device::Cpu, |vb| AutoencoderKL::new(&cfg, vb))
        .expect_err("renamed tensors must not load");
    let LoadError::TensorMismatch {
        missing,
        unexpected,
        ..
    } = &err
    else {
        panic!("expected TensorMismatch, got {err}");
    };
    assert!(
        missing.contains(&"decoder.conv_out.bias".to_string()),
        "{err}"
    );
    assert!(
        missing.contains(&"encoder.conv_in.weight".to_string()),
        "{err}"
    );
    assert!(
        unexpected.contains(&"encoder.stem.weight".to_string()),
        "{err}"
    );
    Ok(())
}

#[test]
fn clip_loads_without_unexpected_tensors() -> TestResult {
    // `build` fails on any unused tensor, so a successful load means none was left over.
    let set = clip_weights()?;
    assert!(set.names().iter().all(|n| n.starts_with("text_model.")));
    load_clip()?;
    Ok(())
}

#[test]
fn unsupported_vae_configs_are_rejected() -> TestResult {
    let mut cfg: VaeConfig = config("vae/config.json")?;
    cfg.act_fn = "gelu".into();
    assert!(cfg.validate().is_err());
    let mut cfg: VaeConfig = config("vae/config.json")?;
    cfg.down_block_types = Some(vec!["DownBlock2D".into(); 4]);
    assert!(cfg.validate().is_err());
    let default: VaeConfig = serde_json::from_str(
        r#"{"block_out_channels":[8],"layers_per_block":1,"norm_num_groups":4,"latent_channels":4,"x":1}"#,
    )?;
    assert_eq!(default.scaling_factor, 0.18215);
    assert!(
        default.mid_block_add_attention && default.use_quant_conv && default.shift_factor.is_none()
    );
    Ok(())
}
