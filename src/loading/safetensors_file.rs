//! Memory-mapped safetensors files: the only place in the crate that uses `unsafe` (mmap).
//!
//! Pickle checkpoints are refused before anything is read, because unpickling runs code.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::{Dtype as StDtype, TensorInfo};

use super::LoadError;

/// File extensions of pickle-based checkpoints, which we never open.
const PICKLE_EXTENSIONS: [&str; 5] = ["ckpt", "pt", "pth", "bin", "pkl"];

/// Errors out when `path` names a pickle checkpoint.
pub fn refuse_pickle(path: &Path) -> Result<(), LoadError> {
    let ext = path
        .extension()
        .and_then(|e| e.to_str())
        .map(|e| e.to_ascii_lowercase());
    match ext {
        Some(e) if PICKLE_EXTENSIONS.contains(&e.as_str()) => Err(LoadError::Pickle {
            path: path.to_path_buf(),
        }),
        _ => Ok(()),
    }
}

/// One opened `.safetensors` file: the mapping plus its parsed header.
pub struct SafetensorsFile {
    path: PathBuf,
    mmap: memmap2::Mmap,
    data_start: usize,
    tensors: HashMap<String, TensorInfo>,
    metadata: HashMap<String, String>,
}

impl std::fmt::Debug for SafetensorsFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SafetensorsFile")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl SafetensorsFile {
    /// Maps `path` and parses its header. Pickle files are refused with a clear message.
    pub fn open(path: &Path) -> Result<Self, LoadError> {
        refuse_pickle(path)?;
        let file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
        // SAFETY: the mapping is read-only and lives as long as `self`. Tensors are copied out of
        // it on load, so no tensor borrows the mapping. Concurrent truncation of the file by
        // another process would be undefined behaviour, as with any mmap; model files are not
        // modified while being served.
        let mmap = unsafe { memmap2::Mmap::map(&file) }.map_err(|e| LoadError::io(path, e))?;
        let (header_len, metadata) = safetensors::SafeTensors::read_metadata(&mmap)
            .map_err(|e| LoadError::format(path, format!("not a valid safetensors file: {e}")))?;
        let header_metadata = metadata.metadata().clone().unwrap_or_default();
        let tensors = metadata
            .tensors()
            .into_iter()
            .map(|(name, info)| (name, info.clone()))
            .collect();
        Ok(Self {
            path: path.to_path_buf(),
            mmap,
            data_start: 8 + header_len,
            tensors,
            metadata: header_metadata,
        })
    }

    /// Path of the file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The `__metadata__` string map of the header (empty when absent).
    pub fn metadata(&self) -> &HashMap<String, String> {
        &self.metadata
    }

    /// Content hash (xxh3-64) of the whole file, as 16 hex digits.
    pub fn content_hash(&self) -> String {
        format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&self.mmap))
    }

    /// Names of every tensor in the file.
    pub fn names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Stored shape of `name`, if present.
    pub fn shape(&self, name: &str) -> Option<&[usize]> {
        self.tensors.get(name).map(|i| i.shape.as_slice())
    }

    /// Copies tensor `name` out of the mapping, converted to `dtype`, onto `device`.
    pub fn load(&self, name: &str, dtype: DType, device: &Device) -> Result<Tensor, LoadError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| LoadError::format(&self.path, format!("no tensor named {name}")))?;
        let stored = match info.dtype {
            StDtype::F32 => DType::F32,
            StDtype::F16 => DType::F16,
            StDtype::BF16 => DType::BF16,
            StDtype::F64 => DType::F64,
            StDtype::I64 => DType::I64,
            StDtype::U8 => DType::U8,
            StDtype::U32 => DType::U32,
            other => {
                return Err(LoadError::format(
                    &self.path,
                    format!("tensor {name} has unsupported dtype {other:?}"),
                ));
            }
        };
        let (begin, end) = info.data_offsets;
        let bytes = self
            .mmap
            .get(self.data_start + begin..self.data_start + end)
            .ok_or_else(|| {
                LoadError::format(
                    &self.path,
                    format!("tensor {name} lies past the end of the file"),
                )
            })?;
        let t = Tensor::from_raw_buffer(bytes, stored, &info.shape, &Device::Cpu)?;
        let t = if stored == dtype {
            t
        } else {
            t.to_dtype(dtype)?
        };
        Ok(t.to_device(device)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pickle_extensions_are_refused() {
        for p in ["model.ckpt", "x/pytorch_model.bin", "a.PT", "b.pth"] {
            let err = SafetensorsFile::open(Path::new(p)).unwrap_err();
            assert!(matches!(err, LoadError::Pickle { .. }), "{p}");
            assert!(err.to_string().contains("safetensors"));
        }
    }

    #[test]
    fn garbage_is_a_format_error() {
        let dir = std::env::temp_dir().join(format!("st-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.safetensors");
        std::fs::write(&p, b"definitely not safetensors").unwrap();
        let err = SafetensorsFile::open(&p).unwrap_err();
        assert!(matches!(err, LoadError::Format { .. }), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
