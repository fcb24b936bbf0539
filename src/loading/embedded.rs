//! The embedded default model: the tiny seeded SD1.5-architecture pipeline from
//! `tests/fixtures/tiny-sd`, compiled into the binary so `afa generate` works on a fresh machine
//! with no download. Its weights are random (it draws noise-like images); it exists to exercise
//! the whole path. It is written once to a cache folder and then loaded through the ordinary
//! diffusers-folder code, so it takes no special path.
use std::path::{Path, PathBuf};

use super::LoadError;

/// Name used for the embedded model in messages and metadata.
pub const EMBEDDED_MODEL_NAME: &str = "tiny-sd (embedded, untrained)";

macro_rules! tiny_file {
    ($rel:literal) => {
        (
            $rel,
            include_bytes!(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/tiny-sd/",
                $rel
            )) as &[u8],
        )
    };
}

const FILES: [(&str, &[u8]); 11] = [
    tiny_file!("model_index.json"),
    tiny_file!("scheduler/scheduler_config.json"),
    tiny_file!("text_encoder/config.json"),
    tiny_file!("text_encoder/model.safetensors"),
    tiny_file!("tokenizer/merges.txt"),
    tiny_file!("tokenizer/special_tokens_map.json"),
    tiny_file!("tokenizer/tokenizer_config.json"),
    tiny_file!("tokenizer/vocab.json"),
    tiny_file!("unet/config.json"),
    tiny_file!("unet/diffusion_pytorch_model.safetensors"),
    tiny_file!("vae/config.json"),
];

const VAE_WEIGHTS: (&str, &[u8]) = tiny_file!("vae/diffusion_pytorch_model.safetensors");

/// A content hash of the embedded files (FNV-1a), naming the cache folder.
fn content_hash() -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for (name, bytes) in FILES.iter().chain(std::iter::once(&VAE_WEIGHTS)) {
        for b in name.as_bytes().iter().chain(bytes.iter()) {
            h ^= *b as u64;
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
    }
    h
}

/// Writes the embedded model under `cache_root` (once per content) and returns its folder.
pub fn materialize_embedded_model(cache_root: &Path) -> Result<PathBuf, LoadError> {
    let dir = cache_root.join(format!("tiny-sd-{:016x}", content_hash()));
    if dir.join("model_index.json").is_file() {
        return Ok(dir);
    }
    let staging = cache_root.join(format!("tiny-sd-staging-{}", std::process::id()));
    for (rel, bytes) in FILES.iter().chain(std::iter::once(&VAE_WEIGHTS)) {
        let path = staging.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| LoadError::io(parent, e))?;
        }
        std::fs::write(&path, bytes).map_err(|e| LoadError::io(&path, e))?;
    }
    // A concurrent process may have won the race; either copy is identical.
    if std::fs::rename(&staging, &dir).is_err() {
        let _ = std::fs::remove_dir_all(&staging);
    }
    if dir.join("model_index.json").is_file() {
        Ok(dir)
    } else {
        Err(LoadError::format(
            &dir,
            "could not write the embedded model",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materializes_a_loadable_folder_once() {
        let root = std::env::temp_dir().join(format!("afa-embedded-{}", std::process::id()));
        let a = materialize_embedded_model(&root).unwrap();
        let b = materialize_embedded_model(&root).unwrap();
        assert_eq!(a, b);
        assert!(super::super::diffusers::is_pipeline_folder(&a));
        std::fs::remove_dir_all(&root).unwrap();
    }
}
