//! afa-server: serve ensembles of Stable Diffusion 1.5 fine-tunes with Adaptive Feature Aggregation.
//!
//! Layers (see `shared/design/architecture.md`): `loading` turns files into weights, `models`
//! holds the networks (CLIP, VAE, staged UNet), `schedulers` the samplers, `pipeline` runs
//! text -> image for one batch, `cli` parses the command line.
pub mod api;
pub mod app;
pub mod bench;
pub mod cli;
pub mod commands;
pub mod config;
pub mod demo;
pub mod ensemble;
pub mod ids;
pub mod jobs;
pub mod loading;
pub mod models;
pub mod npy;
pub mod pipeline;
pub mod schedulers;
pub mod store;
pub mod telemetry;
pub mod trainer;
pub mod web;
pub mod worker;
