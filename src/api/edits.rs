//! `POST /v1/images/edits` as the official client sends it (multipart/form-data: `image` or
//! `image[]`, an optional `mask`, text fields) turned into a native image-to-image or
//! inpainting request. OpenAI's mask is transparent (alpha 0) where the picture is edited; a
//! picture with transparent pixels and no mask is its own mask, as OpenAI does; otherwise the
//! whole picture is redrawn (image-to-image at `strength`). Text fields are read as the JSON
//! they stand for and checked like the generations request, so errors name the field. The
//! native routes take the same kind of form (`init_image`, `mask` as uploads) as an
//! alternative to JSON with base64 pictures.
use axum::body::Bytes;
use axum::extract::multipart::MultipartError;
use axum::extract::{FromRequest, Multipart};
use axum::http::{HeaderMap, header};
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde::Deserialize;
use serde_json::{Map, Value};
use utoipa::ToSchema;

use super::body::parse_json;
use super::error::ApiError;
use super::init_request::picture;
use super::openai::{OpenAiImageRequest, OpenAiOptions, to_native};
use super::request::NativeRequest;
#[allow(unused_imports)]
use super::schema::{Background, MapsOption, OutputFormat, Quality, ResponseFormat, SchedulerName};
use crate::worker::SubmitError;
use crate::worker::image_input::{MaskConvention, has_transparent_pixels, to_native_mask};

/// Most form fields one edit may have.
const MAX_FIELDS: usize = 64;
/// Longest text field, in bytes (prompts are bounded far below by the native validation).
const MAX_TEXT_BYTES: usize = 64 * 1024;

/// The multipart form of `POST /v1/images/edits`. Unknown fields are refused by name.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct OpenAiEditForm {
    /// The picture to edit (PNG, JPEG or WebP, at most 4096 pixels a side); one per request
    /// (`image[]` with one entry is the same). Without `size` the result takes its size,
    /// rounded down to a multiple of 8.
    #[serde(skip)]
    #[schema(value_type = String, format = Binary)]
    pub image: Option<String>,
    /// A PNG of the picture's size with an alpha channel: fully transparent where the picture
    /// is edited (inpainting). Without it, a picture with transparent pixels is its own mask.
    #[serde(skip)]
    #[schema(value_type = Option<String>, format = Binary)]
    pub mask: Option<String>,
    #[schema(min_length = 1, max_length = 16384)]
    pub prompt: String,
    pub model: Option<String>,
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u64>,
    #[schema(pattern = "^(auto|[0-9]+x[0-9]+)$", max_length = 32)]
    pub size: Option<String>,
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<String>,
    #[schema(value_type = Option<Quality>)]
    pub quality: Option<String>,
    pub user: Option<String>,
    #[schema(max_length = 256)]
    pub safety_identifier: Option<String>,
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u64>,
    #[schema(value_type = Option<Background>)]
    pub background: Option<String>,
    /// `low` or `high`: accepted; `strength` is what decides how much of the picture stays.
    pub input_fidelity: Option<String>,
    pub partial_images: Option<u64>,
    pub stream: Option<bool>,
    /// How much of the schedule is run from the picture, 0..=1 (default 0.8; 1.0 with a mask).
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
    pub seed: Option<u64>,
    #[schema(max_length = 16384)]
    pub negative_prompt: Option<String>,
    #[schema(minimum = 1, maximum = 500)]
    pub steps: Option<u64>,
    #[schema(minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: Option<f64>,
    #[schema(value_type = Option<SchedulerName>)]
    pub scheduler: Option<String>,
    pub ensemble_mode: Option<String>,
    /// `true`, `false`, or the native JSON object as text.
    #[schema(value_type = Option<MapsOption>)]
    pub return_attention_maps: Option<Value>,
    /// As on `/v1/images/generations`: accepted with a warning (no effect).
    pub complexity: Option<String>,
    /// GIF output only: refused.
    pub frame_count: Option<u64>,
    /// GIF output only: refused.
    pub frame_duration_ms: Option<u64>,
    /// SVG output only (`svg[model]`, ...): refused.
    #[schema(value_type = Option<Object>)]
    pub svg: Option<Value>,
}

/// Fields whose text is a number or a boolean in the JSON they stand for.
const NUMBER_FIELDS: [&str; 11] = [
    "frame_count",
    "frame_duration_ms",
    "n",
    "width",
    "height",
    "output_compression",
    "partial_images",
    "seed",
    "steps",
    "guidance_scale",
    "strength",
];

/// The uploaded pictures of a form.
#[derive(Default)]
struct Files {
    images: Vec<Vec<u8>>,
    mask: Option<Vec<u8>>,
}

fn multipart_error(e: MultipartError) -> ApiError {
    let status = e.status();
    if status == axum::http::StatusCode::PAYLOAD_TOO_LARGE {
        ApiError::TooLarge {
            message: format!("the upload is too large: {}", e.body_text()),
            param: None,
        }
    } else {
        ApiError::Invalid {
            message: format!("unreadable multipart form: {}", e.body_text()),
            param: None,
        }
    }
}

/// The JSON value a text field stands for.
fn field_value(name: &str, text: String) -> Result<Value, ApiError> {
    if NUMBER_FIELDS.contains(&name) {
        return serde_json::from_str::<serde_json::Number>(text.trim())
            .map(Value::Number)
            .map_err(|_| ApiError::invalid(name, format!("'{text}' is not a number")));
    }
    match (name, text.trim()) {
        ("stream", "true") => Ok(Value::Bool(true)),
        ("stream", "false") => Ok(Value::Bool(false)),
        ("stream", other) => Err(ApiError::invalid(
            "stream",
            format!("'{other}' is not true or false"),
        )),
        ("return_attention_maps", t) => serde_json::from_str(t).map_err(|_| {
            ApiError::invalid(
                "return_attention_maps",
                "expected true, false or a JSON object",
            )
        }),
        _ => Ok(Value::String(text)),
    }
}

/// A nested field as the official client flattens objects and lists (`a[b]=1`, `a[c][]=2`):
/// the value goes at that path under `base`; leaves that read as JSON numbers or booleans are
/// those, others strings.
fn insert_bracketed(
    fields: &mut Map<String, Value>,
    base: &str,
    rest: &str,
    text: String,
) -> Result<(), ApiError> {
    let bad = || ApiError::invalid(base, format!("malformed form field name '{base}[{rest}'"));
    let inner = rest.strip_suffix(']').ok_or_else(bad)?;
    let segments: Vec<&str> = inner.split("][").collect();
    let leaf = match serde_json::from_str::<Value>(text.trim()) {
        Ok(v @ (Value::Number(_) | Value::Bool(_))) => v,
        _ => Value::String(text),
    };
    let mut slot = fields
        .entry(base.to_string())
        .or_insert_with(|| Value::Object(Map::new()));
    for (k, segment) in segments.iter().enumerate() {
        let last = k + 1 == segments.len();
        if segment.is_empty() {
            if !last {
                return Err(bad());
            }
            if slot.as_object().is_some_and(Map::is_empty) {
                *slot = Value::Array(Vec::new());
            }
            return match slot {
                Value::Array(items) => {
                    items.push(leaf);
                    Ok(())
                }
                _ => Err(bad()),
            };
        }
        let Value::Object(map) = slot else {
            return Err(bad());
        };
        if last {
            map.insert(segment.to_string(), leaf);
            return Ok(());
        }
        slot = map
            .entry(segment.to_string())
            .or_insert_with(|| Value::Object(Map::new()));
    }
    Err(bad())
}

/// The picture fields of a form: OpenAI's (`image`, `image[]`, `mask`) or the native API's
/// (`init_image`, `mask`).
#[derive(Clone, Copy, PartialEq, Eq)]
enum FormKind {
    OpenAiEdit,
    Native,
}

/// Reads the whole form: pictures into `Files`, text fields into a JSON object.
async fn read_form(
    mut form: Multipart,
    kind: FormKind,
) -> Result<(Map<String, Value>, Files), ApiError> {
    let mut fields = Map::new();
    let mut files = Files::default();
    let mut count = 0;
    while let Some(field) = form.next_field().await.map_err(multipart_error)? {
        count += 1;
        if count > MAX_FIELDS {
            return Err(ApiError::invalid(
                "form",
                format!("at most {MAX_FIELDS} form fields"),
            ));
        }
        let name = field.name().unwrap_or_default().to_string();
        let picture = match (kind, name.as_str()) {
            (FormKind::OpenAiEdit, "image" | "image[]") | (FormKind::Native, "init_image") => {
                Some(&mut files.images)
            }
            _ => None,
        };
        if let Some(images) = picture {
            images.push(field.bytes().await.map_err(multipart_error)?.to_vec());
            continue;
        }
        match name.as_str() {
            "mask" if files.mask.is_some() => {
                return Err(ApiError::invalid("mask", "given more than once"));
            }
            "mask" => files.mask = Some(field.bytes().await.map_err(multipart_error)?.to_vec()),
            "markup" if kind == FormKind::OpenAiEdit => {
                return Err(ApiError::invalid(
                    "markup",
                    "markup overlays are not supported; send a mask (transparent where the picture is edited)",
                ));
            }
            _ => {
                let text = field.text().await.map_err(multipart_error)?;
                if text.len() > MAX_TEXT_BYTES {
                    return Err(ApiError::invalid(
                        &name,
                        format!("at most {MAX_TEXT_BYTES} bytes"),
                    ));
                }
                match name.split_once('[') {
                    Some((base, rest)) => insert_bracketed(&mut fields, base, rest, text)?,
                    None if fields.contains_key(&name) => {
                        return Err(ApiError::invalid(&name, "given more than once"));
                    }
                    None => {
                        let value = field_value(&name, text)?;
                        fields.insert(name, value);
                    }
                }
            }
        }
    }
    Ok((fields, files))
}

/// The native request of an edit form (the picture and mask as base64 native fields) and the
/// OpenAI options of the answer.
pub async fn read_edit(form: Multipart) -> Result<(NativeRequest, OpenAiOptions), ApiError> {
    let (fields, files) = read_form(form, FormKind::OpenAiEdit).await?;
    let edit: OpenAiEditForm =
        parse_json(&serde_json::to_vec(&Value::Object(fields)).unwrap_or_default())?;
    let image = match files.images.as_slice() {
        [] => return Err(ApiError::invalid("image", "'image' is required")),
        [one] => one,
        many => {
            return Err(ApiError::invalid(
                "image",
                format!(
                    "one picture per edit (got {}): Stable Diffusion 1.5 redraws one picture; send the others as separate requests",
                    many.len()
                ),
            ));
        }
    };
    if let Some(f) = edit
        .input_fidelity
        .as_deref()
        .filter(|f| !["low", "high"].contains(f))
    {
        return Err(ApiError::invalid(
            "input_fidelity",
            format!("unknown input_fidelity '{f}' (low or high)"),
        ));
    }
    let picture_data = picture(image, "image")?;
    let mask = match &files.mask {
        Some(bytes) => Some(to_native_mask(
            &picture(bytes, "mask")?,
            MaskConvention::TransparentRepaints,
            "mask",
        )),
        None if has_transparent_pixels(&picture_data) => Some(to_native_mask(
            &picture_data,
            MaskConvention::TransparentRepaints,
            "image",
        )),
        None => None,
    }
    .transpose()
    .map_err(|e| ApiError::from_submit(SubmitError::from(e)))?;
    let mask_png = match mask {
        Some(m) => {
            let mut out = std::io::Cursor::new(Vec::new());
            m.write_to(&mut out, image::ImageFormat::Png)
                .map_err(|e| ApiError::Internal(format!("mask re-encoding: {e}")))?;
            Some(B64.encode(out.into_inner()))
        }
        None => None,
    };
    let strength = edit.strength;
    let input_fidelity = edit.input_fidelity.clone();
    let (mut native, mut options) = to_native(edit.into_generation())?;
    native.init_image = Some(B64.encode(image));
    native.mask = mask_png;
    native.strength = strength;
    if input_fidelity.is_some() {
        options.warnings.push(
            "input_fidelity has no effect here; strength decides how much of the picture stays"
                .into(),
        );
    }
    Ok((native, options))
}

/// The native request of a body: JSON, or (`Content-Type: multipart/form-data`) a form whose
/// `init_image` and `mask` are uploaded pictures and whose other fields are the JSON fields as
/// text (numbers and booleans read as such, objects as JSON text or flattened `a[b]` fields).
pub async fn native_request(headers: &HeaderMap, bytes: Bytes) -> Result<NativeRequest, ApiError> {
    let content_type = headers
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    if !content_type
        .to_ascii_lowercase()
        .starts_with("multipart/form-data")
    {
        return parse_json(&bytes);
    }
    let request = axum::http::Request::builder()
        .header(header::CONTENT_TYPE, content_type)
        .body(axum::body::Body::from(bytes))
        .map_err(|e| ApiError::invalid("form", format!("unreadable form: {e}")))?;
    let form = Multipart::from_request(request, &())
        .await
        .map_err(|e| ApiError::Invalid {
            message: format!("unreadable multipart form: {}", e.body_text()),
            param: None,
        })?;
    let (mut fields, files) = read_form(form, FormKind::Native).await?;
    match files.images.as_slice() {
        [] => {}
        [one] => {
            fields.insert("init_image".into(), Value::String(B64.encode(one)));
        }
        _ => return Err(ApiError::invalid("init_image", "given more than once")),
    }
    if let Some(mask) = files.mask {
        fields.insert("mask".into(), Value::String(B64.encode(mask)));
    }
    parse_json(&serde_json::to_vec(&Value::Object(fields)).unwrap_or_default())
}

impl OpenAiEditForm {
    /// The fields an edit shares with a generation.
    fn into_generation(self) -> OpenAiImageRequest {
        OpenAiImageRequest {
            prompt: self.prompt,
            model: self.model,
            n: self.n,
            size: self.size,
            response_format: self.response_format,
            quality: self.quality,
            user: self.user,
            safety_identifier: self.safety_identifier,
            output_format: self.output_format,
            output_compression: self.output_compression,
            background: self.background,
            partial_images: self.partial_images,
            stream: self.stream,
            seed: self.seed,
            negative_prompt: self.negative_prompt,
            steps: self.steps,
            guidance_scale: self.guidance_scale,
            scheduler: self.scheduler,
            ensemble_mode: self.ensemble_mode,
            return_attention_maps: self.return_attention_maps,
            complexity: self.complexity,
            frame_count: self.frame_count,
            frame_duration_ms: self.frame_duration_ms,
            svg: self.svg,
            ..Default::default()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_fields_become_their_json() {
        assert_eq!(field_value("n", "2".into()).unwrap(), Value::from(2));
        assert_eq!(
            field_value("strength", " 0.5".into()).unwrap(),
            Value::from(0.5)
        );
        assert_eq!(
            field_value("stream", "true".into()).unwrap(),
            Value::Bool(true)
        );
        assert_eq!(field_value("prompt", "7".into()).unwrap(), Value::from("7"));
        assert_eq!(
            field_value("return_attention_maps", r#"{"steps": "mean"}"#.into()).unwrap(),
            serde_json::json!({"steps": "mean"})
        );
        let mut fields = Map::new();
        insert_bracketed(
            &mut fields,
            "return_attention_maps",
            "steps]",
            "mean".into(),
        )
        .unwrap();
        insert_bracketed(
            &mut fields,
            "return_attention_maps",
            "blocks][]",
            "3".into(),
        )
        .unwrap();
        insert_bracketed(
            &mut fields,
            "return_attention_maps",
            "blocks][]",
            "5".into(),
        )
        .unwrap();
        assert_eq!(
            Value::Object(fields.clone()),
            serde_json::json!({"return_attention_maps": {"steps": "mean", "blocks": [3, 5]}})
        );
        assert!(insert_bracketed(&mut fields, "x", "a", "1".into()).is_err());
        for (name, text) in [
            ("n", "two"),
            ("stream", "yes"),
            ("return_attention_maps", "{"),
        ] {
            let e = field_value(name, text.into()).unwrap_err();
            assert_eq!(e.body()["error"]["param"], name);
        }
    }
}
