//! The error type of the `loading` layer: everything that can go wrong turning files into weights.
use std::path::{Path, PathBuf};

/// A tensor whose stored shape differs from what the model expects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShapeMismatch {
    pub name: String,
    pub expected: Vec<usize>,
    pub found: Vec<usize>,
}

/// Errors of the loading layer. Messages name the file and, for tensors, every offending name.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        path: PathBuf,
        source: serde_json::Error,
    },
    #[error("{}: {reason}", path.display())]
    Format { path: PathBuf, reason: String },
    #[error(
        "{}: pickle checkpoints (.ckpt/.pt/.bin/.pth) are refused because loading them can run arbitrary code; convert it to .safetensors first (for example with the `safetensors` convert script or diffusers' `save_pretrained(safe_serialization=True)`)",
        path.display()
    )]
    Pickle { path: PathBuf },
    #[error(
        "{component}: checkpoint does not match the model: {}",
        describe_mismatch(missing, unexpected, mis_shaped)
    )]
    TensorMismatch {
        component: String,
        missing: Vec<String>,
        unexpected: Vec<String>,
        mis_shaped: Vec<ShapeMismatch>,
    },
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

impl LoadError {
    /// Shorthand for an I/O error on `path`.
    pub fn io(path: &Path, source: std::io::Error) -> Self {
        LoadError::Io {
            path: path.to_path_buf(),
            source,
        }
    }

    /// Shorthand for a malformed file.
    pub fn format(path: &Path, reason: impl Into<String>) -> Self {
        LoadError::Format {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

fn list(names: &[String]) -> String {
    const SHOWN: usize = 12;
    let mut s = names
        .iter()
        .take(SHOWN)
        .cloned()
        .collect::<Vec<_>>()
        .join(", ");
    if names.len() > SHOWN {
        s.push_str(&format!(" and {} more", names.len() - SHOWN));
    }
    s
}

fn describe_mismatch(
    missing: &[String],
    unexpected: &[String],
    mis_shaped: &[ShapeMismatch],
) -> String {
    let mut parts = Vec::new();
    if !missing.is_empty() {
        parts.push(format!(
            "{} missing tensor(s): {}",
            missing.len(),
            list(missing)
        ));
    }
    if !mis_shaped.is_empty() {
        let names: Vec<String> = mis_shaped
            .iter()
            .map(|m| {
                format!(
                    "{} (expected {:?}, found {:?})",
                    m.name, m.expected, m.found
                )
            })
            .collect();
        parts.push(format!(
            "{} mis-shaped tensor(s): {}",
            names.len(),
            list(&names)
        ));
    }
    if !unexpected.is_empty() {
        parts.push(format!(
            "{} unexpected tensor(s): {}",
            unexpected.len(),
            list(unexpected)
        ));
    }
    parts.join("; ")
}
