//! How the HTTP layer's formats meet the job service: a stored row's parameters (the
//! native request, every default resolved) become a worker job again through the same
//! validation as a live request, and a finished job becomes its files (images in the asked
//! `output_format`, attention-map bundles in the API's JSON).
use std::sync::Arc;

use serde_json::{Value, json};

use super::media::image_file;
use super::output::{render_maps, timings_json};
use super::request::{MapsOutput, NativeRequest, Validated, validate};
use crate::jobs::JobCodec;
use crate::store::{ArtifactFile, JobRow};
use crate::telemetry::Metrics;
use crate::worker::{Catalog, Encoding, GenerationJob, JobOutput, legend_text};

/// The stored form of a validated request: every default and the seed resolved, so that
/// validating it again (after a restart) gives the same job and the same images.
pub fn resolved_params(v: &Validated, req: &NativeRequest) -> Value {
    let mut params = super::output::parameters_json(v);
    params["return_attention_maps"] = json!(req.return_attention_maps);
    // The pictures as uploaded: validating again resizes them the same way.
    for (field, value) in [("init_image", &req.init_image), ("mask", &req.mask)] {
        if let Some(value) = value {
            params[field] = json!(value);
        }
    }
    params
}

/// Stored parameters as a client sees them (`GET /v1/jobs/{id}`): pictures are named by
/// their SHA-256 (`init_image_sha256`, `mask_sha256`) instead of repeated.
pub fn public_params(params: &Value) -> Value {
    let mut view = params.clone();
    if let Some(map) = view.as_object_mut() {
        for field in ["init_image", "mask"] {
            if let Some(Value::String(data)) = map.remove(field) {
                map.insert(
                    format!("{field}_sha256"),
                    json!(crate::store::sha256_hex(data.as_bytes())),
                );
            }
        }
    }
    view
}

/// The [`JobCodec`] of the HTTP API.
pub struct HttpJobCodec {
    metrics: Arc<Metrics>,
}

impl HttpJobCodec {
    /// A codec recording finished jobs' stage times in `metrics`.
    pub fn new(metrics: Arc<Metrics>) -> Self {
        Self { metrics }
    }
}

impl JobCodec for HttpJobCodec {
    /// The map encodings asked for, and the image format.
    type Extra = (Option<MapsOutput>, Encoding);

    fn rebuild(
        &self,
        row: &JobRow,
        catalog: &Catalog,
        queue_capacity: usize,
    ) -> Result<(GenerationJob, Self::Extra), String> {
        let req: NativeRequest = serde_json::from_value(row.params.clone())
            .map_err(|e| format!("stored parameters are unreadable: {e}"))?;
        let seed = row.seeds.first().copied().unwrap_or(0);
        let v = validate(&req, catalog, queue_capacity, seed)
            .map_err(|e| format!("the job is no longer valid: {e}"))?;
        Ok((v.job, (v.maps, v.output.encoding)))
    }

    fn files(
        &self,
        output: &JobOutput,
        (maps, encoding): &Self::Extra,
    ) -> Result<Vec<ArtifactFile>, String> {
        artifact_files(output, maps.as_ref(), *encoding)
    }

    fn timings(&self, output: &JobOutput) -> Value {
        timings_json(&output.timings)
    }

    fn finished(&self, output: &JobOutput) {
        super::generate::record_timings(&self.metrics, output);
    }
}

/// One image file per image (kind `png`, `jpeg` or `webp`), plus its attention-map bundle
/// (JSON) when maps were asked for.
fn artifact_files(
    output: &JobOutput,
    maps: Option<&MapsOutput>,
    encoding: Encoding,
) -> Result<Vec<ArtifactFile>, String> {
    let legend = legend_text(&output.experts);
    let mut files = Vec::new();
    for (index, img) in output.images.iter().enumerate() {
        files.push(ArtifactFile {
            index,
            kind: encoding.format.as_str(),
            bytes: image_file(img, encoding)
                .map_err(|e| e.to_string())?
                .into_owned(),
        });
        if let (Some(opts), Some(m)) = (maps, &img.attention_maps) {
            let rendered = render_maps(m, opts, &legend).map_err(|e| e.to_string())?;
            let bundle = super::schema::MapsBundle {
                index,
                seed: img.seed,
                experts: output.experts.clone(),
                attention_maps: rendered,
            };
            files.push(ArtifactFile {
                index,
                kind: "maps",
                bytes: serde_json::to_vec(&bundle).map_err(|e| e.to_string())?,
            });
        }
    }
    Ok(files)
}
