//! What each subcommand does, between the parsed command line (`cli`) and the library layers.
pub mod convert;
pub mod generate;
mod generate_ensemble;
