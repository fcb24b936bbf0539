//! The work queue between the HTTP layer and the models: a bounded queue counted in images,
//! a batcher that groups compatible work by `BatchKey`, one executor thread per device that
//! owns that device's copy of the models, cancellation and progress events.
pub mod contract;
pub mod engine;
mod executor;
mod handle;
pub mod queue;

/// The pipeline types that are part of the contract (what a job asks for), so the HTTP layer
/// names them through the worker.
pub use crate::pipeline::{ImageSpec, Limits, MapPoints, MapsRequest};
pub use contract::{
    BatchKey, GenerationJob, ImageMap, ImageResult, JobError, JobEvent, JobOutput, JobTimings,
    SubmitError,
};
pub use engine::{BatchOutcome, Catalog, Engine, EnsembleCatalog, RegistryEngine, validate_job};
pub use handle::{
    DeviceLoader, DeviceState, DeviceStats, EngineLoader, JobTicket, MAX_CONSECUTIVE_FAILURES,
    WorkerConfig, WorkerHandle, WorkerStats, start_worker, start_workers,
};
