//! diffusers pipeline folders: `model_index.json`, and per component a `config.json` plus
//! safetensors weights (single file, fp16 variant, or sharded with an index). Components that
//! only ship pickle weights (`*.bin`) are refused with a message that says to convert them.
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::safetensors_file::{SafetensorsFile, refuse_pickle};
use super::weights::{WeightSet, WeightSource};
use super::{LoadError, Transform};

/// Weight file stems diffusers and transformers use, in order of preference.
const WEIGHT_STEMS: [&str; 2] = ["diffusion_pytorch_model", "model"];

/// Reads and parses a JSON file.
pub fn read_json(path: &Path) -> Result<serde_json::Value, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text).map_err(|source| LoadError::Json {
        path: path.to_path_buf(),
        source,
    })
}

/// True when `path` looks like a diffusers pipeline folder.
pub fn is_pipeline_folder(path: &Path) -> bool {
    path.is_dir() && path.join("model_index.json").is_file()
}

/// One component folder (`unet/`, `vae/`, `text_encoder/`): its config and weights.
#[derive(Debug, Clone)]
pub struct ComponentFolder {
    pub config: serde_json::Value,
    pub weights: WeightSet,
}

/// Opens the component folder `dir` (named `component` in messages). Names are passed
/// through `normalize` (which may drop a key by returning `None`).
pub fn open_component(
    dir: &Path,
    component: &str,
    normalize: impl Fn(&str) -> Option<String>,
) -> Result<ComponentFolder, LoadError> {
    if !dir.is_dir() {
        return Err(LoadError::format(
            dir,
            format!("{component} folder not found"),
        ));
    }
    let config = read_json(&dir.join("config.json"))?;
    let files = weight_files(dir)?;
    let mut entries = std::collections::HashMap::new();
    for file in files {
        let file = Arc::new(SafetensorsFile::open(&file)?);
        for key in file.names() {
            if let Some(name) = normalize(key) {
                let source = WeightSource {
                    file: file.clone(),
                    key: key.to_string(),
                    transform: Transform::None,
                };
                entries.insert(name, source);
            }
        }
    }
    Ok(ComponentFolder {
        config,
        weights: WeightSet::new(component, entries),
    })
}

/// The safetensors files holding a component's weights.
fn weight_files(dir: &Path) -> Result<Vec<PathBuf>, LoadError> {
    for stem in WEIGHT_STEMS {
        for variant in ["", ".fp16"] {
            let single = dir.join(format!("{stem}{variant}.safetensors"));
            if single.is_file() {
                return Ok(vec![single]);
            }
            let index = dir.join(format!("{stem}{variant}.safetensors.index.json"));
            if index.is_file() {
                return sharded_files(&index);
            }
        }
    }
    for stem in WEIGHT_STEMS {
        for ext in ["bin", "ckpt", "pt"] {
            let pickle = dir.join(format!("{stem}.{ext}"));
            if pickle.is_file() {
                refuse_pickle(&pickle)?;
            }
        }
    }
    Err(LoadError::format(
        dir,
        "no safetensors weights found (expected diffusion_pytorch_model.safetensors or model.safetensors)",
    ))
}

/// Shard files listed in a `*.safetensors.index.json` (`weight_map` values), deduplicated.
fn sharded_files(index: &Path) -> Result<Vec<PathBuf>, LoadError> {
    let json = read_json(index)?;
    let map = json
        .get("weight_map")
        .and_then(|m| m.as_object())
        .ok_or_else(|| LoadError::format(index, "index has no weight_map"))?;
    let dir = index.parent().unwrap_or(Path::new("."));
    let mut files: Vec<PathBuf> = Vec::new();
    for shard in map.values() {
        let name = shard
            .as_str()
            .ok_or_else(|| LoadError::format(index, "weight_map values must be file names"))?;
        let shard_path = Path::new(name);
        if shard_path.components().count() != 1 {
            return Err(LoadError::format(
                index,
                format!("shard name {name} must be a plain file name"),
            ));
        }
        let path = dir.join(shard_path);
        if !files.contains(&path) {
            files.push(path);
        }
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickle_only_component_is_refused() {
        let dir = std::env::temp_dir().join(format!("diffusers-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        std::fs::write(dir.join("config.json"), "{}").unwrap();
        std::fs::write(dir.join("diffusion_pytorch_model.bin"), b"pickle").unwrap();
        let err = open_component(&dir, "unet", |k| Some(k.to_string())).unwrap_err();
        assert!(matches!(err, LoadError::Pickle { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn shard_names_cannot_escape_the_folder() {
        let dir = std::env::temp_dir().join(format!("diffusers-shard-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let index = dir.join("model.safetensors.index.json");
        std::fs::write(&index, r#"{"weight_map": {"a": "../../etc/passwd"}}"#).unwrap();
        assert!(sharded_files(&index).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
