//! The job service (`/v1/jobs` and `response_format: "url"`): submitted jobs live in the store;
//! the dispatcher claims them with a lease and feeds them to the worker, followers record
//! progress and results as lease holders (retrying a failed job up to `max_attempts`), the
//! heartbeat renews leases and requeues the jobs of replicas that stopped, and the sweeper
//! removes expired ones. No HTTP here: the request and file formats come from the HTTP layer
//! through [`JobCodec`].
mod dispatch;
mod heartbeat;
mod service;
mod sweep;

pub use dispatch::{JobCodec, run_dispatcher};
pub use heartbeat::beat;
pub use service::{JobService, JobsConfig, Live, LivePreview};
pub use sweep::{run_sweeper, sweep};
