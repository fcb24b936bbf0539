//! Construction of the staged UNet's layers (diffusers names) and the forward of each kind.
use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use super::{BlockKind, Conditioning, LayerInfo, LayerInput, UNetConfig, UNetLayer};
use crate::models::blocks::{
    Downsample2D, ResnetBlock2D, ResnetSpec, Transformer2D, TransformerSpec, Upsample2D,
};
use crate::models::nn::{self, Conv2d, ConvSpec, GroupNorm};

/// diffusers `UNetMidBlock2DCrossAttn`: resnet, transformer, resnet.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnet_0: ResnetBlock2D,
    attention: Transformer2D,
    resnet_1: ResnetBlock2D,
}

/// A down or up layer: resnet, optional transformer, optional upsampler (last up layer).
#[derive(Debug, Clone)]
pub struct ResnetLayer {
    resnet: ResnetBlock2D,
    attention: Option<Transformer2D>,
    upsampler: Option<Upsample2D>,
}

/// The modules of one layer.
#[derive(Debug, Clone)]
pub enum LayerModule {
    ConvIn(Conv2d),
    Resnet(Box<ResnetLayer>),
    Downsample(Downsample2D),
    Mid(Box<MidBlock>),
    Head { norm: GroupNorm, conv: Conv2d },
}

impl LayerModule {
    /// Runs the layer; see `StagedUNet::run_layer`.
    pub fn forward(
        &self,
        input: &LayerInput,
        cond: &Conditioning,
        center_input: bool,
    ) -> Result<Tensor> {
        match self {
            LayerModule::ConvIn(conv) => {
                if center_input {
                    conv.forward(&((input.hidden * 2.0)? - 1.0)?)
                } else {
                    conv.forward(input.hidden)
                }
            }
            LayerModule::Resnet(layer) => {
                let ResnetLayer {
                    resnet,
                    attention,
                    upsampler,
                } = layer.as_ref();
                let x = match input.skip {
                    Some(skip) => Tensor::cat(&[input.hidden, skip], 1)?,
                    None => input.hidden.clone(),
                };
                let mut h = resnet.forward(&x, Some(cond.temb))?;
                if let Some(attn) = attention {
                    h = attn.forward(&h, cond.context)?;
                }
                if let Some(up) = upsampler {
                    h = up.forward(&h, input.upsample_to)?;
                }
                Ok(h)
            }
            LayerModule::Downsample(down) => down.forward(input.hidden),
            LayerModule::Mid(mid) => {
                let h = mid.resnet_0.forward(input.hidden, Some(cond.temb))?;
                let h = mid.attention.forward(&h, cond.context)?;
                mid.resnet_1.forward(&h, Some(cond.temb))
            }
            LayerModule::Head { norm, conv } => conv.forward(&norm.forward(input.hidden)?.silu()?),
        }
    }
}

/// The layer plan of a UNet config, in execution order (no weights needed).
pub fn layer_plan(cfg: &UNetConfig) -> Vec<LayerInfo> {
    let channels = &cfg.block_out_channels;
    let n = channels.len();
    let info = |layer, out_channels, downscale| LayerInfo {
        layer,
        out_channels,
        downscale,
        pushes_skip: false,
        pops_skip: false,
        upsamples: false,
    };
    let mut plan = vec![LayerInfo {
        pushes_skip: true,
        ..info(UNetLayer::ConvIn, channels[0], 1)
    }];
    let mut downscale = 1;
    for (block, &c) in channels.iter().enumerate() {
        for layer in 0..cfg.layers_per_block {
            plan.push(LayerInfo {
                pushes_skip: true,
                ..info(UNetLayer::Down { block, layer }, c, downscale)
            });
        }
        if block + 1 < n {
            downscale *= 2;
            plan.push(LayerInfo {
                pushes_skip: true,
                ..info(UNetLayer::Downsample { block }, c, downscale)
            });
        }
    }
    plan.push(info(UNetLayer::Mid, channels[n - 1], downscale));
    let layers = cfg.layers_per_block + 1;
    for block in 0..n {
        let c = channels[n - 1 - block];
        for layer in 0..layers {
            let upsamples = layer == layers - 1 && block + 1 < n;
            if upsamples {
                downscale /= 2;
            }
            plan.push(LayerInfo {
                pops_skip: true,
                upsamples,
                ..info(UNetLayer::Up { block, layer }, c, downscale)
            });
        }
    }
    plan.push(info(UNetLayer::Head, cfg.out_channels, 1));
    plan
}

/// Builds the modules of every layer of `plan`.
pub(super) fn build_modules(
    cfg: &UNetConfig,
    plan: &[LayerInfo],
    vb: &VarBuilder,
) -> Result<Vec<LayerModule>> {
    let b = Builder { cfg };
    plan.iter().map(|info| b.module(info, vb)).collect()
}

struct Builder<'a> {
    cfg: &'a UNetConfig,
}

impl Builder<'_> {
    fn resnet_spec(&self, cin: usize, cout: usize) -> ResnetSpec {
        ResnetSpec {
            in_channels: cin,
            out_channels: cout,
            temb_channels: Some(self.cfg.temb_channels()),
            groups: self.cfg.norm_num_groups,
            eps: self.cfg.norm_eps,
            output_scale_factor: 1.0,
        }
    }

    /// Transformer of a block whose per-block settings are at index `i` (of the down order).
    fn transformer(&self, channels: usize, i: usize, vb: VarBuilder) -> Result<Transformer2D> {
        let heads = self.cfg.heads(i);
        Transformer2D::new(
            TransformerSpec {
                channels,
                heads,
                head_dim: channels / heads,
                context_dim: self.cfg.cross_attention_dim,
                layers: self.cfg.transformer_layers_per_block.get(i),
                groups: self.cfg.norm_num_groups,
                linear_projection: self.cfg.use_linear_projection,
            },
            vb,
        )
    }

    fn module(&self, info: &LayerInfo, vb: &VarBuilder) -> Result<LayerModule> {
        let channels = &self.cfg.block_out_channels;
        let n = channels.len();
        let c0 = channels[0];
        Ok(match info.layer {
            UNetLayer::ConvIn => LayerModule::ConvIn(nn::conv2d(
                self.cfg.in_channels,
                c0,
                3,
                ConvSpec::SAME3,
                vb.pp("conv_in"),
            )?),
            UNetLayer::Down { block, layer } => {
                let cout = channels[block];
                let cin = if layer > 0 || block == 0 {
                    cout
                } else {
                    channels[block - 1]
                };
                let bvb = vb.pp(format!("down_blocks.{block}"));
                let resnet = ResnetBlock2D::new(
                    self.resnet_spec(cin, cout),
                    bvb.pp(format!("resnets.{layer}")),
                )?;
                let attention = match self.cfg.down_kind(block) {
                    BlockKind::CrossAttention => Some(self.transformer(
                        cout,
                        block,
                        bvb.pp(format!("attentions.{layer}")),
                    )?),
                    BlockKind::Plain => None,
                };
                LayerModule::Resnet(Box::new(ResnetLayer {
                    resnet,
                    attention,
                    upsampler: None,
                }))
            }
            UNetLayer::Downsample { block } => LayerModule::Downsample(Downsample2D::new(
                channels[block],
                self.cfg.downsample_padding,
                vb.pp(format!("down_blocks.{block}.downsamplers.0")),
            )?),
            UNetLayer::Mid => {
                let c = channels[n - 1];
                let mut spec = self.resnet_spec(c, c);
                spec.output_scale_factor = self.cfg.mid_block_scale_factor;
                let mvb = vb.pp("mid_block");
                LayerModule::Mid(Box::new(MidBlock {
                    resnet_0: ResnetBlock2D::new(spec, mvb.pp("resnets.0"))?,
                    attention: self.transformer(c, n - 1, mvb.pp("attentions.0"))?,
                    resnet_1: ResnetBlock2D::new(spec, mvb.pp("resnets.1"))?,
                }))
            }
            UNetLayer::Up { block, layer } => {
                let down_index = n - 1 - block;
                let out_c = channels[down_index];
                let prev_out = channels[(down_index + 1).min(n - 1)];
                let in_c = channels[down_index.saturating_sub(1)];
                let last = layer == self.cfg.layers_per_block;
                let skip_c = if last { in_c } else { out_c };
                let res_in = if layer == 0 { prev_out } else { out_c };
                let bvb = vb.pp(format!("up_blocks.{block}"));
                let resnet = ResnetBlock2D::new(
                    self.resnet_spec(res_in + skip_c, out_c),
                    bvb.pp(format!("resnets.{layer}")),
                )?;
                let attention = match self.cfg.up_kind(block) {
                    BlockKind::CrossAttention => Some(self.transformer(
                        out_c,
                        down_index,
                        bvb.pp(format!("attentions.{layer}")),
                    )?),
                    BlockKind::Plain => None,
                };
                let upsampler = if info.upsamples {
                    Some(Upsample2D::new(out_c, bvb.pp("upsamplers.0"))?)
                } else {
                    None
                };
                LayerModule::Resnet(Box::new(ResnetLayer {
                    resnet,
                    attention,
                    upsampler,
                }))
            }
            UNetLayer::Head => LayerModule::Head {
                norm: GroupNorm::new(
                    self.cfg.norm_num_groups,
                    c0,
                    self.cfg.norm_eps,
                    vb.pp("conv_norm_out"),
                )?,
                conv: nn::conv2d(
                    c0,
                    self.cfg.out_channels,
                    3,
                    ConvSpec::SAME3,
                    vb.pp("conv_out"),
                )?,
            },
        })
    }
}
