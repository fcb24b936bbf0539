//! The typed bodies of the API's answers: the handlers build their JSON from these structs and
//! `/openapi.json` describes the same structs (`utoipa::ToSchema`), so the document and the
//! bytes cannot drift apart. Request bodies are described on their own structs
//! (`request.rs`, `openai.rs`); [`MapsOption`] only describes `return_attention_maps`, which
//! the server reads as raw JSON to name the offending sub-field in its errors.
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

pub use super::schema_events::*;

/// A PNG file (the bytes themselves).
#[derive(Debug, Clone, ToSchema)]
#[schema(value_type = String, format = Binary, content_media_type = "image/png")]
pub struct PngFile(pub Vec<u8>);

/// An image file (the bytes themselves) in the request's `output_format`.
#[derive(Debug, Clone, ToSchema)]
#[schema(value_type = String, format = Binary)]
pub struct ImageFile(pub Vec<u8>);

/// Every error, on every route.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[schema(example = json!({"error": {"message": "steps must be 1..=500, got 0",
    "type": "invalid_request_error", "param": "steps", "code": "invalid_value"}}))]
pub struct ErrorEnvelope {
    pub error: ErrorBody,
}

/// What went wrong, and which field (when one is to blame).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ErrorBody {
    pub message: String,
    /// `invalid_request_error`, `authentication_error`, `rate_limit_error` or `server_error`.
    #[serde(rename = "type")]
    #[schema(required = true)]
    pub kind: String,
    /// The request field (or header) to blame; null when none is.
    #[schema(required = true)]
    pub param: Option<String>,
    /// A stable machine-readable code (`invalid_value`, `model_not_found`, `queue_full`, ...).
    pub code: String,
}

/// Per-stage timings in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, ToSchema)]
pub struct Timings {
    pub queue_ms: f64,
    pub text_encode_ms: f64,
    pub denoise_ms: f64,
    pub decode_ms: f64,
    pub png_encode_ms: f64,
}

/// The parameters a job ran with (enough to reproduce it).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Parameters {
    pub prompt: String,
    pub negative_prompt: String,
    pub model: String,
    pub ensemble_mode: String,
    pub n: usize,
    pub width: usize,
    pub height: usize,
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: String,
    /// The seed of the first image (image i used seed + i).
    pub seed: u64,
    /// Image-to-image / inpainting only.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub strength: Option<f64>,
    /// As requested (stored jobs only).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<MapsOption>)]
    pub return_attention_maps: Option<Value>,
    /// Absent for `png` (the default).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// As requested; absent when not given.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub output_compression: Option<u64>,
    /// Absent when 0.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub partial_images: Option<u64>,
}

/// The experts' weights at one aggregation point (averaged over steps, or of one step).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct AttentionMap {
    pub point: usize,
    /// null when averaged over steps.
    #[schema(required = true)]
    pub step: Option<usize>,
    /// `[experts, h, w]`.
    #[schema(min_items = 3, max_items = 3)]
    pub shape: Vec<usize>,
    /// A PNG heat map (each expert a colour), base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heatmap_png_base64: Option<String>,
    /// Little-endian f32 values, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f32_base64: Option<String>,
    /// Little-endian f16 values, base64.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub f16_base64: Option<String>,
}

/// One image of a native answer.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ImageItem {
    pub index: usize,
    pub seed: u64,
    /// The PNG, base64 (with an A1111-style `parameters` text chunk): `output_format` `png`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub png_base64: Option<String>,
    /// The JPEG or WebP file, base64 (the A1111 text in an EXIF UserComment): `output_format`
    /// `jpeg` or `webp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_base64: Option<String>,
    /// `png`, `jpeg` or `webp`.
    #[schema(value_type = OutputFormat)]
    pub output_format: String,
    /// `image/png`, `image/jpeg` or `image/webp`.
    pub content_type: String,
    pub warnings: Vec<String>,
    /// Present when the request asked for attention maps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_maps: Option<Vec<AttentionMap>>,
}

/// The JSON answer of `POST /generate` (also the `result` event of the native streams).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NativeResponse {
    /// The request id (as in `x-request-id`).
    pub id: String,
    /// Unix seconds.
    pub created: u64,
    pub model: String,
    pub images: Vec<ImageItem>,
    pub seeds: Vec<u64>,
    /// The ensemble's members, in order (the legend of the maps).
    pub experts: Vec<String>,
    pub parameters: Parameters,
    pub timings: Timings,
    pub warnings: Vec<String>,
}

/// One image of an OpenAI answer: `b64_json`, or `url` with `response_format: "url"`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiImage {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub b64_json: Option<String>,
    /// `http(s)://host/v1/jobs/<id>/images/<k>` (needs the same bearer key).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    pub seed: u64,
}

/// The answer of `POST /v1/images/generations`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiImagesResponse {
    /// Unix seconds.
    pub created: u64,
    pub data: Vec<OpenAiImage>,
    /// The stored job that made the images (`response_format: "url"` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub job_id: Option<String>,
    pub model: String,
    /// `png`, `jpeg` or `webp`, as asked.
    #[schema(value_type = OutputFormat)]
    pub output_format: String,
    /// `WxH`.
    pub size: String,
    #[schema(value_type = Option<Timings>)]
    pub timings: Value,
    pub warnings: Vec<String>,
}

/// Step progress of a running job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobProgress {
    pub step: usize,
    pub total: usize,
}

/// Why a job failed or was cancelled.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobErrorInfo {
    pub message: Option<String>,
}

/// One image file of a succeeded job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobImage {
    pub index: usize,
    pub seed: Option<u64>,
    /// `/v1/jobs/<id>/images/<k>`.
    pub url: String,
    /// `image/png`, `image/jpeg` or `image/webp` (the job's `output_format`).
    pub content_type: String,
    pub sha256: String,
    pub bytes: u64,
    /// `/v1/jobs/<id>/images/<k>/maps`, when the job asked for maps.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub attention_maps_url: Option<String>,
}

/// A stored job (`/v1/jobs`).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobView {
    /// `job_` + 24 hex digits.
    pub id: String,
    /// Always `job`.
    pub object: String,
    #[schema(value_type = JobStatusName)]
    pub status: String,
    pub model: String,
    pub seeds: Vec<u64>,
    #[schema(value_type = Parameters)]
    pub parameters: Value,
    /// Images ahead of this job (queued or waiting in the worker); null otherwise.
    #[schema(required = true)]
    pub queue_position: Option<usize>,
    /// Running jobs only.
    #[schema(required = true)]
    pub progress: Option<JobProgress>,
    pub attempts: u32,
    /// Failed or cancelled jobs only.
    #[schema(required = true)]
    pub error: Option<JobErrorInfo>,
    #[schema(value_type = Option<Timings>, required = true)]
    pub timings: Option<Value>,
    pub images: Vec<JobImage>,
    /// Unix milliseconds.
    pub created_at: i64,
    #[schema(required = true)]
    pub started_at: Option<i64>,
    #[schema(required = true)]
    pub finished_at: Option<i64>,
    /// When the job and its files are removed (unix ms); null until it finished.
    #[schema(required = true)]
    pub expires_at: Option<i64>,
}

/// The states of a job.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum JobStatusName {
    Queued,
    Running,
    Succeeded,
    Failed,
    Cancelled,
}

/// The attention-map bundle of one image of a stored job.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct MapsBundle {
    pub index: usize,
    pub seed: u64,
    pub experts: Vec<String>,
    pub attention_maps: Vec<AttentionMap>,
}

/// A served ensemble, OpenAI style.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelObject {
    pub id: String,
    /// Always `model`.
    pub object: String,
    /// Unix seconds.
    pub created: u64,
    pub owned_by: String,
    /// The weights are seeded random (the images are noise).
    pub untrained: bool,
}

/// `GET /v1/models`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ModelList {
    /// Always `list`.
    pub object: String,
    pub data: Vec<ModelObject>,
}

/// `/health` and `/ready`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Status {
    /// `ok` (health) or `ready`.
    pub status: String,
}

/// The server's bounds on requests.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InfoLimits {
    pub min_side: usize,
    pub max_side: usize,
    pub max_pixels: usize,
    pub max_steps: usize,
    pub max_guidance: f64,
    pub max_n: usize,
    pub max_prompt_bytes: usize,
    pub max_body_bytes: usize,
    /// The body limit of the routes that carry pictures.
    pub max_upload_bytes: usize,
    pub max_attention_map_bytes: usize,
}

/// A member of an ensemble.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InfoMember {
    pub name: String,
    pub weight_hash: String,
}

/// An ensemble's request defaults.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InfoDefaults {
    pub steps: usize,
    pub guidance_scale: f64,
    pub scheduler: String,
    pub width: usize,
    pub height: usize,
    pub ensemble_mode: String,
}

/// A served ensemble.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InfoEnsemble {
    pub name: String,
    #[schema(required = true)]
    pub description: Option<String>,
    pub untrained: bool,
    /// Said plainly when the weights are untrained.
    #[schema(required = true)]
    pub note: Option<String>,
    pub members: Vec<InfoMember>,
    pub dtype: String,
    pub modes: Vec<String>,
    pub schedulers: Vec<String>,
    pub defaults: InfoDefaults,
    /// `WxH`; empty: any multiple of 8 within the limits.
    pub allowed_sizes: Vec<String>,
}

/// `GET /info`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct Info {
    pub name: String,
    pub version: String,
    /// `loading`, `ready`, `draining` or `failed`.
    pub state: String,
    /// Server settings (batch size, queue capacity, timeouts, whether keys are required).
    #[schema(value_type = Object)]
    pub server: Value,
    /// The path of this API's OpenAPI document.
    pub openapi: String,
    /// Why the models are not served (state `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// One entry per device served on (`--devices`), each with its own copy of the models.
    pub devices: Vec<InfoDevice>,
    /// The fields below are present once the models are loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dtype: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_ensemble: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limits: Option<InfoLimits>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ensembles: Option<Vec<InfoEnsemble>>,
}

/// One device of `GET /info`.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct InfoDevice {
    /// `cpu`, `cuda:0`, ...
    pub name: String,
    /// `loading`, `ready` (takes batches) or `failed` (its models did not load or warm up).
    pub state: String,
    /// Why it is out of service (state `failed`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub failure: Option<String>,
    /// Images in the batch it runs now.
    pub running_images: usize,
    pub batches: u64,
    /// Batches that failed on it (errors or panics; each failed only its own jobs).
    pub failed_batches: u64,
    /// The error of its last failed batch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub last_error: Option<String>,
    pub completed_images: u64,
    /// Measured throughput (moving average).
    pub images_per_second: f64,
}

/// `return_attention_maps`: `false`/`null` (none), `true` (averaged PNG heat maps of every
/// point), or an object choosing steps, points and formats. (A description only: the server
/// reads the raw JSON, to name the offending sub-field in its errors.)
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MapsOption {
    Flag(bool),
    Options(MapsOptions),
}

/// The object form of `return_attention_maps`.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct MapsOptions {
    /// `mean` (default) or `all` (one map per step).
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub steps: Option<MapSteps>,
    /// Aggregation points to keep (all when absent or null); each must exist in the ensemble.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub blocks: Option<Vec<u64>>,
    /// `png` (default), `f32`, `f16`, or a non-empty list of them.
    #[serde(skip_serializing_if = "Option::is_none")]
    #[schema(nullable = false)]
    pub format: Option<MapFormats>,
}

/// Which steps' maps: their mean, or each step's.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MapSteps {
    Mean,
    All,
}

/// An encoding of a map.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum MapFormat {
    Png,
    F32,
    F16,
}

/// One encoding or a non-empty list of them.
#[derive(Debug, Clone, Serialize, ToSchema)]
#[serde(untagged)]
pub enum MapFormats {
    One(MapFormat),
    /// Not empty (an empty list is refused).
    Many(Vec<MapFormat>),
}

/// The samplers (each ensemble lists those it serves in `/info`).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
pub enum SchedulerName {
    #[serde(rename = "ddim")]
    Ddim,
    #[serde(rename = "euler-a")]
    EulerA,
    #[serde(rename = "dpmpp-2m")]
    DpmPp2m,
    #[serde(rename = "dpmpp-2m-karras")]
    DpmPp2mKarras,
}

/// The images' file format: `png` (the default; A1111 `parameters` text chunk), `jpeg`
/// (quality = `output_compression`) or `webp` (lossless); JPEG and WebP carry the A1111 text
/// as an EXIF UserComment.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum OutputFormat {
    Png,
    Jpeg,
    Webp,
}

/// `b64_json` (default) or `url` (the request runs as a stored job; the answer links it).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ResponseFormat {
    B64Json,
    Url,
}

/// Without `steps`: `low` runs half the ensemble's default steps, `auto`/`standard`/`medium`
/// the default, `high`/`hd` twice it, `xhigh` three times, `max` four times (within the step
/// limit); with `steps`, no effect.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Quality {
    Auto,
    Standard,
    Hd,
    Low,
    Medium,
    High,
    Xhigh,
    Max,
}

/// `low`, `medium` or `high`: accepted, no effect (no planning stage runs here).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Complexity {
    Low,
    Medium,
    High,
}

/// `auto` or `opaque` (`transparent` is refused: SD 1.5 images have no alpha).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Background {
    Auto,
    Opaque,
}

/// Accepted for compatibility; no moderation model runs here.
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Moderation {
    Auto,
    Low,
}

/// Accepted for compatibility; no effect (a warning says so).
#[derive(Debug, Clone, Copy, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Style {
    Vivid,
    Natural,
}
