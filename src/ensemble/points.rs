//! Aggregation points derived generically from a UNet config (`afa-method.md` §2.2): every layer
//! of the staged UNet's plan except the last up layer, whose per-expert outputs go through each
//! expert's own output head before the final noise predictions are aggregated.
use crate::models::unet::{LayerInfo, UNetConfig, UNetLayer, layer_plan};

use super::aggregator::AggregatorConfig;

/// One aggregation point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregationPoint {
    /// Index of the layer in the UNet plan whose output is aggregated.
    pub layer_index: usize,
    pub layer: UNetLayer,
    /// Channels per expert at this point.
    pub channels: usize,
    /// Spatial size is the latent size divided by this.
    pub downscale: usize,
}

/// Whether the plan's layer `i` is aggregated: all but the layer right before the head.
pub fn is_aggregated(plan: &[LayerInfo], i: usize) -> bool {
    !(i + 2 == plan.len() && matches!(plan[i].layer, UNetLayer::Up { .. }))
}

/// The aggregation points of a UNet config, in order.
pub fn aggregation_points(config: &UNetConfig) -> Vec<AggregationPoint> {
    let plan = layer_plan(config);
    (0..plan.len())
        .filter(|&i| is_aggregated(&plan, i))
        .map(|i| AggregationPoint {
            layer_index: i,
            layer: plan[i].layer,
            channels: plan[i].out_channels,
            downscale: plan[i].downscale,
        })
        .collect()
}

/// Aggregator hyper-parameters shared by every point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AggregatorShape {
    pub hidden_size: usize,
    pub num_layers: usize,
    pub num_attn_heads: usize,
    pub norm_num_groups: usize,
}

impl Default for AggregatorShape {
    /// The paper's: D = 128, L = 2 (§8), 8 heads, 32 groups.
    fn default() -> Self {
        Self {
            hidden_size: 128,
            num_layers: 2,
            num_attn_heads: 8,
            norm_num_groups: 32,
        }
    }
}

/// The aggregator configs of an ensemble of `num_experts` members with this UNet config and
/// text width `cross_attn_dim`.
pub fn aggregator_configs(
    config: &UNetConfig,
    num_experts: usize,
    cross_attn_dim: usize,
    shape: AggregatorShape,
) -> Vec<AggregatorConfig> {
    aggregation_points(config)
        .iter()
        .map(|p| AggregatorConfig {
            in_channels: p.channels,
            hidden_size: shape.hidden_size,
            num_experts,
            num_layers: shape.num_layers,
            num_attn_heads: shape.num_attn_heads,
            cross_attn_dim,
            temb_channels: config.temb_channels(),
            norm_num_groups: shape.norm_num_groups,
        })
        .collect()
}
