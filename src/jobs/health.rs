//! The job database's health for readiness: a `SELECT 1` every two seconds; while it fails,
//! `/ready` answers 503 (a load balancer sends no new work to a replica that cannot store it),
//! and it turns 200 again as soon as the database answers. Changes are logged once each.
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use tokio::sync::watch;

use super::service::JobService;

/// How often the database is asked, and how long an answer may take.
pub const HEALTH_EVERY: Duration = Duration::from_secs(2);

/// Probes the database until `stop` turns true.
pub async fn run_health_probe(jobs: Arc<JobService>, stop: watch::Receiver<bool>) {
    super::periodically(HEALTH_EVERY, stop, || probe(&jobs)).await;
}

/// One probe: records whether the database answered.
pub async fn probe(jobs: &JobService) {
    let result = jobs.store.ping(HEALTH_EVERY).await;
    let ok = result.is_ok();
    if jobs.database_ok.swap(ok, Ordering::SeqCst) != ok {
        match result {
            Ok(()) => tracing::info!("the job database answers again; ready"),
            Err(e) => tracing::error!("the job database does not answer ({e}); not ready"),
        }
    }
}
