//! The lockstep ensemble denoiser (`afa-method.md` §2.4): every member runs layer k on the same
//! aggregated input with its own time embedding and text embedding; the aggregator of point k
//! (conditioned on the mean time embedding and the mean text embedding) mixes the N outputs;
//! the aggregated tensor feeds every member's next layer and the shared skip stack. The last up
//! layer is not aggregated: each member applies its own output head and the N noise
//! predictions are aggregated last. Baseline modes reuse the same members.
use std::sync::Arc;

use candle_core::{DType, Tensor};

use super::EnsembleError;
use super::aggregator::{Aggregator, uniform_map, weighted_sum};
use super::magicfusion::{self, MagicFusionConfig};
use super::mode::EnsembleMode;
use super::points::{aggregation_points, is_aggregated};
use crate::models::SingleUNet;
use crate::models::clip::ClipTextModel;
use crate::models::unet::{Conditioning, LayerInput, SkipStack, StagedUNet};

/// Most members an ensemble may have.
pub const MAX_MEMBERS: usize = 8;

/// One expert: its UNet and text encoder (shared between identical members).
#[derive(Debug, Clone)]
pub struct Member {
    pub name: String,
    /// Content hash of the member's weights; identical members share one copy.
    pub weight_hash: String,
    pub unet: Arc<StagedUNet>,
    pub text_encoder: Arc<ClipTextModel>,
}

/// Members, aggregators and the optional merged model of a served ensemble.
#[derive(Debug)]
pub struct Ensemble {
    members: Vec<Member>,
    aggregators: Vec<Aggregator>,
    merged: Option<SingleUNet>,
    /// `first_of[n]`: the first member sharing member n's weights (computed once per layer).
    first_of: Vec<usize>,
}

impl Ensemble {
    /// Checks that the members share one architecture and that the aggregators fit it (one per
    /// aggregation point, with its channel count, N experts, and the members' widths). Without
    /// aggregators only the baseline modes are available.
    pub fn new(
        members: Vec<Member>,
        aggregators: Vec<Aggregator>,
        merged: Option<SingleUNet>,
    ) -> Result<Self, EnsembleError> {
        let invalid = |m: String| Err(EnsembleError::Invalid(m));
        if members.is_empty() || members.len() > MAX_MEMBERS {
            return invalid(format!(
                "an ensemble has 1 to {MAX_MEMBERS} members, got {}",
                members.len()
            ));
        }
        let first = members[0].unet.config();
        for m in &members[1..] {
            let c = m.unet.config();
            if c.block_out_channels != first.block_out_channels
                || c.down_block_types != first.down_block_types
                || c.up_block_types != first.up_block_types
                || c.layers_per_block != first.layers_per_block
                || c.cross_attention_dim != first.cross_attention_dim
            {
                return invalid(format!(
                    "member {} has a different UNet architecture from {}",
                    m.name, members[0].name
                ));
            }
        }
        let points = aggregation_points(first);
        if !aggregators.is_empty() && aggregators.len() != points.len() {
            return invalid(format!(
                "the members' UNet has {} aggregation points but {} aggregators were given",
                points.len(),
                aggregators.len()
            ));
        }
        let text_dim = members[0].text_encoder.config().hidden_size;
        for (k, (a, p)) in aggregators.iter().zip(&points).enumerate() {
            let c = a.config();
            if c.in_channels != p.channels
                || c.num_experts != members.len()
                || c.temb_channels != first.temb_channels()
                || c.cross_attn_dim != text_dim
            {
                return invalid(format!(
                    "aggregator {k} expects {} experts x {} channels (temb {}, text {}), the members give {} x {} (temb {}, text {})",
                    c.num_experts,
                    c.in_channels,
                    c.temb_channels,
                    c.cross_attn_dim,
                    members.len(),
                    p.channels,
                    first.temb_channels(),
                    text_dim
                ));
            }
        }
        let first_of = (0..members.len())
            .map(|n| {
                (0..n)
                    .find(|&j| members[j].weight_hash == members[n].weight_hash)
                    .unwrap_or(n)
            })
            .collect();
        Ok(Self {
            members,
            aggregators,
            merged,
            first_of,
        })
    }

    /// The members, in order.
    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The aggregators, in aggregation-point order.
    pub fn aggregators(&self) -> &[Aggregator] {
        &self.aggregators
    }

    /// Whether the `merge` baseline was built.
    pub fn has_merge(&self) -> bool {
        self.merged.is_some()
    }

    /// A denoiser running this ensemble in `mode`.
    pub fn denoiser<'a>(
        &'a self,
        mode: &EnsembleMode,
    ) -> Result<EnsembleDenoiser<'a>, EnsembleError> {
        let resolved = match mode {
            EnsembleMode::Afa if self.aggregators.is_empty() => {
                return Err(EnsembleError::Invalid(
                    "this ensemble has no trained aggregators; use mode mean, single:<member>, merge or magicfusion".into(),
                ));
            }
            EnsembleMode::Afa => Resolved::Afa { uniform: false },
            EnsembleMode::Mean => Resolved::Afa { uniform: true },
            EnsembleMode::Single(name) => {
                let n = self
                    .members
                    .iter()
                    .position(|m| &m.name == name)
                    .ok_or_else(|| {
                        let names: Vec<&str> =
                            self.members.iter().map(|m| m.name.as_str()).collect();
                        EnsembleError::Invalid(format!(
                            "no member named '{name}' (members: {})",
                            names.join(", ")
                        ))
                    })?;
                Resolved::Single(n)
            }
            EnsembleMode::Merge => {
                if self.merged.is_none() {
                    return Err(EnsembleError::Invalid(
                        "the merge baseline is not enabled for this ensemble".into(),
                    ));
                }
                Resolved::Merge
            }
            EnsembleMode::MagicFusion(cfg) => Resolved::MagicFusion(*cfg),
        };
        Ok(EnsembleDenoiser {
            ensemble: self,
            mode: resolved,
        })
    }
}

#[derive(Debug, Clone, Copy)]
enum Resolved {
    Afa { uniform: bool },
    Single(usize),
    Merge,
    MagicFusion(MagicFusionConfig),
}

/// Text conditioning of an ensemble call.
#[derive(Debug, Clone)]
pub enum EnsembleContext {
    /// Each member's own embedding `[2B, S, D]` and their mean (for the aggregators).
    Experts {
        per_expert: Vec<Tensor>,
        mean: Tensor,
    },
    /// One model's embedding (single member or merge).
    One(Tensor),
}

/// An ensemble bound to a mode; implements the pipeline's `Denoiser`.
#[derive(Debug, Clone, Copy)]
pub struct EnsembleDenoiser<'a> {
    ensemble: &'a Ensemble,
    mode: Resolved,
}

/// Whether the members' calls of one lockstep layer run concurrently: on the CPU, yes. One
/// UNet layer does not keep every core busy (its small and sequential ops leave gaps), and two
/// members side by side fill them: on 2 cores an AFA step for N=2 at 64x64 latents took 10%
/// less time, the uniform lockstep 4.5% less (BENCHMARKS.md, "Members in parallel"). On a GPU
/// the members share one device stream, so they stay sequential (not measured there). Each
/// member's result is the same bits either way: nothing is shared between them.
fn members_in_parallel(device: &candle_core::Device) -> bool {
    device.is_cpu()
}

/// Mean of equally shaped tensors.
fn mean_of(ts: &[Tensor]) -> candle_core::Result<Tensor> {
    Tensor::stack(ts, 0)?.mean(0)
}

impl EnsembleDenoiser<'_> {
    /// Runs `f` once per distinct member (by weight hash) and fans the results out to all.
    /// Concurrently when `parallel` (see [`members_in_parallel`]).
    fn per_member<T: Clone + Send>(
        &self,
        parallel: bool,
        f: impl Fn(usize, &Member) -> candle_core::Result<T> + Sync,
    ) -> candle_core::Result<Vec<T>> {
        let e = self.ensemble;
        if parallel {
            use rayon::prelude::*;
            let distinct: Vec<Option<T>> = (0..e.members.len())
                .into_par_iter()
                .map(|n| {
                    (e.first_of[n] == n)
                        .then(|| f(n, &e.members[n]))
                        .transpose()
                })
                .collect::<candle_core::Result<_>>()?;
            return Ok((0..e.members.len())
                .map(|n| distinct[e.first_of[n]].clone().expect("computed"))
                .collect());
        }
        let mut out: Vec<T> = Vec::with_capacity(e.members.len());
        for (n, m) in e.members.iter().enumerate() {
            let value = if e.first_of[n] < n {
                out[e.first_of[n]].clone()
            } else {
                f(n, m)?
            };
            out.push(value);
        }
        Ok(out)
    }

    /// The lockstep forward of §2.4. `x`: `[2B, C, h, w]`, `t`: `[2B]` -> eps `[2B, C, h, w]`.
    fn lockstep(
        &self,
        x: &Tensor,
        t: &Tensor,
        context: (&[Tensor], &Tensor),
        uniform: bool,
        mut maps: Option<&mut Vec<Tensor>>,
    ) -> candle_core::Result<Tensor> {
        let e = self.ensemble;
        let (per_expert, mean_context) = context;
        let parallel = members_in_parallel(x.device());
        let temb = self.per_member(parallel, |_, m| m.unet.time_embedding(t))?;
        let temb_mean = mean_of(&temb)?;
        let plan = e.members[0].unet.plan();
        let mut hidden: Vec<Tensor> = vec![x.clone(); e.members.len()];
        let mut skips = SkipStack::default();
        let mut k = 0;
        for (i, info) in plan.iter().enumerate() {
            let take = skips.take(info)?;
            let outputs = self.per_member(parallel, |n, m| {
                let input = LayerInput {
                    hidden: &hidden[n],
                    skip: take.skip.as_ref(),
                    upsample_to: take.upsample_to,
                };
                let cond = Conditioning {
                    temb: &temb[n],
                    context: &per_expert[n],
                };
                m.unet.run_layer(i, &input, &cond)
            })?;
            if !is_aggregated(plan, i) {
                hidden = outputs;
                continue;
            }
            let (aggregated, map) = if uniform {
                let map = uniform_map(&outputs)?;
                (weighted_sum(&outputs, &map)?, map)
            } else {
                e.aggregators[k].forward(&outputs, &temb_mean, mean_context)?
            };
            if let Some(maps) = maps.as_deref_mut() {
                maps.push(map.to_dtype(DType::F32)?);
            }
            k += 1;
            if info.pushes_skip {
                skips.push(aggregated.clone());
            }
            hidden = vec![aggregated; e.members.len()];
        }
        Ok(hidden.swap_remove(0))
    }
}

impl EnsembleDenoiser<'_> {
    /// Encodes `ids` (`[2B, T]` u32, unconditional rows first) with the text encoder(s) the mode
    /// needs: each member's own for AFA, mean and MagicFusion (plus their mean), else one.
    pub fn encode(&self, ids: &Tensor) -> Result<EnsembleContext, EnsembleError> {
        let e = self.ensemble;
        Ok(match self.mode {
            Resolved::Single(n) => EnsembleContext::One(e.members[n].text_encoder.forward(ids)?),
            Resolved::Merge => EnsembleContext::One(self.merged()?.text_encoder.forward(ids)?),
            Resolved::Afa { .. } | Resolved::MagicFusion(_) => {
                let per_expert = self.per_member(members_in_parallel(ids.device()), |_, m| {
                    m.text_encoder.forward(ids)
                })?;
                let mean = mean_of(&per_expert)?;
                EnsembleContext::Experts { per_expert, mean }
            }
        })
    }

    fn merged(&self) -> Result<&SingleUNet, EnsembleError> {
        self.ensemble
            .merged
            .as_ref()
            .ok_or_else(|| EnsembleError::Invalid("the merge baseline is not built".into()))
    }

    /// Noise prediction. `x`: `[2B, C, h, w]`, `t`: `[2B]`, `guidance`: `[B, 1, 1, 1]` (used by
    /// MagicFusion, which guides internally and returns `[fused; fused]`) -> `[2B, C, h, w]` f32.
    /// With `maps`, AFA and mean push the 25 expert-weight maps `[2B, N, h, w]`.
    pub fn predict(
        &self,
        x: &Tensor,
        t: &Tensor,
        guidance: &Tensor,
        context: &EnsembleContext,
        maps: Option<&mut Vec<Tensor>>,
    ) -> Result<Tensor, EnsembleError> {
        let e = self.ensemble;
        let x = x.to_dtype(e.members[0].unet.dtype())?;
        let eps = match (self.mode, context) {
            (Resolved::Single(n), EnsembleContext::One(ctx)) => {
                e.members[n].unet.forward(&x, t, ctx)?
            }
            (Resolved::Merge, EnsembleContext::One(ctx)) => {
                self.merged()?.unet.forward(&x, t, ctx)?
            }
            (Resolved::Afa { uniform }, EnsembleContext::Experts { per_expert, mean }) => {
                self.lockstep(&x, t, (per_expert, mean), uniform, maps)?
            }
            (Resolved::MagicFusion(cfg), EnsembleContext::Experts { per_expert, .. }) => {
                let each = self.per_member(members_in_parallel(x.device()), |i, m| {
                    m.unet.forward(&x, t, &per_expert[i])?.to_dtype(DType::F32)
                })?;
                let timestep = t.to_dtype(DType::F64)?.get(0)?.to_scalar::<f64>()?;
                let fused = magicfusion::fuse(&each, guidance, timestep, &cfg)?;
                // [fused; fused], so that the pipeline's guidance step leaves it unchanged.
                Tensor::cat(&[&fused, &fused], 0)?
            }
            _ => {
                return Err(EnsembleError::Invalid(
                    "context does not match the mode".into(),
                ));
            }
        };
        Ok(eps.to_dtype(DType::F32)?)
    }
}
