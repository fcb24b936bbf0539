//! The native request (`POST /generate`) and its validation into a `GenerationJob`: defaults
//! from the ensemble's catalog entry, bounds from `Limits`, seeds drawn when absent (image i
//! uses seed + i). Pure functions, unit-tested without a server.
use serde::Deserialize;
use serde_json::Value;
use utoipa::{IntoParams, ToSchema};

use super::error::ApiError;
use super::media::{OutputOptions, parse_output};
use super::request_maps::{map_bytes, parse_maps};
#[allow(unused_imports)]
use super::schema::{MapsOption, OutputFormat, SchedulerName};
use crate::config::parse_size;
use crate::worker::{
    Catalog, EnsembleCatalog, EnsembleMode, GenerationJob, ImageSpec, SchedulerKind, validate_job,
};

/// Body of `POST /generate` (and `POST /generate/stream`, `POST /v1/jobs`). Unknown fields are
/// rejected. Bounds are the server's limits (`/info`); values the ensemble does not serve (a
/// size outside its `allowed_sizes`, a mode it lacks) are refused with 400 naming the field.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
#[schema(example = json!({"prompt": "a lighthouse at dusk", "steps": 10, "seed": 42}))]
pub struct NativeRequest {
    /// Not empty (nor only whitespace); at most 16 KiB (UTF-8 bytes).
    #[schema(min_length = 1, max_length = 16384)]
    pub prompt: String,
    /// At most 16 KiB (UTF-8 bytes).
    #[schema(max_length = 16384)]
    pub negative_prompt: Option<String>,
    /// Ensemble name; the default ensemble when absent.
    pub model: Option<String>,
    /// Images (1..=16, and at most the queue capacity); image i uses seed + i.
    #[schema(minimum = 1, maximum = 16)]
    pub n: Option<u64>,
    /// Pixels, a multiple of 8; width x height at most 1048576 (else 413).
    #[schema(minimum = 64, maximum = 2048, multiple_of = 8)]
    pub width: Option<u64>,
    #[schema(minimum = 64, maximum = 2048, multiple_of = 8)]
    pub height: Option<u64>,
    /// "WxH" or "auto", an alternative to width/height (not both).
    #[schema(pattern = "^(auto|[0-9]+x[0-9]+)$", max_length = 32)]
    pub size: Option<String>,
    /// Drawn (and echoed) when absent.
    pub seed: Option<u64>,
    #[schema(minimum = 1, maximum = 500)]
    pub steps: Option<u64>,
    #[schema(minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: Option<f64>,
    #[schema(value_type = Option<SchedulerName>)]
    pub scheduler: Option<String>,
    /// `afa`, `mean`, `single:<member>`, `merge`, `magicfusion`, as the ensemble offers (`/info`).
    pub ensemble_mode: Option<String>,
    /// false | true | {"steps": "mean"|"all", "blocks": [points], "format": "png"|"f32"|"f16"|[...]}
    #[schema(value_type = Option<MapsOption>)]
    pub return_attention_maps: Option<Value>,
    /// `png` (default, A1111 `parameters` text chunk), `jpeg` or `webp` (lossless); JPEG and
    /// WebP carry the same text as an EXIF UserComment.
    #[schema(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    /// 0-100: the JPEG quality (100, the default, is the best); no effect on PNG and WebP
    /// (both lossless here; a warning says so).
    #[schema(minimum = 0, maximum = 100)]
    pub output_compression: Option<u64>,
    /// 0-3 previews per image while denoising (the predicted clean image at evenly spaced
    /// steps, decoded with the VAE), as `preview` events: needs `stream` on `/generate`; on
    /// `/v1/jobs` they come on `GET /v1/jobs/{id}/events`.
    #[schema(minimum = 0, maximum = 3)]
    pub partial_images: Option<u64>,
    /// Answer with Server-Sent Events (progress, then the result); refused by `/v1/jobs`.
    pub stream: Option<bool>,
    /// Image-to-image: the picture to start from, PNG, JPEG or WebP, base64 (or a `data:` URL),
    /// at most 4096 pixels a side. Resized to the request's size; without a size the request
    /// takes the picture's own (rounded down to a multiple of 8).
    #[schema(max_length = 16777216)]
    pub init_image: Option<String>,
    /// Inpainting: a picture of the init image's size, white where it is repainted, black where
    /// it is kept (grey is thresholded at 50%); base64 or a `data:` URL. Needs `init_image`.
    #[schema(max_length = 16777216)]
    pub mask: Option<String>,
    /// With `init_image`: the fraction of the schedule run from it, 0..=1 (0 returns the
    /// picture's VAE round trip; 1 starts from noise). Default 0.8, or 1.0 with a mask.
    #[schema(minimum = 0.0, maximum = 1.0)]
    pub strength: Option<f64>,
}

/// `GET /generate/stream`'s query: the native fields that fit a query string (maps are on or
/// off). Values are strings unless the field is numeric or boolean. Unknown or repeated
/// parameters are refused.
#[derive(Debug, Clone, Default, PartialEq, Deserialize, IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct NativeQuery {
    #[param(min_length = 1, max_length = 16384)]
    pub prompt: String,
    #[param(max_length = 16384)]
    pub negative_prompt: Option<String>,
    pub model: Option<String>,
    #[param(minimum = 1, maximum = 16)]
    pub n: Option<u64>,
    #[param(minimum = 64, maximum = 2048, multiple_of = 8)]
    pub width: Option<u64>,
    #[param(minimum = 64, maximum = 2048, multiple_of = 8)]
    pub height: Option<u64>,
    #[param(pattern = "^(auto|[0-9]+x[0-9]+)$", max_length = 32)]
    pub size: Option<String>,
    pub seed: Option<u64>,
    #[param(minimum = 1, maximum = 500)]
    pub steps: Option<u64>,
    #[param(minimum = 0.0, maximum = 50.0)]
    pub guidance_scale: Option<f64>,
    #[param(value_type = Option<SchedulerName>)]
    pub scheduler: Option<String>,
    pub ensemble_mode: Option<String>,
    pub return_attention_maps: Option<bool>,
    #[param(value_type = Option<OutputFormat>)]
    pub output_format: Option<String>,
    #[param(minimum = 0, maximum = 100)]
    pub output_compression: Option<u64>,
    #[param(minimum = 0, maximum = 3)]
    pub partial_images: Option<u64>,
    pub stream: Option<bool>,
}

impl From<NativeQuery> for NativeRequest {
    fn from(q: NativeQuery) -> Self {
        NativeRequest {
            prompt: q.prompt,
            negative_prompt: q.negative_prompt,
            model: q.model,
            n: q.n,
            width: q.width,
            height: q.height,
            size: q.size,
            seed: q.seed,
            steps: q.steps,
            guidance_scale: q.guidance_scale,
            scheduler: q.scheduler,
            ensemble_mode: q.ensemble_mode,
            return_attention_maps: q.return_attention_maps.map(Value::Bool),
            output_format: q.output_format,
            output_compression: q.output_compression,
            partial_images: q.partial_images,
            stream: q.stream,
            init_image: None,
            mask: None,
            strength: None,
        }
    }
}

/// How attention maps are encoded (which points are kept is the job's `MapsRequest`).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct MapsOutput {
    pub png: bool,
    pub f32: bool,
    pub f16: bool,
}

/// A request after validation: the job for the worker plus what the response needs.
#[derive(Debug, Clone)]
pub struct Validated {
    pub job: GenerationJob,
    pub guidance_scale: f64,
    /// `None` when maps were not asked for.
    pub maps: Option<MapsOutput>,
    pub stream: bool,
    /// The file format of the images and previews (`job.partial_images` counts the previews).
    pub output: OutputOptions,
}

/// Checks `req` against `catalog`; `drawn_seed` is used when the request has no seed and
/// `queue_capacity` bounds n.
pub fn validate(
    req: &NativeRequest,
    catalog: &Catalog,
    queue_capacity: usize,
    drawn_seed: u64,
) -> Result<Validated, ApiError> {
    let limits = &catalog.limits;
    let name = req.model.as_deref().unwrap_or(&catalog.default_ensemble);
    let entry = catalog
        .ensemble(name)
        .ok_or_else(|| ApiError::unknown_model(name))?;
    if req.prompt.trim().is_empty() {
        return Err(ApiError::invalid("prompt", "prompt must not be empty"));
    }
    let negative = req.negative_prompt.clone().unwrap_or_default();
    let max_n = limits.max_batch.min(queue_capacity.max(1));
    let n = req.n.unwrap_or(1);
    if n == 0 || n > max_n as u64 {
        return Err(ApiError::invalid(
            "n",
            format!("n must be 1..={max_n}, got {n}"),
        ));
    }
    let init = super::init_request::parse(req)?;
    let (width, height, size_field) = match &init {
        Some(init) if req.size.is_none() && req.width.is_none() && req.height.is_none() => {
            init.natural_size(entry)
        }
        _ => resolve_size(req, entry)?,
    };
    let init_image = match &init {
        Some(init) => Some(init.for_size(width, height)?),
        None => None,
    };
    let steps = req.steps.unwrap_or(entry.default_steps as u64);
    let guidance = req.guidance_scale.unwrap_or(entry.default_guidance);
    let scheduler = parse_scheduler(req.scheduler.as_deref(), entry)?;
    let mode = parse_mode(req.ensemble_mode.as_deref(), entry)?;
    let output = parse_output(
        req.output_format.as_deref(),
        req.output_compression,
        req.partial_images,
    )?;
    let (attention_maps, maps) = parse_maps(req.return_attention_maps.as_ref(), entry)?;
    if maps.is_some() && !mode_has_maps(&mode) {
        return Err(ApiError::invalid(
            "return_attention_maps",
            format!(
                "ensemble_mode '{mode}' has no aggregators, so no attention maps; use 'afa' or 'mean'"
            ),
        ));
    }
    let seed = req.seed.unwrap_or(drawn_seed);
    let images = (0..n)
        .map(|i| ImageSpec {
            prompt: req.prompt.clone(),
            negative_prompt: negative.clone(),
            seed: seed.wrapping_add(i),
            guidance_scale: guidance,
            init: init_image.clone(),
        })
        .collect();
    let job = GenerationJob {
        ensemble: entry.name.clone(),
        mode,
        images,
        width,
        height,
        steps: usize::try_from(steps).unwrap_or(usize::MAX),
        scheduler,
        strength: init.as_ref().map(|i| i.strength),
        attention_maps,
        partial_images: output.partial_images,
    };
    // The rules every job obeys (sizes, pixel budget, steps, guidance, prompt lengths, modes,
    // served sizes) live in one place, the worker's validation, used by every entry point.
    validate_job(catalog, &job).map_err(|e| {
        let e = ApiError::from_submit(e);
        match (e, size_field) {
            (ApiError::Invalid { message, param }, Some(size))
                if matches!(param.as_deref(), Some("width" | "height" | "size")) =>
            {
                ApiError::invalid(size, message)
            }
            (ApiError::TooLarge { message, param }, Some(size))
                if matches!(param.as_deref(), Some("width" | "height" | "size")) =>
            {
                ApiError::TooLarge {
                    message,
                    param: Some(size.into()),
                }
            }
            (e, _) => e,
        }
    })?;
    if let Some(out) = &maps {
        let bytes = map_bytes(entry, (width, height, steps as usize), attention_maps, out) * n;
        if bytes > limits.max_map_bytes as u64 {
            return Err(ApiError::TooLarge {
                message: format!(
                    "these attention maps would take about {} MiB; the budget is {} MiB per request \
                     (ask for fewer steps, points, formats or images)",
                    bytes.div_ceil(1 << 20),
                    limits.max_map_bytes >> 20
                ),
                param: Some("return_attention_maps".into()),
            });
        }
    }
    Ok(Validated {
        job,
        guidance_scale: guidance,
        maps,
        stream: req.stream.unwrap_or(false),
        output,
    })
}

fn mode_has_maps(mode: &EnsembleMode) -> bool {
    matches!(mode, EnsembleMode::Afa | EnsembleMode::Mean)
}

/// The requested size (`size` or `width`/`height`, else the ensemble's default) and the field
/// it came from, for errors. Its bounds are checked with the other parameters by
/// `worker::validate_job`.
fn resolve_size(
    req: &NativeRequest,
    entry: &EnsembleCatalog,
) -> Result<(usize, usize, Option<&'static str>), ApiError> {
    let side = |v: u64| usize::try_from(v).unwrap_or(usize::MAX);
    match (&req.size, req.width, req.height) {
        (Some(_), Some(_), _) | (Some(_), _, Some(_)) => Err(ApiError::invalid(
            "size",
            "give either size or width/height, not both",
        )),
        (Some(s), None, None) if s == "auto" => {
            Ok((entry.default_width, entry.default_height, Some("size")))
        }
        (Some(s), None, None) => {
            let (w, h) = parse_size(s).ok_or_else(|| {
                ApiError::invalid(
                    "size",
                    format!("size '{s}' is not WxH (for example 512x512)"),
                )
            })?;
            Ok((w, h, Some("size")))
        }
        (None, w, h) => Ok((
            w.map_or(entry.default_width, side),
            h.map_or(entry.default_height, side),
            None,
        )),
    }
}

fn parse_scheduler(s: Option<&str>, entry: &EnsembleCatalog) -> Result<SchedulerKind, ApiError> {
    let name = s.unwrap_or(&entry.default_scheduler);
    match name.parse::<SchedulerKind>() {
        Ok(k) if entry.schedulers.iter().any(|x| x == name) => Ok(k),
        _ => Err(ApiError::invalid(
            "scheduler",
            format!(
                "unknown scheduler '{name}' (one of: {})",
                entry.schedulers.join(", ")
            ),
        )),
    }
}

/// The mode named (or the ensemble's default); whether this ensemble offers it is part of
/// `worker::validate_job`.
fn parse_mode(s: Option<&str>, entry: &EnsembleCatalog) -> Result<EnsembleMode, ApiError> {
    let name = s.unwrap_or(&entry.default_mode);
    match name.parse::<EnsembleMode>() {
        Ok(m) => Ok(m),
        Err(_) => Err(ApiError::invalid(
            "ensemble_mode",
            format!(
                "unknown ensemble_mode '{name}' for {} (one of: {})",
                entry.name,
                entry.modes.join(", ")
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::worker::{Limits, MapPoints, MapsRequest};

    pub(crate) fn catalog() -> Catalog {
        Catalog {
            ensembles: vec![EnsembleCatalog {
                name: "tiny".into(),
                description: None,
                untrained: true,
                members: vec![("a".into(), "h1".into()), ("b".into(), "h2".into())],
                modes: ["afa", "mean", "single:a", "single:b", "magicfusion"]
                    .map(String::from)
                    .to_vec(),
                schedulers: SchedulerKind::ALL.iter().map(|k| k.to_string()).collect(),
                default_steps: 10,
                default_guidance: 7.5,
                default_scheduler: "ddim".into(),
                default_width: 128,
                default_height: 128,
                default_mode: "afa".into(),
                allowed_sizes: vec![],
                created: 0,
                dtype: "f32".into(),
                map_downscales: vec![
                    1, 1, 1, 2, 2, 2, 4, 4, 4, 8, 8, 8, 8, 8, 8, 4, 4, 4, 2, 2, 2, 1, 1, 1, 1,
                ],
            }],
            default_ensemble: "tiny".into(),
            device: "cpu".into(),
            dtype: "f32".into(),
            limits: Limits::default(),
        }
    }

    fn req(json: serde_json::Value) -> NativeRequest {
        serde_json::from_value(json).unwrap()
    }

    fn param(json: serde_json::Value) -> (u16, Option<String>) {
        let e = validate(&req(json), &catalog(), 64, 7).unwrap_err();
        let p = e.body()["error"]["param"].as_str().map(String::from);
        (e.status().as_u16(), p)
    }

    #[test]
    fn defaults_and_seeds() {
        let v = validate(
            &req(serde_json::json!({"prompt": "a cat", "n": 3})),
            &catalog(),
            64,
            41,
        )
        .unwrap();
        assert_eq!(v.job.ensemble, "tiny");
        assert_eq!((v.job.width, v.job.height, v.job.steps), (128, 128, 10));
        let seeds: Vec<u64> = v.job.images.iter().map(|i| i.seed).collect();
        assert_eq!(seeds, [41, 42, 43]);
        assert_eq!(v.job.attention_maps, MapsRequest::Off);
        let v = validate(
            &req(serde_json::json!({"prompt": "a", "seed": 5, "size": "64x192"})),
            &catalog(),
            64,
            41,
        )
        .unwrap();
        assert_eq!(
            (v.job.images[0].seed, v.job.width, v.job.height),
            (5, 64, 192)
        );
    }

    #[test]
    fn bad_values_name_their_field() {
        use serde_json::json;
        let cases = [
            (json!({"prompt": ""}), 400, "prompt"),
            (
                json!({"prompt": "a", "negative_prompt": "x".repeat(20000)}),
                400,
                "negative_prompt",
            ),
            (json!({"prompt": "a", "n": 0}), 400, "n"),
            (json!({"prompt": "a", "n": 17}), 400, "n"),
            (json!({"prompt": "a", "width": 100}), 400, "width"),
            (json!({"prompt": "a", "height": 8}), 400, "height"),
            (json!({"prompt": "a", "size": "2048x2048"}), 413, "size"),
            (json!({"prompt": "a", "size": "big"}), 400, "size"),
            (
                json!({"prompt": "a", "size": "64x64", "width": 64}),
                400,
                "size",
            ),
            (json!({"prompt": "a", "steps": 0}), 400, "steps"),
            (
                json!({"prompt": "a", "guidance_scale": -1.0}),
                400,
                "guidance_scale",
            ),
            (
                json!({"prompt": "a", "scheduler": "plms"}),
                400,
                "scheduler",
            ),
            (
                json!({"prompt": "a", "ensemble_mode": "merge"}),
                400,
                "ensemble_mode",
            ),
            (json!({"prompt": "a", "model": "nope"}), 404, "model"),
            (
                json!({"prompt": "a", "output_format": "gif"}),
                400,
                "output_format",
            ),
            (
                json!({"prompt": "a", "output_compression": 101}),
                400,
                "output_compression",
            ),
            (
                json!({"prompt": "a", "partial_images": 4}),
                400,
                "partial_images",
            ),
            (
                json!({"prompt": "a", "return_attention_maps": 3}),
                400,
                "return_attention_maps",
            ),
            (
                json!({"prompt": "a", "return_attention_maps": {"x": 1}}),
                400,
                "return_attention_maps.x",
            ),
            (
                json!({"prompt": "a", "return_attention_maps": {"format": ["png", 7]}}),
                400,
                "return_attention_maps.format",
            ),
            (
                json!({"prompt": "a", "return_attention_maps": {"blocks": [0, 25]}}),
                400,
                "return_attention_maps.blocks",
            ),
            (
                json!({"prompt": "a", "ensemble_mode": "single:a", "return_attention_maps": true}),
                400,
                "return_attention_maps",
            ),
        ];
        for (json, status, field) in cases {
            let text = json.to_string();
            assert_eq!(param(json), (status, Some(field.to_string())), "{text}");
        }
        let e = validate(
            &req(serde_json::json!({"prompt": "a", "n": 9})),
            &catalog(),
            8,
            1,
        )
        .unwrap_err();
        assert_eq!(e.status().as_u16(), 400);
    }

    #[test]
    fn attention_maps_are_bounded_by_a_budget() {
        use serde_json::json;
        // The largest request every other limit admits, with every map in every format: 413.
        let huge = json!({"prompt": "a", "n": 16, "steps": 500, "size": "1024x1024",
            "return_attention_maps": {"steps": "all", "format": ["png", "f32", "f16"]}});
        assert_eq!(
            param(huge),
            (413, Some("return_attention_maps".to_string()))
        );
        // The ensemble's default request with maps is served, and so is one point per step.
        for maps in [
            json!(true),
            json!({"steps": "all", "blocks": [12], "format": "f16"}),
        ] {
            let v = validate(
                &req(json!({"prompt": "a", "return_attention_maps": maps})),
                &catalog(),
                64,
                1,
            );
            assert!(v.is_ok(), "{:?}", v.err());
        }
        let v = validate(
            &req(json!({"prompt": "a", "return_attention_maps": {"blocks": [3, 24]}})),
            &catalog(),
            64,
            1,
        )
        .unwrap();
        let points = v.job.attention_maps.points().unwrap();
        assert_eq!(
            points.among(25),
            vec![3, 24],
            "only the asked points are kept"
        );
    }

    #[test]
    fn maps_options_parse() {
        let v = validate(
            &req(serde_json::json!({"prompt": "a", "return_attention_maps": {"steps": "all", "blocks": [0, 2], "format": ["png", "f16"]}})),
            &catalog(),
            64,
            1,
        )
        .unwrap();
        let kept = MapPoints::only(&[0, 2]).unwrap();
        assert_eq!(v.job.attention_maps, MapsRequest::PerStep(kept));
        let m = v.maps.unwrap();
        assert!(m.png && m.f16 && !m.f32);
    }
}
