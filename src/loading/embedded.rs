//! The embedded default: the demonstration ensemble of `assets/demo/` (two tiny
//! SD1.5-architecture members trained on the shapes world, their aggregators, and the registry
//! that declares them), compiled into the binary so `afa generate` draws a real picture on a
//! fresh machine with no download. It is written once to a cache folder (named by a hash of the
//! content) and then loaded through the ordinary `models.toml` and diffusers-folder code, so it
//! takes no special path.
use std::path::{Path, PathBuf};

use super::LoadError;

/// Name of the embedded ensemble in messages.
pub const EMBEDDED_ENSEMBLE_NAME: &str = "shapes-afa (embedded demonstration ensemble)";

macro_rules! demo_file {
    ($rel:literal) => {
        include_bytes!(concat!(env!("CARGO_MANIFEST_DIR"), "/assets/demo/", $rel)) as &[u8]
    };
}

// The members share their VAE and text encoder byte for byte: embedded once.
const VAE_CONFIG: &[u8] = demo_file!("member-a/vae/config.json");
const VAE_WEIGHTS: &[u8] = demo_file!("member-a/vae/diffusion_pytorch_model.safetensors");
const TEXT_CONFIG: &[u8] = demo_file!("member-a/text_encoder/config.json");
const TEXT_WEIGHTS: &[u8] = demo_file!("member-a/text_encoder/model.safetensors");

/// Every file of the bundle: (path inside the bundle, bytes).
const FILES: [(&str, &[u8]); 19] = [
    ("models.toml", demo_file!("models.toml")),
    (
        "aggregators.safetensors",
        demo_file!("aggregators.safetensors"),
    ),
    (
        "member-a/model_index.json",
        demo_file!("member-a/model_index.json"),
    ),
    (
        "member-a/scheduler/scheduler_config.json",
        demo_file!("member-a/scheduler/scheduler_config.json"),
    ),
    (
        "member-a/unet/config.json",
        demo_file!("member-a/unet/config.json"),
    ),
    (
        "member-a/unet/diffusion_pytorch_model.safetensors",
        demo_file!("member-a/unet/diffusion_pytorch_model.safetensors"),
    ),
    ("member-a/vae/config.json", VAE_CONFIG),
    (
        "member-a/vae/diffusion_pytorch_model.safetensors",
        VAE_WEIGHTS,
    ),
    ("member-a/text_encoder/config.json", TEXT_CONFIG),
    ("member-a/text_encoder/model.safetensors", TEXT_WEIGHTS),
    (
        "member-b/model_index.json",
        demo_file!("member-b/model_index.json"),
    ),
    (
        "member-b/scheduler/scheduler_config.json",
        demo_file!("member-b/scheduler/scheduler_config.json"),
    ),
    (
        "member-b/unet/config.json",
        demo_file!("member-b/unet/config.json"),
    ),
    (
        "member-b/unet/diffusion_pytorch_model.safetensors",
        demo_file!("member-b/unet/diffusion_pytorch_model.safetensors"),
    ),
    ("member-b/vae/config.json", VAE_CONFIG),
    (
        "member-b/vae/diffusion_pytorch_model.safetensors",
        VAE_WEIGHTS,
    ),
    ("member-b/text_encoder/config.json", TEXT_CONFIG),
    ("member-b/text_encoder/model.safetensors", TEXT_WEIGHTS),
    ("README.md", demo_file!("README.md")),
];

/// A content hash of the embedded files (xxh3-64, as the weight files are hashed), naming the
/// cache folder.
fn content_hash() -> u64 {
    let mut h = xxhash_rust::xxh3::Xxh3::new();
    for (name, bytes) in FILES.iter() {
        h.update(name.as_bytes());
        h.update(bytes);
    }
    h.digest()
}

/// Writes the embedded ensemble under `cache_root` (once per content) and returns the path of
/// its `models.toml`.
pub fn materialize_embedded_ensemble(cache_root: &Path) -> Result<PathBuf, LoadError> {
    let dir = cache_root.join(format!("shapes-afa-{:016x}", content_hash()));
    let registry = dir.join("models.toml");
    if registry.is_file() {
        return Ok(registry);
    }
    let staging = cache_root.join(format!("shapes-afa-staging-{}", std::process::id()));
    for (rel, bytes) in FILES.iter() {
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
    if registry.is_file() {
        Ok(registry)
    } else {
        Err(LoadError::format(
            &dir,
            "could not write the embedded ensemble",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn materializes_a_loadable_registry_once() {
        let root = std::env::temp_dir().join(format!("afa-embedded-{}", std::process::id()));
        let a = materialize_embedded_ensemble(&root).unwrap();
        let b = materialize_embedded_ensemble(&root).unwrap();
        assert_eq!(a, b);
        let registry = crate::config::ModelRegistry::load(&a).unwrap();
        assert_eq!(registry.ensemble(None).unwrap().name, "shapes-afa");
        std::fs::remove_dir_all(&root).unwrap();
    }

    #[test]
    fn the_members_really_share_vae_and_text_encoder_files() {
        // Embedded once on the strength of this: the committed files are byte-identical.
        let demo = Path::new(env!("CARGO_MANIFEST_DIR")).join("assets/demo");
        for rel in [
            "vae/config.json",
            "vae/diffusion_pytorch_model.safetensors",
            "text_encoder/config.json",
            "text_encoder/model.safetensors",
        ] {
            let a = std::fs::read(demo.join("member-a").join(rel)).unwrap();
            let b = std::fs::read(demo.join("member-b").join(rel)).unwrap();
            assert!(a == b, "{rel} differs between the members");
        }
    }
}
