//! The work queue between the HTTP layer and the models: a bounded queue counted in images,
//! a batcher that groups compatible work by `BatchKey`, one executor thread per device that
//! owns the models, cancellation and progress events.
pub mod contract;

pub use contract::{
    BatchKey, GenerationJob, ImageMap, ImageResult, JobError, JobEvent, JobOutput, JobTimings,
    SubmitError,
};
