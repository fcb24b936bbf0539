//! `afa check-models`: validates a `models.toml` (parsing, files, member references) and opens
//! every ensemble's members and aggregators to check that they fit, without building models.
//! Prints one line and exits 0, or fails with one line (exit 1).
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;

use crate::config::ModelRegistry;
use crate::loading::ensemble::{check_parts, open_declared};

/// `afa check-models` flags.
#[derive(Debug, Clone, Args)]
pub struct CheckModelsArgs {
    /// The registry to check.
    #[arg(long, env = "AFA_CONFIG", default_value = "./models.toml")]
    pub config: PathBuf,
}

/// Runs `afa check-models`.
pub fn run(args: &CheckModelsArgs) -> anyhow::Result<()> {
    let registry = ModelRegistry::load(&args.config)?;
    let mut described = Vec::new();
    for entry in &registry.ensembles {
        let parts = open_declared(&registry, entry)
            .with_context(|| format!("ensemble '{}'", entry.name))?;
        check_parts(&parts).with_context(|| format!("ensemble '{}'", entry.name))?;
        let aggregators = if parts.aggregators.is_some() {
            "aggregators ok"
        } else {
            "no aggregators"
        };
        let untrained = if entry.untrained { ", untrained" } else { "" };
        described.push(format!(
            "{} ({} members, {aggregators}{untrained})",
            entry.name,
            parts.members.len()
        ));
    }
    println!(
        "ok: {}: {} ensemble(s): {}",
        args.config.display(),
        described.len(),
        described.join("; ")
    );
    Ok(())
}
