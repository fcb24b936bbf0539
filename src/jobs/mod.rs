//! The job service (`/v1/jobs` and `response_format: "url"`): submitted jobs live in the store;
//! the dispatcher feeds them to the worker, followers record progress and results (retrying a
//! failed job up to `max_attempts`), and the sweeper removes expired ones. No HTTP here: the
//! request and file formats come from the HTTP layer through [`JobCodec`].
mod dispatch;
mod service;
mod sweep;

pub use dispatch::{JobCodec, run_dispatcher};
pub use service::{JobService, JobsConfig, Live, LivePreview};
pub use sweep::{run_sweeper, sweep};
