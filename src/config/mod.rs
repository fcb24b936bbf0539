//! Settings from files, the command line and the environment: `models.toml` (the registry of
//! members and served ensembles) and the cache folder. The only module that reads environment
//! variables.
mod registry;

use std::path::PathBuf;

pub use registry::{
    ConfigError, EnsembleDefaults, EnsembleEntry, MemberEntry, MemberFormat, ModelRegistry,
    Precision, parse_size,
};

/// Where derived files (the materialised embedded model) are cached:
/// `$AFA_CACHE_DIR`, `$XDG_CACHE_HOME/afa`, `$HOME/.cache/afa`, or the temp folder.
pub fn cache_root() -> PathBuf {
    if let Some(dir) = std::env::var_os("AFA_CACHE_DIR") {
        return PathBuf::from(dir);
    }
    std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir)
        .join("afa")
}
