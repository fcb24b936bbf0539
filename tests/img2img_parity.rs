//! Image-to-image and inpainting through `SdPipeline` against diffusers'
//! StableDiffusionImg2ImgPipeline and StableDiffusionInpaintPipeline on the tiny model, from the
//! same initial noise (fixtures from scripts/fixtures/img2img.py), plus the promises diffusers
//! cannot check: strength 0 is the VAE round trip, the known region of an inpainted image is the
//! init image's latents exactly, and an image is the same alone, in a batch, or next to a
//! cancelled one.
mod common;

use std::path::Path;
use std::sync::Arc;

use afa::pipeline::{BatchRequest, ImageSpec, InitImage, SdPipeline, SingleUNet, Strength};
use afa::schedulers::SchedulerKind;
use candle_core::{DType, Device, Tensor};
use common::{CancelFirst, Capture, bound, max_abs_diff};

const FIXTURES: &str = "tests/fixtures/img2img";

fn meta() -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(Path::new(FIXTURES).join("cases.json")).unwrap())
        .unwrap()
}

fn rgb(name: &str) -> Vec<u8> {
    image::open(Path::new(FIXTURES).join(name))
        .unwrap()
        .to_rgb8()
        .into_raw()
}

fn gray(name: &str) -> Vec<u8> {
    image::open(Path::new(FIXTURES).join(name))
        .unwrap()
        .to_luma8()
        .into_raw()
}

fn inits(masked: bool) -> Vec<Arc<InitImage>> {
    (0..2)
        .map(|k| {
            Arc::new(InitImage {
                rgb: rgb(&format!("init{k}.png")),
                mask: masked.then(|| gray(&format!("mask{k}.png"))),
            })
        })
        .collect()
}

/// The fixture batch: two prompts, each with its own init image (and mask when `masked`).
fn request(kind: SchedulerKind, strength: f64, masked: bool, noise: bool) -> BatchRequest {
    let meta = meta();
    let images = inits(masked)
        .into_iter()
        .enumerate()
        .map(|(i, init)| ImageSpec {
            prompt: meta["prompts"][i].as_str().unwrap().into(),
            negative_prompt: meta["negative"][i].as_str().unwrap().into(),
            seed: 100 + i as u64,
            guidance_scale: meta["guidance"].as_f64().unwrap(),
            init: Some(init),
        })
        .collect();
    let size = meta["size"].as_u64().unwrap() as usize;
    BatchRequest {
        images,
        width: size,
        height: size,
        steps: meta["steps"].as_u64().unwrap() as usize,
        scheduler: kind,
        strength: Some(Strength::new(strength).unwrap()),
        initial_latents: noise.then(|| common::npy(Path::new(FIXTURES).join("noise.npy"))),
        attention_maps: afa::pipeline::MapsRequest::Off,
    }
}

fn run(p: &SdPipeline<SingleUNet>, req: &BatchRequest) -> Capture {
    let mut cap = Capture::default();
    p.generate(req, &mut cap).unwrap();
    cap
}

#[test]
fn img2img_and_inpainting_match_diffusers() {
    let p = common::single_pipeline(common::tiny_sd());
    for case in meta()["cases"].as_array().unwrap() {
        let name = case["name"].as_str().unwrap();
        let kind: SchedulerKind = case["scheduler"].as_str().unwrap().parse().unwrap();
        let masked = case["pipeline"] == "inpaint";
        let strength = case["strength"].as_f64().unwrap();
        let cap = run(&p, &request(kind, strength, masked, true));
        let reference = |file: &str| common::npy(Path::new(FIXTURES).join(name).join(file));
        let eps = max_abs_diff(
            &cap.0["noise_pred_step0"],
            &reference("noise_pred_step0.npy"),
        );
        let latent = max_abs_diff(&cap.0["latent_final"], &reference("latent_final.npy"));
        let image = max_abs_diff(
            &cap.0["image"],
            &reference("image.npy").clamp(-1f32, 1f32).unwrap(),
        );
        println!("{name}: eps step 0 {eps:.3e}, final latent {latent:.3e}, image {image:.3e}");
        assert!(
            eps <= bound(1e-4, 2.5e-1),
            "{name}: guided eps off by {eps}"
        );
        assert!(
            latent <= bound(1e-3, 1.0),
            "{name}: final latent off by {latent}"
        );
        assert!(image <= bound(1e-3, 1e-1), "{name}: image off by {image}");
    }
}

/// The init images' scaled latents `[2, 4, 16, 16]` as the pipeline encodes them.
fn init_latents(p: &SdPipeline<SingleUNet>) -> Tensor {
    let rows: Vec<Tensor> = inits(false)
        .iter()
        .map(|init| {
            let pixels: Vec<f32> = init
                .rgb
                .iter()
                .map(|&v| (f32::from(v) / 255.0) * 2.0 - 1.0)
                .collect();
            let x = Tensor::from_vec(pixels, (1, 128, 128, 3), &p.device)
                .unwrap()
                .permute((0, 3, 1, 2))
                .unwrap()
                .contiguous()
                .unwrap()
                .to_dtype(p.vae.dtype())
                .unwrap();
            let z = p.vae.encode(&x).unwrap().mode();
            p.vae
                .scale_latents(&z)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap()
        })
        .collect();
    Tensor::cat(&rows, 0).unwrap()
}

#[test]
fn strength_zero_is_the_vae_round_trip() {
    let p = common::single_pipeline(common::tiny_sd());
    let cap = run(&p, &request(SchedulerKind::Ddim, 0.0, false, false));
    let z = p.vae.unscale_latents(&init_latents(&p)).unwrap();
    let round_trip = p
        .vae
        .decode(&z.to_dtype(p.vae.dtype()).unwrap())
        .unwrap()
        .to_dtype(DType::F32)
        .unwrap()
        .clamp(-1f32, 1f32)
        .unwrap();
    assert_eq!(max_abs_diff(&cap.0["image"], &round_trip), 0.0);
    assert!(!cap.0.contains_key("noise_pred_step0"), "no step may run");
}

#[test]
fn inpainting_keeps_the_known_region_exactly() {
    let p = common::single_pipeline(common::tiny_sd());
    let known = init_latents(&p).to_device(&Device::Cpu).unwrap();
    for (kind, strength) in [
        (SchedulerKind::Ddim, 1.0),
        (SchedulerKind::EulerAncestral, 0.7),
        (SchedulerKind::DpmPp2mKarras, 0.5),
    ] {
        let cap = run(&p, &request(kind, strength, true, false));
        let out = cap.0["latent_final"].to_device(&Device::Cpu).unwrap();
        let (mut kept, mut repainted_changed) = (0, 0);
        for (k, init) in inits(true).iter().enumerate() {
            let mask = init.mask.as_ref().unwrap();
            let a = out.get(k).unwrap().to_vec3::<f32>().unwrap();
            let b = known.get(k).unwrap().to_vec3::<f32>().unwrap();
            for c in 0..4 {
                for i in 0..16 {
                    for j in 0..16 {
                        if mask[i * 8 * 128 + j * 8] < 128 {
                            assert_eq!(a[c][i][j], b[c][i][j], "{kind} image {k} at {c},{i},{j}");
                            kept += 1;
                        } else if a[c][i][j] != b[c][i][j] {
                            repainted_changed += 1;
                        }
                    }
                }
            }
        }
        assert!(
            kept > 0 && repainted_changed > 0,
            "{kind}: {kept} kept, {repainted_changed} changed"
        );
    }
}

#[test]
fn an_init_image_gives_the_same_result_alone_in_a_batch_or_beside_a_cancelled_one() {
    let p = common::single_pipeline(common::tiny_sd());
    for (kind, masked) in [
        (SchedulerKind::EulerAncestral, true),
        (SchedulerKind::DpmPp2m, false),
    ] {
        let req = request(kind, 0.8, masked, false);
        let both = p.generate(&req, &mut ()).unwrap();
        let mut alone = req.clone();
        alone.images.remove(0);
        let one = p.generate(&alone, &mut ()).unwrap();
        assert_eq!(
            both.images[1].png, one.images[0].png,
            "{kind}: batch vs alone"
        );
        let cancelled = p.generate(&req, &mut CancelFirst::after(2)).unwrap();
        assert_eq!(cancelled.images.len(), 1);
        let diff = cancelled.images[0]
            .rgb
            .iter()
            .zip(&one.images[0].rgb)
            .map(|(a, b)| a.abs_diff(*b))
            .max()
            .unwrap();
        assert!(
            diff <= 1,
            "{kind}: beside a cancelled image, pixels differ by {diff}"
        );
    }
}

#[test]
fn inconsistent_batches_name_the_field() {
    let p = common::single_pipeline(common::tiny_sd());
    let field = |req: &BatchRequest| match p.generate(req, &mut ()) {
        Err(afa::pipeline::PipelineError::Invalid { field, .. }) => field,
        other => panic!("{:?}", other.map(|o| o.images.len())),
    };
    let mut req = request(SchedulerKind::Ddim, 0.5, true, false);
    req.strength = None;
    assert_eq!(field(&req), "strength");
    let mut req = request(SchedulerKind::Ddim, 0.5, true, false);
    req.images[1].init = None;
    assert_eq!(field(&req), "init_image");
    let mut req = request(SchedulerKind::Ddim, 0.5, true, false);
    req.images[0].init = Some(Arc::new(InitImage {
        rgb: rgb("init0.png"),
        mask: Some(vec![255; 64 * 64]),
    }));
    assert_eq!(field(&req), "mask");
}

#[test]
fn images_that_share_one_picture_match_images_with_their_own_copy() {
    // The pipeline encodes a shared picture once; that must not change any image.
    let p = common::single_pipeline(common::tiny_sd());
    let mut shared = request(SchedulerKind::Ddim, 0.6, true, false);
    shared.steps = 4;
    let one = shared.images[0].init.clone();
    shared.images[1].init = one.clone();
    let mut copies = shared.clone();
    copies.images[1].init = one.map(|i| Arc::new((*i).clone()));
    let a = p.generate(&shared, &mut ()).unwrap();
    let b = p.generate(&copies, &mut ()).unwrap();
    for (x, y) in a.images.iter().zip(&b.images) {
        assert_eq!(x.png, y.png, "image {}", x.index);
    }
}
