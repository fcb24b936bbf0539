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

/// Largest absolute difference between two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims(), "shapes differ");
    let a = a.to_dtype(DType::F32).unwrap();
    let b = b.to_dtype(DType::F32).unwrap();
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
