//! The staged UNet against diffusers' UNet2DConditionModel on the tiny seeded model
//! (fixtures from scripts/fixtures/unet.py), and the layer plan against the AFA spec.
//! The parity checks honour AFA_TEST_DEVICE / AFA_TEST_DTYPE (tests/common).
mod common;

use std::path::Path;

use afa::loading::diffusers::open_component;
use afa::models::unet::{StagedUNet, UNetConfig, UNetLayer, layer_plan};
use candle_core::{Device, Tensor};
use common::{bound, device, dtype, max_abs_diff, on_test_device};

fn fixture(name: &str) -> Tensor {
    afa::npy::read(Path::new("tests/fixtures/unet").join(name))
        .unwrap()
        .to_tensor(&Device::Cpu)
        .unwrap()
}

/// Timesteps stay f32 (the UNet computes its sinusoidal embedding in f32).
fn on_device(t: &Tensor) -> Tensor {
    t.to_device(&device()).unwrap()
}

fn load_tiny_unet() -> StagedUNet {
    let folder = open_component(Path::new("tests/fixtures/tiny-sd/unet"), "unet", |k| {
        Some(k.to_string())
    })
    .unwrap();
    let config: UNetConfig = serde_json::from_value(folder.config.clone()).unwrap();
    folder
        .weights
        .build(dtype(), &device(), |vb| {
            StagedUNet::new(&config, vb).map_err(|e| candle_core::Error::Msg(e.to_string()))
        })
        .unwrap()
}

#[test]
fn unet_matches_diffusers() {
    let unet = load_tiny_unet();
    for case in ["batch2", "odd"] {
        let sample = on_test_device(&fixture(&format!("{case}_sample.npy")));
        let t = on_device(&fixture(&format!("{case}_timesteps.npy")));
        let context = on_test_device(&fixture(&format!("{case}_context.npy")));
        let expected = fixture(&format!("{case}_out.npy"));
        let out = unet.forward(&sample, &t, &context).unwrap();
        let err = max_abs_diff(&out, &expected);
        println!("{case}: max abs error {err:.3e}");
        assert!(err <= bound(1e-4, 5e-2), "{case}: max abs error {err}");
    }
}

#[test]
fn batch_equals_single() {
    let unet = load_tiny_unet();
    let sample = on_test_device(&fixture("batch2_sample.npy"));
    let t = on_device(&fixture("batch2_timesteps.npy"));
    let context = on_test_device(&fixture("batch2_context.npy"));
    let both = unet.forward(&sample, &t, &context).unwrap();
    for i in 0..2 {
        let one = unet
            .forward(
                &sample.narrow(0, i, 1).unwrap(),
                &t.narrow(0, i, 1).unwrap(),
                &context.narrow(0, i, 1).unwrap(),
            )
            .unwrap();
        let err = max_abs_diff(&one, &both.narrow(0, i, 1).unwrap());
        assert!(err <= bound(1e-5, 1e-2), "sample {i}: {err}");
    }
}

#[test]
fn sd15_plan_has_the_25_aggregation_points_of_the_spec() {
    let plan = layer_plan(&UNetConfig::sd15());
    assert_eq!(plan.len(), 26);
    // Every layer but the last up layer is an aggregation point (§2.2).
    let last_up = plan
        .iter()
        .rposition(|l| matches!(l.layer, UNetLayer::Up { .. }))
        .unwrap();
    let points: Vec<_> = plan
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != last_up)
        .map(|(_, l)| l)
        .collect();
    let channels: Vec<usize> = points.iter().map(|l| l.out_channels).collect();
    assert_eq!(
        channels,
        vec![
            320, 320, 320, 320, 640, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 1280, 1280,
            1280, 1280, 1280, 1280, 640, 640, 640, 320, 320, 4
        ]
    );
    assert_eq!(channels.iter().sum::<usize>(), 21_124);
    let sizes: Vec<usize> = points.iter().map(|l| 64 / l.downscale).collect();
    assert_eq!(
        sizes,
        vec![
            64, 64, 64, 32, 32, 32, 16, 16, 16, 8, 8, 8, 8, 8, 8, 16, 16, 16, 32, 32, 32, 64, 64,
            64, 64
        ]
    );
    assert_eq!(plan.iter().filter(|l| l.pushes_skip).count(), 12);
    assert_eq!(plan.iter().filter(|l| l.pops_skip).count(), 12);
}

#[test]
fn staged_layers_expose_features_between_layers() {
    let unet = load_tiny_unet();
    let sample = on_test_device(&fixture("odd_sample.npy"));
    let t = on_device(&fixture("odd_timesteps.npy"));
    let context = on_test_device(&fixture("odd_context.npy"));
    let temb = unet.time_embedding(&t).unwrap();
    let cond = afa::models::unet::Conditioning {
        temb: &temb,
        context: &context,
    };
    let mut skips = afa::models::unet::SkipStack::default();
    let mut hidden = sample.clone();
    for (i, info) in unet.plan().iter().enumerate() {
        let take = skips.take(info).unwrap();
        let input = afa::models::unet::LayerInput {
            hidden: &hidden,
            skip: take.skip.as_ref(),
            upsample_to: take.upsample_to,
        };
        hidden = unet.run_layer(i, &input, &cond).unwrap();
        assert_eq!(hidden.dim(1).unwrap(), info.out_channels, "layer {i}");
        assert_eq!(
            hidden.dim(2).unwrap(),
            12_usize.div_ceil(info.downscale),
            "layer {i}"
        );
        if info.pushes_skip {
            skips.push(hidden.clone());
        }
    }
    assert!(skips.is_empty());
    let expected = fixture("odd_out.npy");
    assert!(max_abs_diff(&hidden, &expected) <= bound(1e-4, 5e-2));
}
