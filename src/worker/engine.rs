//! The engine behind the executor thread: what it serves (`Catalog`) and how it runs one batch.
//! `RegistryEngine` is the real one: every ensemble of `models.toml` loaded and resident.
use std::time::{SystemTime, UNIX_EPOCH};

use candle_core::{DType, Device, Tensor};

use super::contract::{BatchKey, ImageMap, ImageResult, JobError, JobTimings};
use crate::config::{EnsembleEntry, ModelRegistry, Precision, parse_size};
use crate::ensemble::EnsembleMode;
use crate::ensemble::points::aggregation_points;
use crate::loading::ensemble::{EnsembleLoadOptions, LoadedEnsemble, open_declared};
use crate::pipeline::{
    BatchRequest, CollectedMaps, ImageSpec, Limits, Observer, PipelineError, SdPipeline,
};
use crate::schedulers::SchedulerKind;

/// What one ensemble offers clients.
#[derive(Debug, Clone, PartialEq)]
pub struct EnsembleCatalog {
    pub name: String,
    pub description: Option<String>,
    pub untrained: bool,
    /// Member names and weight hashes, in order.
    pub members: Vec<(String, String)>,
    /// Modes this ensemble accepts (`afa`, `mean`, `single:<member>`, `merge`, `magicfusion`).
    pub modes: Vec<String>,
    pub schedulers: Vec<String>,
    pub default_steps: usize,
    pub default_guidance: f64,
    pub default_scheduler: String,
    pub default_width: usize,
    pub default_height: usize,
    pub default_mode: String,
    /// Sizes clients may ask for; empty means any multiple of 8 within the limits.
    pub allowed_sizes: Vec<(usize, usize)>,
    /// Unix seconds when it was loaded (`created` of `/v1/models`).
    pub created: u64,
    /// The precision its weights run in (`f32`, `f16`, `bf16`).
    pub dtype: String,
    /// Per aggregation point, how much smaller than the latent its maps are (empty: the
    /// ensemble has no maps).
    pub map_downscales: Vec<usize>,
}

/// How a device is named in logs, `/info` and `/metrics`: `cpu`, `cuda:0`, `metal:0`.
pub fn device_name(device: &Device) -> String {
    match device.location() {
        candle_core::DeviceLocation::Cpu => "cpu".into(),
        candle_core::DeviceLocation::Cuda { gpu_id } => format!("cuda:{gpu_id}"),
        candle_core::DeviceLocation::Metal { gpu_id } => format!("metal:{gpu_id}"),
    }
}

/// Everything the server offers.
#[derive(Debug, Clone, PartialEq)]
pub struct Catalog {
    pub ensembles: Vec<EnsembleCatalog>,
    pub default_ensemble: String,
    pub device: String,
    pub dtype: String,
    pub limits: Limits,
}

impl Catalog {
    /// The ensemble called `name`.
    pub fn ensemble(&self, name: &str) -> Option<&EnsembleCatalog> {
        self.ensembles.iter().find(|e| e.name == name)
    }
}

/// The result of one batch.
#[derive(Debug, Clone)]
pub struct BatchOutcome {
    /// Per input image, in order; `None` when it was cancelled.
    pub images: Vec<Option<ImageResult>>,
    /// Of this batch (queue time is filled in by the worker).
    pub timings: JobTimings,
    /// Member names (the legend of the maps).
    pub experts: Vec<String>,
}

/// Runs batches. Lives on the executor thread, which owns the models.
pub trait Engine: Send {
    fn catalog(&self) -> Catalog;
    /// Runs one batch of images sharing `key`. `observer` gets progress and is polled for
    /// cancellation (`is_image_cancelled(i)` with i the position in `images`).
    fn run(
        &mut self,
        key: &BatchKey,
        images: &[ImageSpec],
        observer: &mut dyn Observer,
    ) -> Result<BatchOutcome, JobError>;
}

/// All ensembles of a registry, loaded.
pub struct RegistryEngine {
    ensembles: Vec<(EnsembleCatalog, LoadedEnsemble)>,
    catalog: Catalog,
    device: Device,
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn describe(entry: &EnsembleEntry, loaded: &LoadedEnsemble) -> EnsembleCatalog {
    let members: Vec<(String, String)> = loaded
        .ensemble
        .members()
        .iter()
        .map(|m| (m.name.clone(), m.weight_hash.clone()))
        .collect();
    let mut modes = Vec::new();
    if !loaded.ensemble.aggregators().is_empty() {
        modes.push("afa".to_string());
    }
    modes.push("mean".to_string());
    modes.extend(members.iter().map(|(n, _)| format!("single:{n}")));
    if loaded.ensemble.has_merge() {
        modes.push("merge".to_string());
    }
    modes.push("magicfusion".to_string());
    let d = &entry.defaults;
    EnsembleCatalog {
        name: entry.name.clone(),
        description: entry.description.clone(),
        untrained: entry.untrained,
        members,
        modes,
        schedulers: SchedulerKind::ALL.iter().map(|k| k.to_string()).collect(),
        default_steps: d.steps,
        default_guidance: d.guidance_scale,
        default_scheduler: d.scheduler.clone(),
        default_width: d.width,
        default_height: d.height,
        default_mode: d.mode.clone(),
        allowed_sizes: entry
            .allowed_sizes
            .iter()
            .filter_map(|s| parse_size(s))
            .collect(),
        created: now_unix(),
        dtype: dtype_name(loaded.ensemble.members()[0].unet.dtype()),
        map_downscales: aggregation_points(loaded.ensemble.members()[0].unet.config())
            .iter()
            .map(|p| p.downscale)
            .collect(),
    }
}

/// `f32`, `f16`, `bf16`.
pub fn dtype_name(dtype: DType) -> String {
    format!("{dtype:?}").to_lowercase()
}

impl RegistryEngine {
    /// Loads every ensemble of `registry` onto `device`. `dtype` overrides each entry's.
    pub fn load(
        registry: &ModelRegistry,
        device: &Device,
        dtype: Option<DType>,
    ) -> Result<Self, String> {
        let mut ensembles = Vec::new();
        for entry in &registry.ensembles {
            let dtype = dtype.unwrap_or(match entry.dtype {
                Precision::F32 => DType::F32,
                Precision::F16 => DType::F16,
                Precision::Bf16 => DType::BF16,
            });
            crate::models::check_precision(dtype, device)
                .map_err(|e| format!("ensemble '{}': dtype {e}", entry.name))?;
            let options = EnsembleLoadOptions {
                dtype,
                device: device.clone(),
                merge_weights: entry.merge_weights.clone(),
                aggregators: None,
            };
            let loaded = open_declared(registry, entry)
                .and_then(|parts| parts.build(&options))
                .map_err(|e| format!("ensemble '{}': {e}", entry.name))?;
            ensembles.push((describe(entry, &loaded), loaded));
        }
        let default_ensemble = registry
            .ensemble(None)
            .map(|e| e.name.clone())
            .ok_or("models.toml declares no ensemble")?;
        let catalog = Catalog {
            ensembles: ensembles.iter().map(|(c, _)| c.clone()).collect(),
            default_ensemble,
            device: device_name(device),
            dtype: {
                // The precision every ensemble runs in, or "mixed".
                let mut all: Vec<&str> = ensembles.iter().map(|(c, _)| c.dtype.as_str()).collect();
                all.sort_unstable();
                all.dedup();
                match all.as_slice() {
                    [one] => one.to_string(),
                    _ => "mixed".into(),
                }
            },
            limits: Limits::default(),
        };
        Ok(Self {
            ensembles,
            catalog,
            device: device.clone(),
        })
    }
}

impl Engine for RegistryEngine {
    fn catalog(&self) -> Catalog {
        self.catalog.clone()
    }

    fn run(
        &mut self,
        key: &BatchKey,
        images: &[ImageSpec],
        observer: &mut dyn Observer,
    ) -> Result<BatchOutcome, JobError> {
        let (entry, loaded) = self
            .ensembles
            .iter()
            .find(|(c, _)| c.name == key.ensemble)
            .ok_or_else(|| JobError::Invalid {
                field: "model".into(),
                reason: format!("unknown model '{}'", key.ensemble),
            })?;
        let invalid = |field: &str, reason: String| JobError::Invalid {
            field: field.into(),
            reason,
        };
        let mode: EnsembleMode = key
            .mode
            .parse()
            .map_err(|e| invalid("ensemble_mode", format!("{e}")))?;
        let denoiser = loaded
            .ensemble
            .denoiser(&mode)
            .map_err(|e| invalid("ensemble_mode", e.to_string()))?;
        let pipeline = SdPipeline {
            tokenizer: loaded.tokenizer.clone(),
            denoiser,
            vae: loaded.vae.clone(),
            scheduler_config: loaded.scheduler.clone(),
            device: self.device.clone(),
            model_name: key.ensemble.clone(),
            limits: self.catalog.limits,
        };
        let request = BatchRequest {
            images: images.to_vec(),
            width: key.width,
            height: key.height,
            steps: key.steps,
            scheduler: key.scheduler,
            strength: key.strength,
            initial_latents: None,
            attention_maps: key.attention_maps,
        };
        let output = match pipeline.generate(&request, observer) {
            Ok(o) => o,
            Err(PipelineError::Cancelled) => {
                return Ok(BatchOutcome {
                    images: vec![None; images.len()],
                    timings: JobTimings::default(),
                    experts: Vec::new(),
                });
            }
            Err(PipelineError::Invalid { field, reason }) => return Err(invalid(field, reason)),
            Err(e) => return Err(JobError::Failed(e.to_string())),
        };
        let maps = match &output.attention_maps {
            Some(m) => {
                let total = entry.map_downscales.len();
                let points = key.attention_maps.points().unwrap_or_default().among(total);
                Some(
                    per_image_maps(m, &points, output.images.len())
                        .map_err(|e| JobError::Failed(e.to_string()))?,
                )
            }
            None => None,
        };
        let mut results: Vec<Option<ImageResult>> = vec![None; images.len()];
        for (p, image) in output.images.into_iter().enumerate() {
            results[image.index] = Some(ImageResult {
                seed: image.seed,
                raster: crate::pipeline::Raster {
                    width: image.width,
                    height: image.height,
                    rgb: image.rgb,
                    parameters: image.parameters,
                },
                png: image.png,
                warnings: image.warnings,
                attention_maps: maps.as_ref().map(|m| m[p].clone()),
            });
        }
        let t = output.timings;
        Ok(BatchOutcome {
            images: results,
            timings: JobTimings {
                queue: Default::default(),
                text_encode: t.text_encode,
                denoise: t.denoise,
                decode: t.decode,
                png_encode: t.png_encode,
            },
            experts: loaded
                .ensemble
                .members()
                .iter()
                .map(|m| m.name.clone())
                .collect(),
        })
    }
}

/// Splits collected maps (`[2B, N, h, w]` per point) into each running image's conditional
/// maps, in the order of the finished images.
fn per_image_maps(
    maps: &CollectedMaps,
    points: &[usize],
    b: usize,
) -> candle_core::Result<Vec<Vec<ImageMap>>> {
    let mut out: Vec<Vec<ImageMap>> = vec![Vec::new(); b];
    let mut add = |step: Option<usize>, point: usize, t: &Tensor| -> candle_core::Result<()> {
        let (_, n, h, w) = t.dims4()?;
        for (p, maps) in out.iter_mut().enumerate() {
            let values = t
                .get(b + p)?
                .to_dtype(DType::F32)?
                .flatten_all()?
                .to_vec1::<f32>()?;
            maps.push(ImageMap {
                point,
                step,
                shape: [n, h, w],
                values,
            });
        }
        Ok(())
    };
    match maps {
        CollectedMaps::Averaged(kept) => {
            for (t, &k) in kept.iter().zip(points) {
                add(None, k, t)?;
            }
        }
        CollectedMaps::PerStep(steps) => {
            for (s, kept) in steps.iter().enumerate() {
                for (t, &k) in kept.iter().zip(points) {
                    add(Some(s), k, t)?;
                }
            }
        }
    }
    Ok(out)
}

/// Checks a job against the catalog before it is queued, naming the field at fault.
pub fn validate_job(
    catalog: &Catalog,
    job: &super::GenerationJob,
) -> Result<(), super::SubmitError> {
    use super::SubmitError;
    let invalid = |field: &str, reason: String| SubmitError::Invalid {
        field: field.into(),
        reason,
    };
    let entry = catalog
        .ensemble(&job.ensemble)
        .ok_or_else(|| SubmitError::UnknownEnsemble(job.ensemble.clone()))?;
    let mode = job.mode.to_string();
    if !entry.modes.contains(&mode) {
        return Err(invalid(
            "ensemble_mode",
            format!(
                "'{mode}' is not available for {} (available: {})",
                entry.name,
                entry.modes.join(", ")
            ),
        ));
    }
    if !entry.allowed_sizes.is_empty() && !entry.allowed_sizes.contains(&(job.width, job.height)) {
        let sizes: Vec<String> = entry
            .allowed_sizes
            .iter()
            .map(|(w, h)| format!("{w}x{h}"))
            .collect();
        return Err(invalid(
            "size",
            format!(
                "{}x{} is not served by {} (allowed: {})",
                job.width,
                job.height,
                entry.name,
                sizes.join(", ")
            ),
        ));
    }
    let request = BatchRequest {
        images: job.images.clone(),
        width: job.width,
        height: job.height,
        steps: job.steps,
        scheduler: job.scheduler,
        strength: job.strength,
        initial_latents: None,
        attention_maps: job.attention_maps,
    };
    // n may exceed a batch (it is split), so validate each image on its own.
    for image in &job.images {
        let one = BatchRequest {
            images: vec![image.clone()],
            ..request.clone()
        };
        one.validate(&catalog.limits, 8)?;
    }
    if job.images.is_empty() {
        return Err(invalid("n", "at least one image".into()));
    }
    Ok(())
}
