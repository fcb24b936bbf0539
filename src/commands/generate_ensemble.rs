//! `afa generate` with an ensemble: an official AFA folder as `--model`, or
//! `--config models.toml --ensemble NAME`; `--mode` picks AFA or a baseline, `--aggregators`
//! swaps in other aggregators, `--maps DIR` writes the attention maps.
use std::path::Path;

use anyhow::{Context, bail};
use candle_core::{DType, Device, Tensor};

use super::generate::GenerateArgs;
use super::generate::{EnsembleTarget, build_request, generate_and_write};
use crate::config::ModelRegistry;
use crate::ensemble::EnsembleMode;
use crate::loading::ensemble::{EnsembleLoadOptions, LoadedEnsemble, open_declared, open_official};
use crate::pipeline::maps::{heatmap_png, legend_text, maps_index_html};
use crate::pipeline::{CollectedMaps, Limits, SdPipeline};

/// Default size for official folders (SD1.5 members).
const SD15_SIDE: usize = 512;

/// Loads the ensemble, runs the batch, writes images and maps.
pub(super) fn run(
    args: &GenerateArgs,
    target: EnsembleTarget,
    dtype: DType,
    device: &Device,
) -> anyhow::Result<()> {
    let (parts, entry_defaults, name, merge_weights) = match &target {
        EnsembleTarget::Official(dir) => (open_official(dir)?, None, display_name(dir), None),
        EnsembleTarget::Declared { config, name } => {
            let registry = ModelRegistry::load(config)?;
            let entry = registry
                .ensemble(name.as_deref())
                .with_context(|| {
                    format!(
                        "no ensemble '{}' in {}",
                        name.as_deref().unwrap_or("(default)"),
                        config.display()
                    )
                })?
                .clone();
            if entry.untrained {
                eprintln!(
                    "note: ensemble '{}' has untrained weights: its images are noise",
                    entry.name
                );
            }
            let parts = open_declared(&registry, &entry)?;
            (
                parts,
                Some(entry.defaults.clone()),
                entry.name.clone(),
                entry.merge_weights.clone(),
            )
        }
    };
    let mode_text = args
        .mode
        .clone()
        .or_else(|| entry_defaults.as_ref().map(|d| d.mode.clone()))
        .unwrap_or_else(|| "afa".into());
    let mode: EnsembleMode = mode_text
        .parse()
        .map_err(|e| anyhow::anyhow!("invalid --mode: {e}"))?;
    let members = parts.members.len();
    let merge_weights = match (&mode, merge_weights) {
        (EnsembleMode::Merge, None) => Some(vec![1.0; members]),
        (_, w) => w,
    };
    let options = EnsembleLoadOptions {
        dtype,
        device: device.clone(),
        merge_weights,
        aggregators: args.aggregators.clone(),
    };
    let LoadedEnsemble {
        ensemble,
        vae,
        tokenizer,
        scheduler,
        ..
    } = parts.build(&options)?;
    let denoiser = ensemble
        .denoiser(&mode)
        .map_err(|e| anyhow::anyhow!("invalid --mode: {e}"))?;
    let pipeline = SdPipeline {
        tokenizer,
        denoiser,
        vae,
        scheduler_config: scheduler,
        device: device.clone(),
        model_name: format!("{name} ({mode})"),
        limits: Limits::default(),
    };
    let size = entry_defaults
        .as_ref()
        .map(|d| (d.width, d.height))
        .unwrap_or((SD15_SIDE, SD15_SIDE));
    let request = build_request(args, size, device)?;
    let output = generate_and_write(&pipeline, args, request)?;
    if let Some(dir) = &args.maps {
        let names: Vec<String> = ensemble.members().iter().map(|m| m.name.clone()).collect();
        match &output.attention_maps {
            Some(CollectedMaps::PerStep(steps)) => {
                write_maps(dir, steps, output.images.len(), &names)?
            }
            _ => bail!("mode {mode} has no attention maps (they exist for afa and mean)"),
        }
        println!("maps: {}", dir.join("index.html").display());
    }
    Ok(())
}

fn display_name(path: &Path) -> String {
    path.file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_else(|| path.display().to_string())
}

/// Writes, per image, one heat map per aggregation point (conditional half, averaged over the
/// steps) with an `index.html` showing them with the legend, and per point the raw maps of
/// every step as `point_{k}.npy` (`[steps, 2B, N, h, w]`, unconditional half first).
fn write_maps(
    dir: &Path,
    steps: &[Vec<Tensor>],
    images: usize,
    names: &[String],
) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let points = steps.first().map(Vec::len).unwrap_or(0);
    let legend = legend_text(names);
    let mut pages = Vec::new();
    for k in 0..points {
        let per_step: Vec<Tensor> = steps.iter().map(|s| s[k].clone()).collect();
        let stacked = Tensor::stack(&per_step, 0)?;
        crate::npy::write_tensor(dir.join(format!("point_{k:02}.npy")), &stacked)?;
    }
    for i in 0..images {
        let mut files = Vec::new();
        for k in 0..points {
            let per_step: Vec<Tensor> = steps.iter().map(|s| s[k].clone()).collect();
            let averaged = Tensor::stack(&per_step, 0)?.mean(0)?;
            let map = averaged.get(images + i)?;
            let (_, _, w) = map.dims3()?;
            let scale = crate::pipeline::maps::heatmap_scale(w);
            let file = format!("image{i}_point{k:02}.png");
            std::fs::write(dir.join(&file), heatmap_png(&map, scale, &legend)?)?;
            files.push(file);
        }
        let page = format!("image{i}.html");
        let title = format!("Attention maps of image {i} (averaged over steps)");
        std::fs::write(dir.join(&page), maps_index_html(&title, names, &files))?;
        pages.push(page);
    }
    let links: String = pages
        .iter()
        .map(|p| format!("<li><a href=\"{p}\">{p}</a></li>"))
        .collect();
    std::fs::write(
        dir.join("index.html"),
        format!(
            "<!doctype html><meta charset=utf-8><title>attention maps</title><p>{legend}</p><ul>{links}</ul>"
        ),
    )?;
    Ok(())
}
