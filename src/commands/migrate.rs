//! `afa migrate`: creates the job database when missing and applies the embedded migrations
//! (`afa serve` does the same at start-up; this lets a deployment do it ahead of time).
use anyhow::Context;
use clap::Args;

use crate::store::{DatabaseUrl, JobStore};

/// `afa migrate` flags.
#[derive(Debug, Clone, Args)]
pub struct MigrateArgs {
    /// The job database (`sqlite://path`, created when missing, or
    /// `postgres://user:password@host/db`).
    #[arg(
        long,
        env = "AFA_DATABASE_URL",
        default_value = "sqlite://afa.db",
        hide_env_values = true
    )]
    pub database_url: DatabaseUrl,
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
    let shown = &args.database_url;
    let n = block_on(async {
        let store = JobStore::connect(args.database_url.expose())
            .await
            .with_context(|| format!("opening {shown}"))?;
        store.migrate().await.context("migrating")?;
        let n = store.migrator().iter().count();
        store.close().await;
        anyhow::Ok(n)
    })??;
    println!("{shown}: up to date ({n} migrations)");
    Ok(())
}
