//! The heartbeat: every third of the lease, renews the leases of the jobs this replica runs
//! and stops those that were cancelled (by a `DELETE` on any replica) or whose lease was lost;
//! then returns the jobs of replicas that stopped renewing (expired leases) to the queue, or
//! fails them past `max_attempts`.
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::watch;

use super::service::JobService;

/// Renews and reaps leases until `stop` turns true.
pub async fn run_heartbeat(jobs: Arc<JobService>, stop: watch::Receiver<bool>) {
    let every = (jobs.config.lease / 3).max(Duration::from_millis(50));
    super::periodically(every, stop, || beat(&jobs)).await;
}

/// One renewal and reaping round.
pub async fn beat(jobs: &JobService) {
    let held = jobs.held_leases();
    match jobs
        .store
        .renew(&jobs.replica, &held, jobs.config.lease)
        .await
    {
        Ok(r) => {
            for id in &r.cancelled {
                tracing::info!(job = %id, "job cancelled in the store; stopping it");
                jobs.cancel_running(id);
            }
            for id in &r.lost {
                tracing::warn!(job = %id, "lease on the job lost; stopping it here");
                jobs.cancel_running(id);
            }
        }
        Err(e) => tracing::error!("renewing job leases: {e}"),
    }
    match jobs.store.reap_expired(jobs.config.max_attempts).await {
        Ok(r) => {
            if !r.requeued.is_empty() || !r.failed.is_empty() {
                tracing::warn!(
                    requeued = ?r.requeued,
                    failed = ?r.failed,
                    "jobs whose lease expired returned to the queue"
                );
                jobs.wake();
            }
        }
        Err(e) => tracing::error!("reaping expired job leases: {e}"),
    }
}
