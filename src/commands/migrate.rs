//! `afa migrate`: creates the job database when missing and applies the embedded migrations
//! (`afa serve` does the same at start-up; this lets a deployment do it ahead of time).
use anyhow::Context;
use clap::Args;

use crate::store::JobStore;

/// `afa migrate` flags.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The job database (`sqlite://path`; created when missing).
    #[arg(long, env = "AFA_DATABASE_URL", default_value = "sqlite://afa.db")]
    pub database_url: String,
}

/// A single-threaded runtime for the store commands.
pub(crate) fn block_on<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    Ok(rt.block_on(f))
}

/// Runs `afa migrate`.
pub fn run(args: &MigrateArgs) -> anyhow::Result<()> {
    block_on(async {
        let store = JobStore::connect(&args.database_url)
            .await
            .with_context(|| format!("opening {}", args.database_url))?;
        store.migrate().await.context("migrating")?;
        store.close().await;
        anyhow::Ok(())
    })??;
    let n = crate::store::MIGRATOR.iter().count();
    println!("{}: up to date ({n} migrations)", args.database_url);
    Ok(())
}
