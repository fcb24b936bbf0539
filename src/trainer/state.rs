//! Checkpoints of a training run and resuming from them.
//!
//! `OUT/checkpoints/step-N/` holds
//! - `aggregators.safetensors`: the aggregators after N optimizer steps, in our aggregator
//!   format with the member stamps (loadable by `afa generate --aggregators` and the server);
//! - `optimizer.safetensors`: AdamW's moments (`aggregator_{k}.<name>.exp_avg[_sq]`) and its
//!   step count;
//! - `state.json`: the step and the settings that decide the data order and every random draw.
//!
//! The data position and the random streams are functions of (seed, step), so the step is the
//! whole "RNG position": a resumed run draws exactly what the uninterrupted run would have.
//! A checkpoint is written to `step-N.tmp/` and renamed, so a crash never leaves half a one.
use std::path::{Path, PathBuf};

use candle_core::Device;
use serde::{Deserialize, Serialize};

use super::adamw::{AdamW, AdamWConfig};
use super::params::AggregatorParams;
use super::{Result, TrainerError};
use crate::loading::aggregators::{AggregatorCheckpoint, MemberStamp, write_aggregator_file};

/// Everything that must not change between a run and its resumption.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunFingerprint {
    pub seed: u64,
    pub batch_size: usize,
    pub grad_accum: usize,
    pub resolution: usize,
    pub train_images: usize,
    pub val_images: usize,
    pub caption_dropout: f64,
    pub cache_latents: bool,
    pub lr: f64,
    pub warmup_steps: u64,
}

/// `state.json` of a checkpoint.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunState {
    /// Optimizer steps taken.
    pub step: u64,
    pub fingerprint: RunFingerprint,
}

/// `OUT/checkpoints`.
pub fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// The newest complete checkpoint under `out`: (step, folder).
pub fn latest_checkpoint(out: &Path) -> Option<(u64, PathBuf)> {
    let entries = std::fs::read_dir(checkpoints_dir(out)).ok()?;
    entries
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            let step: u64 = name.strip_prefix("step-")?.parse().ok()?;
            e.path()
                .join("state.json")
                .is_file()
                .then(|| (step, e.path()))
        })
        .max_by_key(|(s, _)| *s)
}

/// What [`save_checkpoint`] writes.
pub struct CheckpointContents<'a> {
    pub params: &'a AggregatorParams,
    pub optimizer: &'a AdamW,
    pub stamps: &'a [MemberStamp],
    pub state: &'a RunState,
}

fn write_json(path: &Path, value: &impl Serialize) -> Result<()> {
    let text = serde_json::to_string_pretty(value)
        .map_err(|e| TrainerError::Invalid(format!("serialising {}: {e}", path.display())))?;
    std::fs::write(path, text).map_err(|e| TrainerError::io(path, e))
}

/// Writes `OUT/checkpoints/step-N/` (N = `state.step`) atomically; returns the folder.
pub fn save_checkpoint(out: &Path, c: &CheckpointContents) -> Result<PathBuf> {
    let dir = checkpoints_dir(out).join(format!("step-{}", c.state.step));
    let tmp = checkpoints_dir(out).join(format!("step-{}.tmp", c.state.step));
    let _ = std::fs::remove_dir_all(&tmp);
    std::fs::create_dir_all(&tmp).map_err(|e| TrainerError::io(&tmp, e))?;
    write_aggregators(&tmp.join("aggregators.safetensors"), c.params, c.stamps)?;
    c.optimizer
        .save(c.params, &tmp.join("optimizer.safetensors"))?;
    write_json(&tmp.join("state.json"), c.state)?;
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::rename(&tmp, &dir).map_err(|e| TrainerError::io(&dir, e))?;
    Ok(dir)
}

/// Writes the aggregators in our format with the member stamps.
pub fn write_aggregators(
    path: &Path,
    params: &AggregatorParams,
    stamps: &[MemberStamp],
) -> Result<()> {
    write_aggregator_file(path, &params.named_tensors()?, params.configs(), stamps)?;
    Ok(())
}

/// A checkpoint read back: parameters, optimizer and state.
pub struct Resumed {
    pub params: AggregatorParams,
    pub optimizer: AdamW,
    pub state: RunState,
}

/// Reads checkpoint `dir`, checking it against the ensemble (`stamps`, point `channels`) and
/// the run's settings (`fingerprint`).
pub fn load_checkpoint(
    dir: &Path,
    ensemble: (&[MemberStamp], &[usize]),
    fingerprint: &RunFingerprint,
    adamw: AdamWConfig,
    device: &Device,
) -> Result<Resumed> {
    let state_path = dir.join("state.json");
    let text =
        std::fs::read_to_string(&state_path).map_err(|e| TrainerError::io(&state_path, e))?;
    let state: RunState = serde_json::from_str(&text).map_err(|e| TrainerError::Resume {
        path: state_path.clone(),
        reason: e.to_string(),
    })?;
    if &state.fingerprint != fingerprint {
        return Err(TrainerError::Resume {
            path: dir.to_path_buf(),
            reason: format!(
                "the run used different settings: {}",
                fingerprint_diff(&state.fingerprint, fingerprint)
            ),
        });
    }
    let checkpoint = AggregatorCheckpoint::open_file(&dir.join("aggregators.safetensors"))?;
    checkpoint.check_against(ensemble.0, ensemble.1)?;
    let params = AggregatorParams::from_checkpoint(&checkpoint, device)?;
    let optimizer = AdamW::load(&params, adamw, &dir.join("optimizer.safetensors"))?;
    if optimizer.steps() != state.step {
        return Err(TrainerError::Resume {
            path: dir.to_path_buf(),
            reason: format!(
                "optimizer has {} steps, state says {}",
                optimizer.steps(),
                state.step
            ),
        });
    }
    Ok(Resumed {
        params,
        optimizer,
        state,
    })
}

/// "field: was X, now Y" for every differing setting.
fn fingerprint_diff(was: &RunFingerprint, now: &RunFingerprint) -> String {
    let a = serde_json::to_value(was).unwrap_or_default();
    let b = serde_json::to_value(now).unwrap_or_default();
    let mut out = Vec::new();
    if let (Some(a), Some(b)) = (a.as_object(), b.as_object()) {
        for (k, va) in a {
            if b.get(k) != Some(va) {
                out.push(format!(
                    "{k}: was {va}, now {}",
                    b.get(k).cloned().unwrap_or_default()
                ));
            }
        }
    }
    out.join("; ")
}

/// Drops the lines of `log` written after step `step` (a resumed run rewrites them).
pub fn truncate_log(log: &Path, step: u64) -> Result<()> {
    let Ok(text) = std::fs::read_to_string(log) else {
        return Ok(());
    };
    let kept: Vec<&str> = text
        .lines()
        .filter(|l| {
            serde_json::from_str::<serde_json::Value>(l)
                .ok()
                .and_then(|v| v.get("step").and_then(|s| s.as_u64()))
                .is_some_and(|s| s <= step)
        })
        .collect();
    let mut body = kept.join("\n");
    if !body.is_empty() {
        body.push('\n');
    }
    std::fs::write(log, body).map_err(|e| TrainerError::io(log, e))
}
