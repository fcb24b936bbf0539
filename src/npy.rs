//! NumPy `.npy` files through candle's own reader and writer (`Tensor::read_npy`,
//! `Tensor::write_npy`), with the file named in errors.
//!
//! Used by `afa generate --latents/--dump` and by the parity tests that compare against
//! reference arrays written by the Python fixture scripts.
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// Errors reading or writing `.npy` files.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    File {
        path: String,
        source: candle_core::Error,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// A decoded array: its shape, element type, and values widened to f64 (exact for every type
/// our files use; i64 beyond 2^53 never occurs in them).
#[derive(Debug, Clone)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub dtype: DType,
    pub data: Vec<f64>,
}

impl NpyArray {
    /// Values as f32.
    pub fn to_f32(&self) -> Vec<f32> {
        self.data.iter().map(|&v| v as f32).collect()
    }
    /// Values as i64.
    pub fn to_i64(&self) -> Vec<i64> {
        self.data.iter().map(|&v| v as i64).collect()
    }
    /// The array as an f32 tensor of the same shape.
    pub fn to_tensor(&self, device: &Device) -> Result<Tensor, candle_core::Error> {
        Tensor::from_vec(self.to_f32(), self.shape.as_slice(), device)
    }
}

fn file_err(path: &Path) -> impl FnOnce(candle_core::Error) -> NpyError + '_ {
    move |source| NpyError::File {
        path: path.display().to_string(),
        source,
    }
}

/// Reads a `.npy` file (little-endian, C order; f16/f32/f64, integer and bool element types).
pub fn read(path: impl AsRef<Path>) -> Result<NpyArray, NpyError> {
    let path = path.as_ref();
    let tensor = Tensor::read_npy(path).map_err(file_err(path))?;
    let data = tensor
        .to_dtype(DType::F64)
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.to_vec1::<f64>())
        .map_err(file_err(path))?;
    Ok(NpyArray {
        shape: tensor.dims().to_vec(),
        dtype: tensor.dtype(),
        data,
    })
}

/// Writes f32 values with the given shape.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    write(
        path.as_ref(),
        &Tensor::from_slice(data, shape, &Device::Cpu)?,
    )
}

/// Writes i64 values with the given shape.
pub fn write_i64(path: impl AsRef<Path>, shape: &[usize], data: &[i64]) -> Result<(), NpyError> {
    write(
        path.as_ref(),
        &Tensor::from_slice(data, shape, &Device::Cpu)?,
    )
}

/// Writes a tensor as f32 `.npy` (any dtype is converted).
pub fn write_tensor(path: impl AsRef<Path>, tensor: &Tensor) -> Result<(), NpyError> {
    write(path.as_ref(), &tensor.to_dtype(DType::F32)?)
}

fn write(path: &Path, tensor: &Tensor) -> Result<(), NpyError> {
    tensor.write_npy(path).map_err(file_err(path))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_f32_and_i64() {
        let dir = std::env::temp_dir().join(format!("npy-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("a.npy");
        write_f32(&p, &[2, 3], &[1., 2., 3., 4., 5., -6.5]).unwrap();
        let a = read(&p).unwrap();
        assert_eq!((a.shape.clone(), a.dtype), (vec![2, 3], DType::F32));
        assert_eq!(a.to_f32(), vec![1., 2., 3., 4., 5., -6.5]);
        let q = dir.join("b.npy");
        write_i64(&q, &[4], &[49406, 320, -1, 7]).unwrap();
        let b = read(&q).unwrap();
        assert_eq!(b.shape, vec![4]);
        assert_eq!(b.to_i64(), vec![49406, 320, -1, 7]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn garbage_and_missing_files_name_the_file() {
        let dir = std::env::temp_dir().join(format!("npy-garbage-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let p = dir.join("bad.npy");
        std::fs::write(&p, b"not an npy file at all").unwrap();
        for path in [p.clone(), dir.join("missing.npy")] {
            let err = read(&path).unwrap_err().to_string();
            assert!(err.contains(&*path.to_string_lossy()), "{err}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
