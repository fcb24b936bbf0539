//! What each subcommand does, between the parsed command line (`cli`) and the library layers.
pub mod bench;
pub mod check_models;
pub mod convert;
pub mod demo;
pub mod device;
pub mod eval;
pub mod generate;
mod generate_ensemble;
pub mod keys;
pub mod migrate;
pub mod probe;
pub mod serve;
pub mod train;
