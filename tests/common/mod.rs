//! Helpers shared by the integration tests: fixtures, tolerances, official-folder assembly.
#![allow(dead_code)]
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use afa::pipeline::{Observer, PipelineError};
use candle_core::{DType, Device, Tensor};

/// Reads a fixture `.npy` as an f32 tensor.
pub fn npy(path: impl AsRef<Path>) -> Tensor {
    let path = path.as_ref();
    afa::npy::read(path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .to_tensor(&Device::Cpu)
        .unwrap()
}

/// The device the parity tests run on: `AFA_TEST_DEVICE` = `cpu` (default), `cuda` or `cuda:N`
/// (needs a build with `--features cuda`). Tests that promise bit-exact CPU behaviour ignore it.
pub fn device() -> Device {
    match std::env::var("AFA_TEST_DEVICE").as_deref() {
        Err(_) | Ok("") | Ok("cpu") => Device::Cpu,
        Ok(d) => {
            let ordinal = d
                .strip_prefix("cuda")
                .map(|r| r.trim_start_matches(':'))
                .and_then(|r| {
                    if r.is_empty() {
                        Some(0)
                    } else {
                        r.parse().ok()
                    }
                })
                .unwrap_or_else(|| panic!("AFA_TEST_DEVICE={d}: expected cpu, cuda or cuda:N"));
            Device::new_cuda(ordinal).unwrap_or_else(|e| panic!("AFA_TEST_DEVICE={d}: {e}"))
        }
    }
}

/// The weight precision of the parity tests: `AFA_TEST_DTYPE` = `f32` (default), `f16` or `bf16`
/// (bf16 only on a GPU: candle has no CPU bf16 matmul).
pub fn dtype() -> DType {
    match std::env::var("AFA_TEST_DTYPE").as_deref() {
        Err(_) | Ok("") | Ok("f32") => DType::F32,
        Ok("f16") => DType::F16,
        Ok("bf16") => DType::BF16,
        Ok(d) => panic!("AFA_TEST_DTYPE={d}: expected f32, f16 or bf16"),
    }
}

/// A parity bound: `f32` where the tests run in f32 (on any device: the same tolerances as on
/// the CPU), the documented looser `f16` one in half precision, and 8x that in bf16 (3 fewer
/// mantissa bits). The half bounds are ~4x what f16 measured on the CPU (docs/engine.md).
pub fn bound(f32: f32, f16: f32) -> f32 {
    match dtype() {
        DType::F16 => f16,
        DType::BF16 => 8.0 * f16,
        _ => f32,
    }
}

/// A fixture (CPU, f32) on the test device, in the test dtype.
pub fn on_test_device(t: &Tensor) -> Tensor {
    t.to_device(&device()).unwrap().to_dtype(dtype()).unwrap()
}

/// Largest absolute difference between two tensors of the same shape (any devices/dtypes).
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    let b = b
        .to_device(&Device::Cpu)
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap();
    (a - b)
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// A fresh scratch folder (unique per call, so parallel tests never share one).
pub fn scratch(name: &str) -> PathBuf {
    static COUNTER: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let k = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("afa-test-{}-{k}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// A scratch copy of fixture ensemble `tag`'s ("n2"/"n3") official folder, written by the
/// reference script exactly as the official `save_pretrained` writes it (§9): expert 0's
/// pipeline folder, `additional_unet_{i}`/`additional_text_encoder_{i}` for i = 0..N-2, the
/// aggregators and `model_config.json`.
pub fn official_folder(tag: &str) -> PathBuf {
    let dir = scratch(&format!("official-{tag}"));
    copy_dir(
        &Path::new("tests/fixtures/afa").join(tag).join("official"),
        &dir,
    );
    dir
}

/// The same folder in our earlier layout (expert i in `additional_*_{i}`, i = 1..N-1).
pub fn legacy_folder(tag: &str) -> PathBuf {
    let dir = official_folder(tag);
    let n = (0..)
        .take_while(|i| dir.join(format!("additional_unet_{i}")).is_dir())
        .count();
    for i in (0..n).rev() {
        for kind in ["unet", "text_encoder"] {
            std::fs::rename(
                dir.join(format!("additional_{kind}_{i}")),
                dir.join(format!("additional_{kind}_{}", i + 1)),
            )
            .unwrap();
        }
    }
    dir
}

/// The tiny diffusers folder (tests/fixtures/tiny-sd).
pub fn tiny_sd() -> afa::loading::checkpoint::ModelSource {
    afa::loading::checkpoint::ModelSource {
        model: PathBuf::from("tests/fixtures/tiny-sd"),
        ..Default::default()
    }
}

/// The single-model pipeline of `source` on the test device in the test dtype.
pub fn single_pipeline(
    source: afa::loading::checkpoint::ModelSource,
) -> afa::pipeline::SdPipeline<afa::pipeline::SingleUNet> {
    let afa::loading::checkpoint::LoadedModel {
        unet,
        text_encoder,
        vae,
        tokenizer,
        scheduler,
    } = afa::loading::checkpoint::load_model(&source, dtype(), &device()).unwrap();
    afa::pipeline::SdPipeline {
        tokenizer,
        denoiser: afa::pipeline::SingleUNet { text_encoder, unet },
        vae,
        scheduler_config: scheduler,
        device: device(),
        model_name: "tiny".into(),
        limits: afa::pipeline::Limits::default(),
    }
}

/// The pipeline of a loaded ensemble in `mode` (default limits, on the ensemble's device).
pub fn ensemble_pipeline<'a>(
    loaded: &'a afa::loading::ensemble::LoadedEnsemble,
    mode: &afa::ensemble::EnsembleMode,
) -> afa::pipeline::SdPipeline<afa::ensemble::EnsembleDenoiser<'a>> {
    afa::pipeline::SdPipeline {
        tokenizer: loaded.tokenizer.clone(),
        denoiser: loaded.ensemble.denoiser(mode).unwrap(),
        vae: loaded.vae.clone(),
        scheduler_config: loaded.scheduler.clone(),
        device: loaded.vae.device().clone(),
        model_name: "test ensemble".into(),
        limits: afa::pipeline::Limits::default(),
    }
}

/// An observer that keeps every tensor it is offered.
#[derive(Default)]
pub struct Capture(pub HashMap<String, Tensor>);

impl Observer for Capture {
    fn wants_tensors(&self) -> bool {
        true
    }
    fn tensor(&mut self, name: &str, value: &Tensor) -> Result<(), PipelineError> {
        self.0.insert(name.to_string(), value.clone());
        Ok(())
    }
}
pub mod postgres;

/// Cancels image 0 once `after` steps are done.
pub struct CancelFirst {
    done: usize,
    after: usize,
}

impl CancelFirst {
    pub fn after(steps: usize) -> Self {
        Self {
            done: 0,
            after: steps,
        }
    }
}

impl Observer for CancelFirst {
    fn step(&mut self, done: usize, _total: usize) {
        self.done = done;
    }
    fn is_image_cancelled(&self, index: usize) -> bool {
        index == 0 && self.done >= self.after
    }
}
