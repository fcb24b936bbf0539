//! Unit tests of the original-key → diffusers-name table, one case per SD1.5 block type.
use super::*;

fn mapped(key: &str) -> (Component, String, KeyTransform) {
    match map_key(key, &SingleFileLayout::sd15()) {
        MapResult::Mapped(m) => (m.component, m.name, m.transform),
        other => panic!("{key}: {other:?}"),
    }
}

fn check(component: Component, cases: &[(&str, &str)]) {
    for (key, want) in cases {
        let (c, name, t) = mapped(key);
        assert_eq!(
            (c, name.as_str(), t),
            (component, *want, KeyTransform::None),
            "{key}"
        );
    }
}

#[test]
fn unet_input_blocks() {
    let p = "model.diffusion_model.input_blocks";
    let cases = [
        (format!("{p}.0.0.weight"), "conv_in.weight"),
        (
            format!("{p}.1.0.in_layers.0.weight"),
            "down_blocks.0.resnets.0.norm1.weight",
        ),
        (
            format!("{p}.1.0.in_layers.2.bias"),
            "down_blocks.0.resnets.0.conv1.bias",
        ),
        (
            format!("{p}.1.0.emb_layers.1.weight"),
            "down_blocks.0.resnets.0.time_emb_proj.weight",
        ),
        (
            format!("{p}.1.0.out_layers.0.bias"),
            "down_blocks.0.resnets.0.norm2.bias",
        ),
        (
            format!("{p}.1.0.out_layers.3.weight"),
            "down_blocks.0.resnets.0.conv2.weight",
        ),
        (
            format!("{p}.1.1.norm.weight"),
            "down_blocks.0.attentions.0.norm.weight",
        ),
        (
            format!("{p}.2.1.proj_in.weight"),
            "down_blocks.0.attentions.1.proj_in.weight",
        ),
        (
            format!("{p}.3.0.op.weight"),
            "down_blocks.0.downsamplers.0.conv.weight",
        ),
        (
            format!("{p}.4.0.skip_connection.weight"),
            "down_blocks.1.resnets.0.conv_shortcut.weight",
        ),
        (
            format!("{p}.5.1.proj_out.bias"),
            "down_blocks.1.attentions.1.proj_out.bias",
        ),
        (
            format!("{p}.6.0.op.bias"),
            "down_blocks.1.downsamplers.0.conv.bias",
        ),
        (
            format!("{p}.7.1.transformer_blocks.0.attn1.to_q.weight"),
            "down_blocks.2.attentions.0.transformer_blocks.0.attn1.to_q.weight",
        ),
        (
            format!("{p}.8.1.transformer_blocks.0.ff.net.0.proj.bias"),
            "down_blocks.2.attentions.1.transformer_blocks.0.ff.net.0.proj.bias",
        ),
        (
            format!("{p}.9.0.op.weight"),
            "down_blocks.2.downsamplers.0.conv.weight",
        ),
        (
            format!("{p}.10.0.in_layers.0.bias"),
            "down_blocks.3.resnets.0.norm1.bias",
        ),
        (
            format!("{p}.11.0.out_layers.3.bias"),
            "down_blocks.3.resnets.1.conv2.bias",
        ),
    ];
    let cases: Vec<(&str, &str)> = cases.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    check(Component::Unet, &cases);
}

#[test]
fn unet_middle_output_and_top_level() {
    let p = "model.diffusion_model";
    let cases = [
        (
            format!("{p}.time_embed.0.weight"),
            "time_embedding.linear_1.weight",
        ),
        (
            format!("{p}.time_embed.2.bias"),
            "time_embedding.linear_2.bias",
        ),
        (format!("{p}.out.0.weight"), "conv_norm_out.weight"),
        (format!("{p}.out.2.bias"), "conv_out.bias"),
        (
            format!("{p}.middle_block.0.in_layers.2.weight"),
            "mid_block.resnets.0.conv1.weight",
        ),
        (
            format!("{p}.middle_block.1.transformer_blocks.0.attn2.to_k.weight"),
            "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
        ),
        (
            format!("{p}.middle_block.2.emb_layers.1.bias"),
            "mid_block.resnets.1.time_emb_proj.bias",
        ),
        (
            format!("{p}.output_blocks.0.0.skip_connection.bias"),
            "up_blocks.0.resnets.0.conv_shortcut.bias",
        ),
        (
            format!("{p}.output_blocks.2.0.in_layers.0.weight"),
            "up_blocks.0.resnets.2.norm1.weight",
        ),
        (
            format!("{p}.output_blocks.2.1.conv.weight"),
            "up_blocks.0.upsamplers.0.conv.weight",
        ),
        (
            format!("{p}.output_blocks.3.1.norm.bias"),
            "up_blocks.1.attentions.0.norm.bias",
        ),
        (
            format!("{p}.output_blocks.5.2.conv.bias"),
            "up_blocks.1.upsamplers.0.conv.bias",
        ),
        (
            format!("{p}.output_blocks.7.1.transformer_blocks.0.norm3.weight"),
            "up_blocks.2.attentions.1.transformer_blocks.0.norm3.weight",
        ),
        (
            format!("{p}.output_blocks.8.2.conv.weight"),
            "up_blocks.2.upsamplers.0.conv.weight",
        ),
        (
            format!("{p}.output_blocks.9.0.out_layers.3.weight"),
            "up_blocks.3.resnets.0.conv2.weight",
        ),
        (
            format!("{p}.output_blocks.11.1.proj_out.weight"),
            "up_blocks.3.attentions.2.proj_out.weight",
        ),
    ];
    let cases: Vec<(&str, &str)> = cases.iter().map(|(k, v)| (k.as_str(), *v)).collect();
    check(Component::Unet, &cases);
}

#[test]
fn unet_keys_outside_the_layout_are_unknown() {
    let layout = SingleFileLayout::sd15();
    for key in [
        "model.diffusion_model.input_blocks.12.0.in_layers.0.weight",
        "model.diffusion_model.input_blocks.10.1.norm.weight",
        "model.diffusion_model.input_blocks.11.0.op.weight",
        "model.diffusion_model.output_blocks.12.0.in_layers.0.weight",
        "model.diffusion_model.output_blocks.1.1.conv.weight",
        "model.diffusion_model.output_blocks.11.2.conv.weight",
        "model.diffusion_model.output_blocks.0.1.norm.weight",
        "model.diffusion_model.middle_block.3.in_layers.0.weight",
        "model.diffusion_model.input_blocks.1.0.in_layers.1.weight",
        "model.diffusion_model.out.1.weight",
    ] {
        assert_eq!(map_key(key, &layout), MapResult::Unknown, "{key}");
    }
}

#[test]
fn vae_encoder_decoder_and_attention() {
    check(
        Component::Vae,
        &[
            (
                "first_stage_model.encoder.conv_in.weight",
                "encoder.conv_in.weight",
            ),
            (
                "first_stage_model.encoder.down.0.block.1.norm1.bias",
                "encoder.down_blocks.0.resnets.1.norm1.bias",
            ),
            (
                "first_stage_model.encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "first_stage_model.encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "first_stage_model.encoder.mid.block_1.conv2.weight",
                "encoder.mid_block.resnets.0.conv2.weight",
            ),
            (
                "first_stage_model.encoder.mid.attn_1.norm.weight",
                "encoder.mid_block.attentions.0.group_norm.weight",
            ),
            (
                "first_stage_model.encoder.mid.attn_1.q.bias",
                "encoder.mid_block.attentions.0.to_q.bias",
            ),
            (
                "first_stage_model.encoder.norm_out.bias",
                "encoder.conv_norm_out.bias",
            ),
            ("first_stage_model.quant_conv.weight", "quant_conv.weight"),
            (
                "first_stage_model.post_quant_conv.bias",
                "post_quant_conv.bias",
            ),
            (
                "first_stage_model.decoder.mid.block_2.norm2.weight",
                "decoder.mid_block.resnets.1.norm2.weight",
            ),
            (
                "first_stage_model.decoder.up.0.block.2.conv1.weight",
                "decoder.up_blocks.3.resnets.2.conv1.weight",
            ),
            (
                "first_stage_model.decoder.up.1.block.0.nin_shortcut.bias",
                "decoder.up_blocks.2.resnets.0.conv_shortcut.bias",
            ),
            (
                "first_stage_model.decoder.up.3.upsample.conv.weight",
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "first_stage_model.decoder.up.1.upsample.conv.bias",
                "decoder.up_blocks.2.upsamplers.0.conv.bias",
            ),
            (
                "first_stage_model.decoder.conv_out.weight",
                "decoder.conv_out.weight",
            ),
        ],
    );
    let squeeze = KeyTransform::SqueezeConv1x1ToLinear;
    for (key, want) in [
        (
            "first_stage_model.encoder.mid.attn_1.k.weight",
            "encoder.mid_block.attentions.0.to_k.weight",
        ),
        (
            "first_stage_model.decoder.mid.attn_1.v.weight",
            "decoder.mid_block.attentions.0.to_v.weight",
        ),
        (
            "first_stage_model.decoder.mid.attn_1.proj_out.weight",
            "decoder.mid_block.attentions.0.to_out.0.weight",
        ),
    ] {
        assert_eq!(
            mapped(key),
            (Component::Vae, want.to_string(), squeeze),
            "{key}"
        );
    }
    let layout = SingleFileLayout::sd15();
    for key in [
        "first_stage_model.decoder.up.0.upsample.conv.weight",
        "first_stage_model.encoder.down.3.downsample.conv.weight",
        "first_stage_model.encoder.down.0.block.2.conv1.weight",
        "first_stage_model.decoder.up.4.block.0.conv1.weight",
        "first_stage_model.decoder.down.0.block.0.conv1.weight",
    ] {
        assert_eq!(map_key(key, &layout), MapResult::Unknown, "{key}");
    }
}

#[test]
fn clip_with_and_without_text_model() {
    let want = "text_model.encoder.layers.0.self_attn.q_proj.weight";
    check(
        Component::TextEncoder,
        &[
            (
                "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight",
                want,
            ),
            (
                "cond_stage_model.transformer.encoder.layers.0.self_attn.q_proj.weight",
                want,
            ),
            (
                "cond_stage_model.transformer.text_model.embeddings.token_embedding.weight",
                "text_model.embeddings.token_embedding.weight",
            ),
            (
                "cond_stage_model.transformer.text_model.final_layer_norm.bias",
                "text_model.final_layer_norm.bias",
            ),
        ],
    );
}

#[test]
fn ignored_and_unknown_keys() {
    let layout = SingleFileLayout::sd15();
    for key in [
        "alphas_cumprod",
        "betas",
        "log_one_minus_alphas_cumprod",
        "lvlb_weights",
        "model_ema.decay",
        "model_ema.num_updates",
        "model_ema.diffusion_modelinput_blocks00weight",
        "cond_stage_model.transformer.text_model.embeddings.position_ids",
        "cond_stage_model.transformer.embeddings.position_ids",
    ] {
        assert_eq!(map_key(key, &layout), MapResult::Ignored, "{key}");
    }
    for key in [
        "conditioner.embedders.0.transformer.x",
        "model.diffusion_model.foo.weight",
        "first_stage_model.x",
    ] {
        assert_eq!(map_key(key, &layout), MapResult::Unknown, "{key}");
    }
}

#[test]
fn normalizes_diffusers_variants() {
    let n = normalize_diffusers_name;
    assert_eq!(
        n(Component::TextEncoder, "encoder.layers.1.mlp.fc1.bias"),
        "text_model.encoder.layers.1.mlp.fc1.bias"
    );
    assert_eq!(
        n(Component::TextEncoder, "final_layer_norm.weight"),
        "text_model.final_layer_norm.weight"
    );
    assert_eq!(
        n(Component::TextEncoder, "text_model.final_layer_norm.weight"),
        "text_model.final_layer_norm.weight"
    );
    assert_eq!(
        n(
            Component::Vae,
            "decoder.mid_block.attentions.0.query.weight"
        ),
        "decoder.mid_block.attentions.0.to_q.weight"
    );
    assert_eq!(
        n(Component::Vae, "encoder.mid_block.attentions.0.value.bias"),
        "encoder.mid_block.attentions.0.to_v.bias"
    );
    assert_eq!(
        n(
            Component::Vae,
            "encoder.mid_block.attentions.0.proj_attn.weight"
        ),
        "encoder.mid_block.attentions.0.to_out.0.weight"
    );
    assert_eq!(
        n(
            Component::Vae,
            "encoder.mid_block.attentions.0.group_norm.weight"
        ),
        "encoder.mid_block.attentions.0.group_norm.weight"
    );
    assert_eq!(n(Component::Unet, "conv_in.weight"), "conv_in.weight");
}

#[test]
fn squeeze_transform_shapes() {
    let t = KeyTransform::SqueezeConv1x1ToLinear;
    assert_eq!(t.output_shape(&[8, 8, 1, 1]), Some(vec![8, 8]));
    assert_eq!(t.output_shape(&[8, 8]), Some(vec![8, 8]));
    assert_eq!(t.output_shape(&[8, 8, 3, 3]), None);
    let x = Tensor::zeros(
        (4, 4, 1, 1),
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    assert_eq!(t.apply(x).unwrap().dims(), &[4, 4]);
}

#[test]
fn layout_from_configs_matches_sd15() {
    let down = [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ];
    let up = [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ];
    let layout = SingleFileLayout::from_configs(&down, &up, 2, 4, 2);
    assert_eq!(layout, SingleFileLayout::sd15());
    assert!(!layout.down_blocks[3].has_resampler && layout.down_blocks[2].has_resampler);
    assert!(!layout.up_blocks[0].has_attention && !layout.up_blocks[3].has_resampler);
}
