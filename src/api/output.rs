//! Turning a finished job into response bodies: the native JSON (base64 images in the asked
//! format, seeds, timings,
//! warnings, attention maps as PNG heat maps and/or raw arrays), the OpenAI JSON, and the
//! headers of a bare-PNG answer. Rendering is CPU work: it runs on the bounded encode stage
//! (`render_blocking`), never on the runtime's worker threads.
use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as B64;
use serde_json::Value;

use super::error::ApiError;
use super::media::image_base64;
use super::request::{MapsOutput, Validated};
use super::schema::{
    AttentionMap, ImageItem, NativeResponse, OpenAiImage, OpenAiImagesResponse, Parameters, Timings,
};
use crate::worker::{ImageFormat, ImageMap, JobOutput, JobTimings, legend_text};

fn ms(d: std::time::Duration) -> f64 {
    (d.as_secs_f64() * 1e6).round() / 1e3
}

/// Response renderings (base64, heat maps, map bundles) running at once. One: the encode
/// stage takes at most one core from the executor, which owns the others during a batch.
const ENCODE_THREADS: usize = 1;
static ENCODE_PERMITS: tokio::sync::Semaphore = tokio::sync::Semaphore::const_new(ENCODE_THREADS);

/// Runs `f` (response rendering: base64, heat maps, artifact files) on the bounded encode
/// stage, off the async runtime's worker threads.
pub(super) async fn render_blocking<T, F>(f: F) -> Result<T, ApiError>
where
    T: Send + 'static,
    F: FnOnce() -> Result<T, ApiError> + Send + 'static,
{
    let _permit = ENCODE_PERMITS
        .acquire()
        .await
        .map_err(|e| ApiError::Internal(format!("the encode stage is closed: {e}")))?;
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| ApiError::Internal(format!("rendering the response: {e}")))?
}

/// Per-stage timings in milliseconds.
pub fn timings(t: &JobTimings) -> Timings {
    Timings {
        queue_ms: ms(t.queue),
        text_encode_ms: ms(t.text_encode),
        denoise_ms: ms(t.denoise),
        decode_ms: ms(t.decode),
        png_encode_ms: ms(t.png_encode),
    }
}

/// [`timings`] as JSON (stored with a job).
pub fn timings_json(t: &JobTimings) -> Value {
    serde_json::to_value(timings(t)).unwrap_or_default()
}

/// A `Server-Timing` header value (`queue;dur=1.2, denoise;dur=80.1, ...`).
pub fn server_timing(t: &JobTimings) -> String {
    [
        ("queue", t.queue),
        ("text_encode", t.text_encode),
        ("denoise", t.denoise),
        ("decode", t.decode),
        ("png_encode", t.png_encode),
    ]
    .iter()
    .map(|(n, d)| format!("{n};dur={}", ms(*d)))
    .collect::<Vec<_>>()
    .join(", ")
}

/// The parameters the job ran with (echoed so a client can reproduce it).
pub fn parameters(v: &Validated) -> Parameters {
    let j = &v.job;
    let first = &j.images[0];
    Parameters {
        prompt: first.prompt.clone(),
        negative_prompt: first.negative_prompt.clone(),
        model: j.ensemble.clone(),
        ensemble_mode: j.mode.to_string(),
        n: j.images.len(),
        width: j.width,
        height: j.height,
        steps: j.steps,
        guidance_scale: v.guidance_scale,
        scheduler: j.scheduler.as_str().into(),
        seed: first.seed,
        strength: j.strength.map(|s| s.value()),
        return_attention_maps: None,
        output_format: (v.output.encoding.format != ImageFormat::Png)
            .then(|| v.output.encoding.format.as_str().to_string()),
        output_compression: v
            .output
            .compression_given
            .then_some(u64::from(v.output.encoding.quality)),
        partial_images: (j.partial_images > 0).then_some(j.partial_images as u64),
    }
}

/// [`parameters`] as JSON.
pub fn parameters_json(v: &Validated) -> Value {
    serde_json::to_value(parameters(v)).unwrap_or_default()
}

/// Warnings of all images, without repeats, after `extra`.
pub fn warnings(output: &JobOutput, extra: &[String]) -> Vec<String> {
    let mut out: Vec<String> = Vec::new();
    for w in extra {
        if !out.contains(w) {
            out.push(w.clone());
        }
    }
    for w in output.images.iter().flat_map(|i| &i.warnings) {
        if !out.contains(w) {
            out.push(w.clone());
        }
    }
    out
}

/// The native JSON answer.
pub fn native_json(
    output: &JobOutput,
    v: &Validated,
    request_id: &str,
    extra_warnings: &[String],
) -> Result<NativeResponse, ApiError> {
    let legend = legend_text(&output.experts);
    let images = output
        .images
        .iter()
        .enumerate()
        .map(|(index, img)| {
            let attention_maps = match (&v.maps, &img.attention_maps) {
                (Some(opts), Some(maps)) => Some(render_maps(maps, opts, &legend)?),
                _ => None,
            };
            let format = v.output.encoding.format;
            let b64 = image_base64(img, v.output.encoding)?;
            let png = format == ImageFormat::Png;
            Ok(ImageItem {
                index,
                seed: img.seed,
                png_base64: png.then(|| b64.clone()),
                image_base64: (!png).then_some(b64),
                output_format: format.as_str().into(),
                content_type: format.content_type().into(),
                warnings: img.warnings.clone(),
                attention_maps,
            })
        })
        .collect::<Result<Vec<_>, ApiError>>()?;
    Ok(NativeResponse {
        id: request_id.to_string(),
        created: unix_now(),
        model: v.job.ensemble.clone(),
        images,
        seeds: output.images.iter().map(|i| i.seed).collect(),
        experts: output.experts.clone(),
        parameters: parameters(v),
        timings: timings(&output.timings),
        warnings: warnings(output, &[&v.output.warnings[..], extra_warnings].concat()),
    })
}

/// The OpenAI JSON answer (`data[i].b64_json`, plus harmless extra keys).
pub fn openai_json(
    output: &JobOutput,
    v: &Validated,
    extra_warnings: &[String],
) -> Result<OpenAiImagesResponse, ApiError> {
    let data = output
        .images
        .iter()
        .map(|img| {
            Ok(OpenAiImage {
                b64_json: Some(image_base64(img, v.output.encoding)?),
                url: None,
                seed: img.seed,
            })
        })
        .collect::<Result<_, ApiError>>()?;
    Ok(OpenAiImagesResponse {
        created: unix_now(),
        data,
        job_id: None,
        model: v.job.ensemble.clone(),
        output_format: v.output.encoding.format.as_str().into(),
        size: format!("{}x{}", v.job.width, v.job.height),
        timings: timings_json(&output.timings),
        warnings: warnings(output, &[&v.output.warnings[..], extra_warnings].concat()),
    })
}

/// The maps of one image: point, step, shape, and the asked-for encodings.
pub(super) fn render_maps(
    maps: &[ImageMap],
    opts: &MapsOutput,
    legend: &str,
) -> Result<Vec<AttentionMap>, ApiError> {
    let internal = |e: String| ApiError::Internal(format!("rendering attention maps: {e}"));
    maps.iter()
        .map(|m| {
            let mut o = AttentionMap {
                point: m.point,
                step: m.step,
                shape: m.shape.to_vec(),
                heatmap_png_base64: None,
                f32_base64: None,
                f16_base64: None,
            };
            if opts.png {
                let png = m.heatmap_png(legend).map_err(internal)?;
                o.heatmap_png_base64 = Some(B64.encode(png));
            }
            if opts.f32 {
                let bytes: Vec<u8> = m.values.iter().flat_map(|x| x.to_le_bytes()).collect();
                o.f32_base64 = Some(B64.encode(bytes));
            }
            if opts.f16 {
                let bytes: Vec<u8> = m
                    .values
                    .iter()
                    .flat_map(|x| half::f16::from_f32(*x).to_le_bytes())
                    .collect();
                o.f16_base64 = Some(B64.encode(bytes));
            }
            Ok(o)
        })
        .collect()
}

/// Unix seconds now.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn maps_render_in_every_format() {
        let map = ImageMap {
            point: 3,
            step: None,
            shape: [2, 2, 2],
            values: vec![1.0, 0.0, 0.5, 0.25, 0.0, 1.0, 0.5, 0.75],
        };
        let opts = MapsOutput {
            png: true,
            f32: true,
            f16: true,
        };
        let out = render_maps(std::slice::from_ref(&map), &opts, "a, b").unwrap();
        assert_eq!(out[0].shape, [2, 2, 2]);
        let png = B64
            .decode(out[0].heatmap_png_base64.as_deref().unwrap())
            .unwrap();
        assert_eq!(&png[1..4], b"PNG");
        assert_eq!(
            B64.decode(out[0].f32_base64.as_deref().unwrap())
                .unwrap()
                .len(),
            32
        );
        assert_eq!(
            B64.decode(out[0].f16_base64.as_deref().unwrap())
                .unwrap()
                .len(),
            16
        );
    }

    #[test]
    fn server_timing_lists_stages() {
        let t = JobTimings {
            denoise: Duration::from_millis(12),
            ..Default::default()
        };
        assert!(server_timing(&t).contains("denoise;dur=12"));
    }
}
