//! Files -> weights: diffusers folders, single-file checkpoints (original SD key names mapped to
//! diffusers names), memory-mapped safetensors, tokenizer files. The only module allowed
//! `unsafe` (mmap, in `safetensors_file`).
pub mod aggregators;
pub mod checkpoint;
pub mod diffusers;
pub mod embedded;
pub mod ensemble;
mod error;
pub mod safetensors_file;
pub mod single_file;
pub mod tokenizer_files;
pub mod weights;

pub use error::{LoadError, ShapeMismatch};
pub use safetensors_file::SafetensorsFile;
pub use weights::{Transform, WeightSet, WeightSource};
