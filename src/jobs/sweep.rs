//! The expiry sweeper: finished jobs older than the TTL lose their files (local or objects in
//! the shared bucket), then their rows; one replica at a time (the store's sweep lock, a
//! PostgreSQL advisory lock), the others skip the round.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::service::JobService;
use crate::store::now_ms;

/// Removes finished jobs older than the TTL, files first, then rows, until `stop` turns true.
pub async fn run_sweeper(jobs: Arc<JobService>, stop: watch::Receiver<bool>) {
    let ttl = jobs.config.result_ttl;
    let every = (ttl / 4).clamp(Duration::from_millis(500), Duration::from_secs(60));
    super::periodically(every, stop, || async {
        let before = now_ms() - ttl.as_millis() as i64;
        match sweep(&jobs, before).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(removed = n, "expired jobs removed"),
            Err(e) => tracing::error!("sweeping expired jobs: {e}"),
        }
    })
    .await;
}

/// Removes the jobs that finished before `before_ms`; how many (0 when another replica is
/// sweeping now). A job's files go before its row, so a sweep cut short leaves rows whose
/// files the next sweep removes again (removal of what is gone succeeds).
pub async fn sweep(jobs: &JobService, before_ms: i64) -> Result<usize, String> {
    let Some(_lock) = jobs
        .store
        .try_sweep_lock()
        .await
        .map_err(|e| e.to_string())?
    else {
        tracing::debug!("another replica is sweeping expired jobs; skipping this round");
        return Ok(0);
    };
    let ids = jobs
        .store
        .expired(before_ms, 200)
        .await
        .map_err(|e| e.to_string())?;
    for id in &ids {
        let artifacts = jobs.artifacts.clone();
        let job_id = id.clone();
        tokio::task::spawn_blocking(move || artifacts.remove_job(&job_id))
            .await
            .map_err(|e| e.to_string())?
            .map_err(|e| e.to_string())?;
        jobs.store.delete_job(id).await.map_err(|e| e.to_string())?;
    }
    Ok(ids.len())
}
