//! The job service (`/v1/jobs` and `response_format: "url"`): submitted jobs live in the store;
//! the dispatcher claims them with a lease and feeds them to the worker, followers record
//! progress (in memory, and in the row at a bounded rate) and results as lease holders (retrying a failed job up to `max_attempts`), the
//! heartbeat renews leases and requeues the jobs of replicas that stopped, the sweeper
//! removes expired ones, and the health probe tells readiness whether the database answers. No HTTP here: the request and file formats come from the HTTP layer
//! through [`JobCodec`].
mod dispatch;
mod health;
mod heartbeat;
mod progress;
mod service;
mod sweep;

pub use dispatch::{JobCodec, run_dispatcher};
pub use health::{HEALTH_EVERY, run_health_probe};
pub use heartbeat::beat;
pub use service::{JobService, JobsConfig, Live, LivePreview, PROGRESS_EVERY};
pub use sweep::{run_sweeper, sweep};

/// Runs `round` every `every` until `stop` turns true (or its sender is gone); the first round
/// comes after one period.
pub(crate) async fn periodically<F, Fut>(
    every: std::time::Duration,
    mut stop: tokio::sync::watch::Receiver<bool>,
    mut round: F,
) where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    while !*stop.borrow() {
        tokio::select! {
            _ = tokio::time::sleep(every) => {}
            changed = stop.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
        }
        round().await;
    }
}
