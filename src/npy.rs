//! Minimal reader and writer for NumPy `.npy` files (format 1.0/2.0, little-endian, C order).
//!
//! Used by `afa generate --latents/--dump` and by the parity tests that compare against
//! reference arrays written by the Python fixture scripts.
use std::io::{Read, Write};
use std::path::Path;

use candle_core::{DType, Device, Tensor};

/// Errors reading or writing `.npy` files.
#[derive(Debug, thiserror::Error)]
pub enum NpyError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a valid .npy file: {reason}")]
    Format { path: String, reason: String },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// Element types we read and write.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NpyDtype {
    F16,
    F32,
    F64,
    I32,
    I64,
    U8,
}

impl NpyDtype {
    fn descr(self) -> &'static str {
        match self {
            NpyDtype::F16 => "<f2",
            NpyDtype::F32 => "<f4",
            NpyDtype::F64 => "<f8",
            NpyDtype::I32 => "<i4",
            NpyDtype::I64 => "<i8",
            NpyDtype::U8 => "|u1",
        }
    }
    fn from_descr(d: &str) -> Option<Self> {
        Some(match d {
            "<f2" => NpyDtype::F16,
            "<f4" => NpyDtype::F32,
            "<f8" => NpyDtype::F64,
            "<i4" => NpyDtype::I32,
            "<i8" => NpyDtype::I64,
            "|u1" | "<u1" => NpyDtype::U8,
            _ => return None,
        })
    }
    fn size(self) -> usize {
        match self {
            NpyDtype::U8 => 1,
            NpyDtype::F16 => 2,
            NpyDtype::F32 | NpyDtype::I32 => 4,
            NpyDtype::F64 | NpyDtype::I64 => 8,
        }
    }
}

/// A decoded array: shape plus values widened to f64 (exact for every supported type except
/// i64 beyond 2^53, which never occurs in our files).
#[derive(Debug, Clone)]
pub struct NpyArray {
    pub shape: Vec<usize>,
    pub dtype: NpyDtype,
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

fn format_err(path: &Path, reason: impl Into<String>) -> NpyError {
    NpyError::Format {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// Reads a `.npy` file.
pub fn read(path: impl AsRef<Path>) -> Result<NpyArray, NpyError> {
    let path = path.as_ref();
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|mut f| f.read_to_end(&mut bytes))
        .map_err(|source| NpyError::Io {
            path: path.display().to_string(),
            source,
        })?;
    parse(&bytes).map_err(|reason| format_err(path, reason))
}

/// Parses the bytes of a `.npy` file.
pub fn parse(bytes: &[u8]) -> Result<NpyArray, String> {
    if bytes.len() < 10 || &bytes[..6] != b"\x93NUMPY" {
        return Err("missing the \\x93NUMPY magic".into());
    }
    let major = bytes[6];
    let (header_len, start) = match major {
        1 => (u16::from_le_bytes([bytes[8], bytes[9]]) as usize, 10),
        2 | 3 => {
            if bytes.len() < 12 {
                return Err("truncated header".into());
            }
            (
                u32::from_le_bytes([bytes[8], bytes[9], bytes[10], bytes[11]]) as usize,
                12,
            )
        }
        v => return Err(format!("unsupported format version {v}")),
    };
    let header = bytes
        .get(start..start + header_len)
        .ok_or("truncated header")?;
    let header = std::str::from_utf8(header).map_err(|_| "header is not UTF-8")?;
    let descr = header_value(header, "descr").ok_or("header has no descr")?;
    let descr = descr.trim_matches(|c| c == '\'' || c == '"');
    let dtype = NpyDtype::from_descr(descr).ok_or(format!("unsupported dtype {descr}"))?;
    let fortran = header_value(header, "fortran_order").ok_or("header has no fortran_order")?;
    if fortran.trim() != "False" {
        return Err("Fortran-ordered arrays are not supported".into());
    }
    let shape_text = header_value(header, "shape").ok_or("header has no shape")?;
    let shape: Vec<usize> = shape_text
        .trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<usize>()
                .map_err(|_| format!("bad shape {shape_text}"))
        })
        .collect::<Result<_, _>>()?;
    let count: usize = shape.iter().product();
    let body = &bytes[start + header_len..];
    if body.len() < count * dtype.size() {
        return Err(format!(
            "data holds {} bytes, shape {shape:?} needs {}",
            body.len(),
            count * dtype.size()
        ));
    }
    let data = body
        .chunks_exact(dtype.size())
        .take(count)
        .map(|c| match dtype {
            NpyDtype::U8 => c[0] as f64,
            NpyDtype::F16 => half::f16::from_le_bytes([c[0], c[1]]).to_f64(),
            NpyDtype::F32 => f32::from_le_bytes(c.try_into().unwrap()) as f64,
            NpyDtype::I32 => i32::from_le_bytes(c.try_into().unwrap()) as f64,
            NpyDtype::F64 => f64::from_le_bytes(c.try_into().unwrap()),
            NpyDtype::I64 => i64::from_le_bytes(c.try_into().unwrap()) as f64,
        })
        .collect();
    Ok(NpyArray { shape, dtype, data })
}

/// Finds `'key': value` in a NumPy header dict; value ends at the next top-level comma.
fn header_value<'a>(header: &'a str, key: &str) -> Option<&'a str> {
    let pos = header
        .find(&format!("'{key}'"))
        .or_else(|| header.find(&format!("\"{key}\"")))?;
    let rest = &header[pos + key.len() + 2..];
    let rest = rest.trim_start().strip_prefix(':')?.trim_start();
    let mut depth = 0usize;
    for (i, ch) in rest.char_indices() {
        match ch {
            '(' => depth += 1,
            ')' => {
                if depth == 0 {
                    return Some(&rest[..i]);
                }
                depth -= 1;
                if depth == 0 {
                    return Some(&rest[..=i]);
                }
            }
            ',' | '}' if depth == 0 => return Some(&rest[..i]),
            _ => {}
        }
    }
    None
}

/// Serialises raw little-endian element bytes with a header.
fn encode(dtype: NpyDtype, shape: &[usize], body: &[u8]) -> Vec<u8> {
    let shape_text = match shape.len() {
        1 => format!("({},)", shape[0]),
        _ => format!(
            "({})",
            shape
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
    };
    let mut header = format!(
        "{{'descr': '{}', 'fortran_order': False, 'shape': {shape_text}, }}",
        dtype.descr()
    );
    // Pad so that magic + version + len + header + '\n' is a multiple of 64.
    let unpadded = 10 + header.len() + 1;
    header.push_str(&" ".repeat((64 - unpadded % 64) % 64));
    header.push('\n');
    let mut out = Vec::with_capacity(10 + header.len() + body.len());
    out.extend_from_slice(b"\x93NUMPY\x01\x00");
    out.extend_from_slice(&(header.len() as u16).to_le_bytes());
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(body);
    out
}

fn write_bytes(path: &Path, bytes: &[u8]) -> Result<(), NpyError> {
    std::fs::File::create(path)
        .and_then(|mut f| f.write_all(bytes))
        .map_err(|source| NpyError::Io {
            path: path.display().to_string(),
            source,
        })
}

/// Writes f32 values with the given shape.
pub fn write_f32(path: impl AsRef<Path>, shape: &[usize], data: &[f32]) -> Result<(), NpyError> {
    let body: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_bytes(path.as_ref(), &encode(NpyDtype::F32, shape, &body))
}

/// Writes i64 values with the given shape.
pub fn write_i64(path: impl AsRef<Path>, shape: &[usize], data: &[i64]) -> Result<(), NpyError> {
    let body: Vec<u8> = data.iter().flat_map(|v| v.to_le_bytes()).collect();
    write_bytes(path.as_ref(), &encode(NpyDtype::I64, shape, &body))
}

/// Writes a tensor as f32 `.npy` (any dtype is converted).
pub fn write_tensor(path: impl AsRef<Path>, tensor: &Tensor) -> Result<(), NpyError> {
    let t = tensor
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    write_f32(path, tensor.dims(), &t)
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
        assert_eq!(a.shape, vec![2, 3]);
        assert_eq!(a.to_f32(), vec![1., 2., 3., 4., 5., -6.5]);
        let q = dir.join("b.npy");
        write_i64(&q, &[4], &[49406, 320, -1, 7]).unwrap();
        let b = read(&q).unwrap();
        assert_eq!(b.shape, vec![4]);
        assert_eq!(b.to_i64(), vec![49406, 320, -1, 7]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rejects_garbage() {
        assert!(parse(b"not an npy file at all").is_err());
    }
}
