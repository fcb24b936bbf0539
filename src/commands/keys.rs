//! `afa keys create|list|revoke`: API keys of the job store. `create` prints the new key once
//! (only its SHA-256 is stored); once any key exists, `afa serve` requires one on every route
//! but `/health`, `/ready` and `/metrics`, and each key sees only its own jobs.
use anyhow::{Context, bail};
use clap::{Args, Subcommand};

use super::migrate::block_on;
use crate::store::{DatabaseUrl, JobStore};

/// `afa keys` flags.
#[derive(Debug, Clone, Args)]
pub struct KeysArgs {
    /// The job database (`sqlite://path` or `postgres://user:password@host/db`; created and
    /// migrated when missing).
    #[arg(
        long,
        env = "AFA_DATABASE_URL",
        default_value = "sqlite://afa.db",
        global = true,
        hide_env_values = true
    )]
    pub database_url: DatabaseUrl,
    #[command(subcommand)]
    pub action: KeysAction,
}

#[derive(Debug, Clone, Subcommand)]
pub enum KeysAction {
    /// Create a key and print it (it cannot be shown again).
    Create {
        /// A label for the key (who or what uses it).
        #[arg(long)]
        name: String,
        /// Most images this key may have queued or running at once (default: no limit).
        #[arg(long)]
        max_queued_images: Option<u64>,
    },
    /// List keys (id, name, limit, created and revoked in unix seconds); never the keys.
    List,
    /// Revoke key ID: it stops working at once.
    Revoke {
        /// The key's id (`key_...`, from `afa keys list`).
        id: String,
    },
}

fn unix_seconds(ms: i64) -> String {
    (ms / 1000).to_string()
}

/// Runs `afa keys ...`.
pub fn run(args: &KeysArgs) -> anyhow::Result<()> {
    block_on(async {
        let store = JobStore::open(args.database_url.expose())
            .await
            .with_context(|| format!("opening {}", args.database_url))?;
        let result = action(&store, &args.action).await;
        store.close().await;
        result
    })?
}

async fn action(store: &JobStore, action: &KeysAction) -> anyhow::Result<()> {
    match action {
        KeysAction::Create {
            name,
            max_queued_images,
        } => {
            if name.trim().is_empty() || name.len() > 200 {
                bail!("--name must be 1..=200 characters");
            }
            let key = store.create_key(name.trim(), *max_queued_images).await?;
            eprintln!(
                "created {} ({}); the key below is shown only now, store it safely:",
                key.row.id, key.row.name
            );
            println!("{}", key.token);
        }
        KeysAction::List => {
            println!("id\tname\tmax_queued_images\tcreated\trevoked");
            for k in store.list_keys().await? {
                println!(
                    "{}\t{}\t{}\t{}\t{}",
                    k.id,
                    k.name,
                    k.max_queued_images
                        .map(|n| n.to_string())
                        .unwrap_or_else(|| "-".into()),
                    unix_seconds(k.created_at),
                    k.revoked_at.map(unix_seconds).unwrap_or_else(|| "-".into()),
                );
            }
        }
        KeysAction::Revoke { id } => {
            if !store.revoke_key(id).await? {
                bail!("no active key '{id}' (see afa keys list)");
            }
            println!("revoked {id}");
        }
    }
    Ok(())
}
