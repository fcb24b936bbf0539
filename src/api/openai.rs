//! The OpenAI-compatible request (`POST /v1/images/generations`) and its conversion into the
//! native request, as a pure function. Our extensions (`seed`, `negative_prompt`, `steps`,
//! `guidance_scale`, `scheduler`, `ensemble_mode`, `return_attention_maps`) are top-level
//! fields, which is where the official client's `extra_body` puts them. Every field of the
//! official API is honoured, accepted with a documented meaning, or refused by name
//! (docs/api.md, "OpenAI-compatible").
use serde::Deserialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::error::ApiError;
use super::request::NativeRequest;
#[allow(unused_imports)]
use super::schema::{
    Background, Complexity, MapsOption, Moderation, OutputFormat, Quality, ResponseFormat,
    SchedulerName, Style,
};
#[allow(unused_imports)]
use super::schema::{ModelList, ModelObject};
use crate::worker::Catalog;

/// Body of `POST /v1/images/generations`. Unknown fields are rejected. The extensions
/// (`seed`, `negative_prompt`, `steps`, ...) are the native fields of the same names.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"model": "tiny-afa", "prompt": "a lighthouse", "seed": 1, "steps": 4}))]
pub struct OpenAiImageRequest {
    /// Not empty (nor only whitespace); at most 16 KiB (UTF-8 bytes).
    #[schema(min_length = 1, max_length = 16384)]
    pub prompt: String,
    pub model: Option<String>,
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u64>,
    /// "WxH" or "auto".
    #[schema(pattern = "^(auto|[0-9]+x[0-9]+)$", max_length = 32)]
    pub size: Option<String>,
    /// "b64_json" (default) or "url" (the images are stored as a job; the answer links them).
    #[schema(value_type = Option<ResponseFormat>)]
    pub response_format: Option<String>,
    #[schema(value_type = Option<Quality>)]
    pub quality: Option<String>,
    #[schema(value_type = Option<Style>)]
    pub style: Option<String>,
    /// Recorded in the log line of the request.
    pub user: Option<String>,
    /// `png` (default), `jpeg` or `webp` (lossless), the A1111 parameters in each file's
    /// metadata.
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// 0-100: the JPEG quality (100, the default, is the best); PNG and WebP are lossless here,
    /// so for them a value below 100 only earns a warning.
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u64>,
    /// `auto` or `opaque` (SD 1.5 images are opaque); `transparent` is refused.
    #[schema(value_type = Option<Background>)]
    pub background: Option<String>,
    /// `auto` or `low`: accepted; no moderation model runs here (filter prompts upstream).
    #[schema(value_type = Option<Moderation>)]
    pub moderation: Option<String>,
    /// The end user's stable id (OpenAI's successor of `user`); recorded in the request's log
    /// line.
    #[schema(max_length = 256)]
    pub safety_identifier: Option<String>,
    /// 0-3 previews per image while streaming (`image_generation.partial_image` events: the
    /// predicted clean image at evenly spaced steps); needs `stream: true`.
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u64>,
    /// Server-Sent Events (`image_generation.progress`, `image_generation.partial_image`,
    /// `image_generation.completed`).
    pub stream: Option<bool>,
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
    #[schema(value_type = Option<MapsOption>)]
    pub return_attention_maps: Option<Value>,
    /// `low`, `medium` or `high`: accepted; no planning stage runs here (a warning says so;
    /// `quality` or `steps` set the work).
    #[schema(value_type = Option<Complexity>)]
    pub complexity: Option<String>,
    /// GIF output only: refused (SD 1.5 draws still images).
    pub frame_count: Option<u64>,
    /// GIF output only: refused.
    pub frame_duration_ms: Option<u64>,
    /// SVG output only: refused (no vector author model here).
    #[schema(value_type = Option<Object>)]
    pub svg: Option<Value>,
}

/// What the OpenAI route needs beyond the native request.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct OpenAiOptions {
    pub stream: bool,
    /// Notes for the response (`style` has no effect on this model family).
    pub warnings: Vec<String>,
    pub user: Option<String>,
    /// `safety_identifier`, logged like `user`.
    pub safety_identifier: Option<String>,
    /// `response_format: "url"`: run as a stored job and answer with links to its images.
    pub url: bool,
    /// The `quality` the client asked for (echoed in stream events), `auto` when absent.
    pub quality: String,
}

const QUALITIES: [&str; 8] = [
    "auto", "standard", "hd", "low", "medium", "high", "xhigh", "max",
];
const COMPLEXITIES: [&str; 3] = ["low", "medium", "high"];
const STYLES: [&str; 2] = ["vivid", "natural"];
const MODERATIONS: [&str; 2] = ["auto", "low"];

/// The denoising steps `quality` stands for when the request gives no `steps`: `low` half the
/// ensemble's default, `auto`/`standard`/`medium` the default, `high`/`hd` twice it, `xhigh`
/// three times, `max` four times (within the server's step limit).
pub fn quality_steps(quality: &str, default_steps: usize, max_steps: usize) -> usize {
    let steps = match quality {
        "low" => default_steps / 2,
        "high" | "hd" => default_steps * 2,
        "xhigh" => default_steps * 3,
        "max" => default_steps * 4,
        _ => default_steps,
    };
    steps.clamp(1, max_steps.max(1))
}

/// `background`, `moderation`, `partial_images` (its range and `output_format`/
/// `output_compression` are the native request's): honoured where this model family can,
/// accepted with their meaning here, or refused by name.
fn check_official_options(req: &OpenAiImageRequest) -> Result<(), ApiError> {
    match req.background.as_deref() {
        None | Some("auto" | "opaque") => {}
        Some("transparent") => {
            return Err(ApiError::invalid(
                "background",
                "background 'transparent' needs an alpha channel, and Stable Diffusion 1.5 draws opaque images; use 'opaque' or 'auto'",
            ));
        }
        Some(other) => {
            return Err(ApiError::invalid(
                "background",
                format!("unknown background '{other}' (auto, opaque or transparent)"),
            ));
        }
    }
    if let Some(m) = req
        .moderation
        .as_deref()
        .filter(|m| !MODERATIONS.contains(m))
    {
        return Err(ApiError::invalid(
            "moderation",
            format!("unknown moderation '{m}' (auto or low)"),
        ));
    }
    for (field, given) in [
        ("frame_count", req.frame_count.is_some()),
        ("frame_duration_ms", req.frame_duration_ms.is_some()),
    ] {
        if given {
            return Err(ApiError::invalid(
                field,
                format!(
                    "{field} is for GIF output, which is not produced here: Stable Diffusion 1.5 draws still images (png, jpeg or webp)"
                ),
            ));
        }
    }
    if req.svg.is_some() {
        return Err(ApiError::invalid(
            "svg",
            "SVG output needs a vector author model, which is not served here; use png, jpeg or webp",
        ));
    }
    if let Some(c) = req
        .complexity
        .as_deref()
        .filter(|c| !COMPLEXITIES.contains(c))
    {
        return Err(ApiError::invalid(
            "complexity",
            format!("unknown complexity '{c}' (low, medium or high)"),
        ));
    }
    match req.partial_images {
        Some(n) if n > 0 && req.stream != Some(true) => Err(ApiError::invalid(
            "partial_images",
            format!("partial_images {n} sends previews as stream events: it needs stream: true"),
        )),
        _ => Ok(()),
    }
}

/// Converts an OpenAI request into the native one. Validation of shared fields happens later,
/// on the native request; here only the OpenAI-only fields are checked.
pub fn to_native(req: OpenAiImageRequest) -> Result<(NativeRequest, OpenAiOptions), ApiError> {
    let url = match req.response_format.as_deref() {
        None | Some("b64_json") => false,
        Some("url") => true,
        Some(other) => {
            return Err(ApiError::invalid(
                "response_format",
                format!("unknown response_format '{other}' (b64_json or url)"),
            ));
        }
    };
    if url && req.stream == Some(true) {
        return Err(ApiError::invalid(
            "response_format",
            "response_format 'url' does not stream; use b64_json with stream, or url without",
        ));
    }
    let mut warnings = Vec::new();
    check_official_options(&req)?;
    if let Some(q) = req.quality.as_deref() {
        if !QUALITIES.contains(&q) {
            return Err(ApiError::invalid(
                "quality",
                format!("unknown quality '{q}' (one of: {})", QUALITIES.join(", ")),
            ));
        }
        if q != "auto" && req.steps.is_some() {
            warnings.push(format!("quality '{q}' has no effect when steps is given"));
        }
    }
    if let Some(c) = req.complexity.as_deref() {
        warnings.push(format!(
            "complexity '{c}' has no effect here (no planning stage); quality or steps set the work"
        ));
    }
    if let Some(s) = req.style.as_deref() {
        if !STYLES.contains(&s) {
            return Err(ApiError::invalid(
                "style",
                format!("unknown style '{s}' (vivid or natural)"),
            ));
        }
        warnings.push(format!(
            "style '{s}' has no effect here; describe the style in the prompt"
        ));
    }
    let native = NativeRequest {
        prompt: req.prompt,
        negative_prompt: req.negative_prompt,
        model: req.model,
        n: req.n,
        width: None,
        height: None,
        size: req.size,
        seed: req.seed,
        steps: req.steps,
        guidance_scale: req.guidance_scale,
        scheduler: req.scheduler,
        ensemble_mode: req.ensemble_mode,
        return_attention_maps: req.return_attention_maps,
        output_format: req.output_format,
        output_compression: req.output_compression,
        partial_images: req.partial_images,
        stream: None,
        init_image: None,
        mask: None,
        strength: None,
    };
    let options = OpenAiOptions {
        stream: req.stream.unwrap_or(false),
        warnings,
        user: req.user,
        safety_identifier: req.safety_identifier,
        url,
        quality: req.quality.unwrap_or_else(|| "auto".into()),
    };
    Ok((native, options))
}

/// `GET /v1/models` body.
pub fn models_list(catalog: &Catalog) -> ModelList {
    let data = catalog
        .ensembles
        .iter()
        .filter_map(|e| model_object(catalog, &e.name))
        .collect();
    ModelList {
        object: "list".into(),
        data,
    }
}

/// One entry of `/v1/models` (`None` for an unknown id).
pub fn model_object(catalog: &Catalog, id: &str) -> Option<ModelObject> {
    catalog.ensemble(id).map(|e| ModelObject {
        id: e.name.clone(),
        object: "model".into(),
        created: e.created,
        owned_by: "afa-server".into(),
        untrained: e.untrained,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(v: Value) -> OpenAiImageRequest {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn extensions_and_size_carry_over() {
        let (n, o) = to_native(parse(json!({
            "prompt": "a fox", "model": "tiny-afa", "n": 2, "size": "128x128",
            "response_format": "b64_json", "seed": 9, "steps": 3, "guidance_scale": 2.0,
            "negative_prompt": "blur", "scheduler": "euler-a", "ensemble_mode": "mean",
            "stream": true, "user": "u1", "quality": "auto"
        })))
        .unwrap();
        assert_eq!(n.prompt, "a fox");
        assert_eq!(n.model.as_deref(), Some("tiny-afa"));
        assert_eq!((n.n, n.seed, n.steps), (Some(2), Some(9), Some(3)));
        assert_eq!(n.size.as_deref(), Some("128x128"));
        assert_eq!(n.guidance_scale, Some(2.0));
        assert_eq!(n.negative_prompt.as_deref(), Some("blur"));
        assert_eq!(n.scheduler.as_deref(), Some("euler-a"));
        assert_eq!(n.ensemble_mode.as_deref(), Some("mean"));
        assert_eq!(n.stream, None);
        assert!(o.stream);
        assert!(o.warnings.is_empty());
        assert_eq!(o.user.as_deref(), Some("u1"));
    }

    #[test]
    fn quality_stands_for_a_step_count() {
        assert_eq!(quality_steps("low", 20, 500), 10);
        assert_eq!(quality_steps("auto", 20, 500), 20);
        assert_eq!(quality_steps("medium", 20, 500), 20);
        assert_eq!(quality_steps("high", 20, 500), 40);
        assert_eq!(quality_steps("hd", 300, 500), 500);
        assert_eq!(quality_steps("xhigh", 20, 500), 60);
        assert_eq!(quality_steps("max", 20, 500), 80);
        assert_eq!(quality_steps("low", 1, 500), 1);
    }

    #[test]
    fn openai_only_fields_are_checked() {
        let err = |v: Value| to_native(parse(v)).unwrap_err().body()["error"]["param"].clone();
        assert_eq!(
            err(json!({"prompt": "a", "response_format": "url", "stream": true})),
            "response_format"
        );
        let (_, o) = to_native(parse(json!({"prompt": "a", "response_format": "url"}))).unwrap();
        assert!(o.url && !o.stream);
        assert_eq!(
            err(json!({"prompt": "a", "response_format": "gif"})),
            "response_format"
        );
        assert_eq!(err(json!({"prompt": "a", "quality": "ultra"})), "quality");
        for (field, value) in [
            ("background", json!("transparent")),
            ("background", json!("sepia")),
            ("moderation", json!("strict")),
            // Previews are stream events: without stream they would be dropped.
            ("partial_images", json!(2)),
            ("frame_count", json!(4)),
            ("frame_duration_ms", json!(100)),
            ("svg", json!({"model": "x"})),
            ("complexity", json!("extreme")),
        ] {
            let mut body = json!({"prompt": "a"});
            body[field] = value.clone();
            assert_eq!(err(body), field, "{field} = {value}");
        }
        let (_, o) = to_native(parse(json!({
            "prompt": "a", "background": "opaque", "moderation": "low", "partial_images": 0,
            "output_compression": 100, "safety_identifier": "user-7"
        })))
        .unwrap();
        assert!(o.warnings.is_empty(), "{:?}", o.warnings);
        assert_eq!(o.safety_identifier.as_deref(), Some("user-7"));
        let (n, o) = to_native(parse(
            json!({"prompt": "a", "stream": true, "partial_images": 2,
            "output_format": "jpeg", "output_compression": 80}),
        ))
        .unwrap();
        assert!(o.stream && o.warnings.is_empty(), "{:?}", o.warnings);
        assert_eq!(n.partial_images, Some(2));
        assert_eq!(n.output_format.as_deref(), Some("jpeg"));
        assert_eq!(n.output_compression, Some(80));
        assert_eq!(err(json!({"prompt": "a", "style": "weird"})), "style");
        let (_, o) = to_native(parse(json!({"prompt": "a", "complexity": "high"}))).unwrap();
        assert!(o.warnings[0].contains("complexity"), "{:?}", o.warnings);
        let (_, o) = to_native(parse(
            json!({"prompt": "a", "quality": "hd", "style": "vivid"}),
        ))
        .unwrap();
        assert_eq!(o.warnings.len(), 1, "style has no effect: {:?}", o.warnings);
        let (_, o) = to_native(parse(json!({"prompt": "a", "quality": "hd", "steps": 3}))).unwrap();
        assert!(
            o.warnings[0].contains("when steps is given"),
            "{:?}",
            o.warnings
        );
    }
}
