//! The work queue between the HTTP layer and the models: a bounded queue counted in images,
//! a batcher that groups compatible work by `BatchKey`, one executor thread per device that
//! owns that device's copy of the models, cancellation and progress events.
pub mod contract;
pub mod engine;
mod executor;
mod handle;
pub mod queue;

/// The types of the layers below that are part of the contract (what a job asks for), so the
/// HTTP layer names them through the worker.
pub use crate::ensemble::EnsembleMode;
pub use crate::pipeline::image_input;
pub use crate::pipeline::maps::{heatmap_scale, legend_text};
pub use crate::pipeline::preview::MAX_PARTIAL_IMAGES;
pub use crate::pipeline::{
    Encoding, ImageFormat, ImageSpec, InitImage, Limits, MapPoints, MapsRequest, Raster, Strength,
};
pub use crate::schedulers::SchedulerKind;
pub use contract::{
    BatchKey, GenerationJob, ImageMap, ImageResult, JobError, JobEvent, JobOutput, JobTimings,
    SubmitError,
};
pub use engine::{
    BatchOutcome, Catalog, Engine, EnsembleCatalog, RegistryEngine, device_name, validate_job,
};
pub use handle::{
    DeviceLoader, DeviceState, DeviceStats, EngineLoader, JobTicket, WorkerConfig, WorkerHandle,
    WorkerStats, start_worker, start_workers,
};
