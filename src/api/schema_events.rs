//! The data of the Server-Sent Events every stream sends (described in `/openapi.json` like
//! the answers in `schema.rs`, which re-exports them), and the table of which events each
//! stream has.
use serde::Serialize;
use utoipa::ToSchema;

#[allow(unused_imports)]
use super::schema::{JobStatusName, OutputFormat};

/// `queued` event of the native streams.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct QueuedData {
    /// Images ahead of this request.
    pub position: usize,
}

/// `progress` event of the native streams.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct ProgressData {
    pub step: usize,
    pub total: usize,
}

/// `queued` event of a job's stream.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobQueuedData {
    #[schema(value_type = JobStatusName)]
    pub status: String,
    #[schema(required = true)]
    pub position: Option<usize>,
}

/// `progress` event of a job's stream.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct JobProgressData {
    /// Always `running`.
    pub status: String,
    pub step: usize,
    #[schema(required = true)]
    pub total: Option<usize>,
}

/// `image_generation.progress` event of the OpenAI stream.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiProgressData {
    /// Always `image_generation.progress`.
    #[serde(rename = "type")]
    pub kind: String,
    #[schema(required = true)]
    pub queue_position: Option<usize>,
    pub step: usize,
    pub total: usize,
}

/// `image_generation.completed` event of the OpenAI stream (one per image; no `usage`: a
/// diffusion model counts no tokens).
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiCompletedData {
    /// Always `image_generation.completed`.
    #[serde(rename = "type")]
    pub kind: String,
    pub b64_json: String,
    /// Unix seconds.
    pub created_at: u64,
    pub size: String,
    pub quality: String,
    /// Always `opaque`.
    pub background: String,
    /// `png`, `jpeg` or `webp`, as asked.
    #[schema(value_type = OutputFormat)]
    pub output_format: String,
    pub index: usize,
    pub seed: u64,
    pub warnings: Vec<String>,
}

/// `image_generation.partial_image` event of the OpenAI stream (`partial_images`): the clean
/// image the model predicts after an evenly spaced step, decoded with the VAE.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct OpenAiPartialImageData {
    /// Always `image_generation.partial_image`.
    #[serde(rename = "type")]
    pub kind: String,
    pub b64_json: String,
    /// 0-based, per image.
    pub partial_image_index: usize,
    /// Unix seconds.
    pub created_at: u64,
    pub size: String,
    pub quality: String,
    /// Always `opaque`.
    pub background: String,
    #[schema(value_type = OutputFormat)]
    pub output_format: String,
    /// Which image of the request (0 when n = 1).
    pub index: usize,
    /// The step after which it was predicted, of `total`.
    pub step: usize,
    pub total: usize,
}

/// `preview` event of the native and job streams (`partial_images`): the clean image the
/// model predicts after an evenly spaced step, decoded with the VAE, in the request's format.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct PreviewData {
    /// Which image of the request.
    pub index: usize,
    /// 0-based, per image.
    pub partial_image_index: usize,
    pub step: usize,
    pub total: usize,
    #[schema(value_type = OutputFormat)]
    pub output_format: String,
    /// `output_format` `png`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub png_base64: Option<String>,
    /// `output_format` `jpeg` or `webp`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub image_base64: Option<String>,
}

/// The events of one stream: `(event name, the schemas its data may have)`.
pub type StreamEvents = &'static [(&'static str, &'static [&'static str])];

/// The event-stream schemas (OpenAPI 3.1 describes a `text/event-stream` by one event:
/// `event` names it, `data` is JSON of the named schema), as `(component, [(event, data)])`.
pub const EVENT_STREAMS: [(&str, StreamEvents); 3] = [
    (
        "NativeStreamEvent",
        &[
            ("queued", &["QueuedData"]),
            ("progress", &["ProgressData"]),
            ("preview", &["PreviewData"]),
            ("result", &["NativeResponse"]),
            ("error", &["ErrorEnvelope"]),
        ],
    ),
    (
        "OpenAiStreamEvent",
        &[
            ("image_generation.progress", &["OpenAiProgressData"]),
            (
                "image_generation.partial_image",
                &["OpenAiPartialImageData"],
            ),
            ("image_generation.completed", &["OpenAiCompletedData"]),
            ("error", &["ErrorEnvelope"]),
        ],
    ),
    (
        "JobStreamEvent",
        &[
            ("queued", &["JobQueuedData"]),
            ("progress", &["JobProgressData"]),
            ("preview", &["PreviewData"]),
            ("result", &["JobView"]),
            // A failed or cancelled job's view, or the envelope when the job vanished.
            ("error", &["JobView", "ErrorEnvelope"]),
        ],
    ),
];

/// The schema of one event of a stream in [`EVENT_STREAMS`].
pub fn event_stream_schema(events: &[(&str, &[&str])]) -> utoipa::openapi::Schema {
    use utoipa::openapi::schema::{AnyOfBuilder, ObjectBuilder, OneOfBuilder, Type};
    use utoipa::openapi::{Ref, RefOr};
    let mut one_of = OneOfBuilder::new();
    for (name, data) in events {
        let content: RefOr<utoipa::openapi::Schema> = match data {
            [one] => Ref::from_schema_name(*one).into(),
            many => {
                let mut any = AnyOfBuilder::new();
                for d in many.iter() {
                    any = any.item(Ref::from_schema_name(*d));
                }
                utoipa::openapi::Schema::AnyOf(any.build()).into()
            }
        };
        let event = ObjectBuilder::new()
            .property(
                "event",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .enum_values(Some([*name])),
            )
            .property(
                "data",
                ObjectBuilder::new()
                    .schema_type(Type::String)
                    .content_media_type("application/json")
                    .content_schema(Some(content)),
            )
            .required("event")
            .required("data");
        one_of = one_of.item(event);
    }
    one_of.build().into()
}
