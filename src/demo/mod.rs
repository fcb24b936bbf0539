//! The demonstration world (issue 10): a fixed, procedurally drawn captioned dataset of one flat
//! shape on a light background, where prompt alignment can be judged exactly by pixels.
//!
//! - `world`: the vocabulary (colours, shapes, positions), captions, and the 60 combinations.
//! - `render`: draws a scene (64x64 RGB) from a seed: jittered colours, position and size.
//! - `judge`: reads a picture back into colour, shape and position, from pixels alone.
//! - `eval`: every mode of an ensemble on this world (denoising loss, alignment, routing).
//!
//! The demo ensemble shipped in `assets/demo/` was trained on renders of this world
//! (`scripts/demo/train_demo.py` for the members, `afa train` for the aggregators), and `afa eval`
//! measures every mode on it. Only `eval` touches a model.
pub mod eval;
pub mod judge;
pub mod render;
pub mod world;

pub use judge::{Tally, Verdict, judge};
pub use render::render;
pub use world::{Colour, Position, Scene, Shape};
