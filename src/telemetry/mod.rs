//! Observability: tracing setup and every Prometheus metric the server exports. Metric names
//! are constants here so dashboards, tests and docs refer to one spelling. Knows nothing of
//! HTTP or the worker: the API layer fills a [`WorkerGauges`] snapshot and records request
//! outcomes into [`Metrics`].
mod metrics;

pub use metrics::{DeviceGauges, Histogram, Metrics, WorkerGauges};

/// Images waiting in the queue (gauge).
pub const QUEUE_DEPTH: &str = "afa_queue_depth_images";
/// Images in the batch that is running now (gauge).
pub const RUNNING_IMAGES: &str = "afa_running_images";
/// Capacity of the queue, in images (gauge).
pub const QUEUE_CAPACITY: &str = "afa_queue_capacity_images";
/// Seconds a job waited before its first image started (histogram).
pub const QUEUE_WAIT: &str = "afa_queue_wait_seconds";
/// Seconds per pipeline stage of a job, label `stage` (histogram).
pub const STAGE_SECONDS: &str = "afa_stage_seconds";
/// Seconds from request to response of generation requests, label `route` (histogram).
pub const REQUEST_SECONDS: &str = "afa_request_duration_seconds";
/// Size of the batch that ran last (gauge).
pub const BATCH_SIZE: &str = "afa_last_batch_size";
/// Measured throughput, images per second, moving average (gauge).
pub const IMAGES_PER_SECOND: &str = "afa_images_per_second";
/// Images generated (counter).
pub const IMAGES_COMPLETED: &str = "afa_images_completed_total";
/// Jobs that failed after they were accepted (counter).
pub const JOBS_FAILED: &str = "afa_jobs_failed_total";
/// Images cancelled (client gone or timed out), as the worker counts them (counter).
pub const CANCELLED_IMAGES: &str = "afa_cancelled_images_total";
/// Generation requests whose client went away before the result (counter).
pub const CLIENT_DISCONNECTS: &str = "afa_client_disconnects_total";
/// Generation requests refused, label `reason` (counter).
pub const REJECTIONS: &str = "afa_rejections_total";
/// HTTP responses, labels `route` and `status` (counter).
pub const HTTP_RESPONSES: &str = "afa_http_responses_total";
/// 1 when every model is loaded and warmed up and the server is not draining (gauge).
pub const READY: &str = "afa_ready";
/// 1 while the server drains for shutdown (gauge).
pub const DRAINING: &str = "afa_draining";

/// Per device (label `device`): 1 while it takes batches, 0 while loading or out of service.
pub const DEVICE_UP: &str = "afa_device_up";
/// Per device: images in the batch it runs now (gauge).
pub const DEVICE_RUNNING_IMAGES: &str = "afa_device_running_images";
/// Per device: batches run (counter).
pub const DEVICE_BATCHES: &str = "afa_device_batches_total";
/// Per device: batches that failed on it (counter).
pub const DEVICE_FAILED_BATCHES: &str = "afa_device_failed_batches_total";
/// Per device: images generated (counter).
pub const DEVICE_IMAGES: &str = "afa_device_images_completed_total";
/// Per device: measured throughput, moving average (gauge).
pub const DEVICE_IMAGES_PER_SECOND: &str = "afa_device_images_per_second";

/// Stages reported under [`STAGE_SECONDS`].
pub const STAGES: [&str; 4] = ["text_encode", "denoise", "decode", "png_encode"];

/// Warnings (and errors) only, to stderr: what the one-shot commands (`generate`, `train`, ...)
/// show, e.g. that a folder was read in a deprecated layout.
pub fn init_warnings() {
    let _ = tracing_subscriber::fmt()
        .with_max_level(tracing::Level::WARN)
        .with_writer(std::io::stderr)
        .with_target(false)
        .without_time()
        .try_init();
}

/// Logs to stderr at `info` (`debug` when `verbose`). Repeated calls are harmless (the second
/// install fails quietly).
pub fn init_tracing(verbose: bool) {
    let level = if verbose {
        tracing::Level::DEBUG
    } else {
        tracing::Level::INFO
    };
    let _ = tracing_subscriber::fmt()
        .with_max_level(level)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}
