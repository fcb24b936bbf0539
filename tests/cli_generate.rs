//! `afa generate` as a user runs it: the embedded default, parity through `--latents`/`--dump`,
//! batch file naming, and one clear error line (never a panic) for bad flags and files.
use std::path::{Path, PathBuf};
use std::process::Command;

fn afa() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_afa"));
    c.env("AFA_CACHE_DIR", scratch("cache"));
    c
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("afa-cli-{}-{name}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn embedded_default_writes_a_png_with_parameters() {
    // The embedded demonstration ensemble: a real (if simple) picture, with its parameters.
    let dir = scratch("embedded");
    let out = dir.join("cat.png");
    let run = afa()
        .args([
            "generate",
            "--prompt",
            "a red circle on the left",
            "--seed",
            "7",
            "--steps",
            "10",
            "--quiet",
            "--out",
        ])
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let bytes = std::fs::read(&out).unwrap();
    let reader = png::Decoder::new(std::io::Cursor::new(bytes))
        .read_info()
        .unwrap();
    let info = reader.info();
    assert_eq!((info.width, info.height), (64, 64));
    let text = &info.uncompressed_latin1_text[0];
    assert_eq!(text.keyword, "parameters");
    assert!(text.text.starts_with(
        "a red circle on the left\nSteps: 10, Sampler: DDIM, CFG scale: 7.5, Seed: 7"
    ));
    let img = image::open(&out).unwrap().to_rgb8();
    let verdict = afa::demo::judge(&img);
    assert_eq!(verdict.colour, Some(afa::demo::Colour::Red), "{verdict:?}");
}

#[test]
fn latents_and_dump_reproduce_diffusers() {
    let dir = scratch("parity");
    let fixture = Path::new("tests/fixtures/pipeline/ddim");
    let init = afa::npy::read(fixture.join("latent_init.npy")).unwrap();
    let per_image: usize = init.shape[1..].iter().product();
    let first: Vec<f32> = init.to_f32()[..per_image].to_vec();
    let mut shape = init.shape.clone();
    shape[0] = 1;
    let latents = dir.join("init.npy");
    afa::npy::write_f32(&latents, &shape, &first).unwrap();
    let dump = dir.join("dump");
    let run = afa()
        .args([
            "generate",
            "--model",
            "tests/fixtures/tiny-sd",
            "--prompt",
            "a photo of a cat",
        ])
        .args([
            "--negative-prompt",
            "blurry",
            "--steps",
            "10",
            "--guidance",
            "7.5",
            "--quiet",
        ])
        .args(["--width", "128", "--height", "128", "--scheduler", "ddim"])
        .arg("--latents")
        .arg(&latents)
        .arg("--dump")
        .arg(&dump)
        .arg("--out")
        .arg(dir.join("x.png"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let expected = afa::npy::read(fixture.join("latent_final.npy"))
        .unwrap()
        .to_f32();
    let ours = afa::npy::read(dump.join("latent_final.npy")).unwrap();
    assert_eq!(ours.shape, shape);
    let err = max_abs_diff(&ours.to_f32(), &expected[..per_image]);
    assert!(err <= 1e-3, "final latent off by {err}");
    let tokens = afa::npy::read(dump.join("tokens.npy")).unwrap();
    assert_eq!(tokens.shape, vec![2, 77]);
    for name in [
        "text_emb",
        "timesteps",
        "latent_init",
        "noise_pred_step0",
        "image",
    ] {
        assert!(dump.join(format!("{name}.npy")).is_file(), "{name}");
    }
    let image = afa::npy::read(dump.join("image.npy")).unwrap();
    assert_eq!(image.shape, vec![1, 3, 128, 128]);
}

#[test]
fn batches_get_numbered_files() {
    let dir = scratch("batch");
    let run = afa()
        .args([
            "generate", "--prompt", "x", "--batch", "2", "--steps", "1", "--seed", "1", "--quiet",
            "--out",
        ])
        .arg(dir.join("b.png"))
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(dir.join("b-0.png").is_file() && dir.join("b-1.png").is_file());
}

#[test]
fn bad_input_gives_one_error_line_and_no_panic() {
    let dir = scratch("bad");
    let garbage = dir.join("garbage.safetensors");
    std::fs::write(&garbage, b"not safetensors").unwrap();
    let pickle = dir.join("model.ckpt");
    std::fs::write(&pickle, b"x").unwrap();
    let bad_npy = dir.join("bad.npy");
    std::fs::write(&bad_npy, b"nope").unwrap();
    let cases: Vec<(Vec<String>, &str)> = vec![
        (vec!["--steps".into(), "0".into()], "--steps"),
        (vec!["--width".into(), "100".into()], "--width"),
        (vec!["--guidance".into(), "NaN".into()], "--guidance"),
        (
            vec!["--model".into(), "/definitely/not/here".into()],
            "not/here",
        ),
        (
            vec!["--model".into(), garbage.display().to_string()],
            "safetensors",
        ),
        (
            vec!["--model".into(), pickle.display().to_string()],
            "pickle",
        ),
        (
            vec!["--latents".into(), bad_npy.display().to_string()],
            "bad.npy",
        ),
        (
            vec!["--out".into(), dir.join("x.jpg").display().to_string()],
            ".png",
        ),
        (
            vec!["--model".into(), "tests/fixtures".into()],
            "model_index.json",
        ),
    ];
    for (extra, needle) in cases {
        let run = afa()
            .args(["generate", "--prompt", "x", "--quiet"])
            .args(&extra)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&run.stderr);
        assert!(!run.status.success(), "{extra:?} should fail");
        assert!(!stderr.contains("panicked"), "{extra:?}: {stderr}");
        let error_lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(error_lines.len(), 1, "{extra:?}: {stderr}");
        assert!(error_lines[0].contains(needle), "{extra:?}: {stderr}");
    }
}

/// Runs `afa generate` on the embedded default with `extra` flags, writing `out`.
fn generate_demo(prompt: &str, out: &Path, extra: &[&str]) {
    let run = afa()
        .args([
            "generate", "--prompt", prompt, "--seed", "7", "--steps", "10", "--quiet",
        ])
        .args(extra)
        .arg("--out")
        .arg(out)
        .output()
        .unwrap();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

#[test]
fn init_image_and_mask_from_the_command_line() {
    let dir = scratch("img2img");
    let red = dir.join("red.png");
    generate_demo("a red circle on the left", &red, &[]);
    // Half the schedule from the picture: the prompt's colour, the picture's place.
    let touched = dir.join("touched.png");
    let init = red.to_str().unwrap();
    generate_demo(
        "a blue square on the right",
        &touched,
        &["--init-image", init, "--strength", "0.5"],
    );
    let verdict = afa::demo::judge(&image::open(&touched).unwrap().to_rgb8());
    assert_eq!(verdict.colour, Some(afa::demo::Colour::Blue), "{verdict:?}");
    assert_eq!(
        verdict.position,
        Some(afa::demo::Position::Left),
        "{verdict:?}"
    );
    // A mask that repaints everything at strength 1 is text-to-image, pixel for pixel (the
    // metadata adds the strength).
    let mask = dir.join("white.png");
    image::GrayImage::from_pixel(64, 64, image::Luma([255]))
        .save(&mask)
        .unwrap();
    let (inpainted, text) = (dir.join("inpainted.png"), dir.join("text.png"));
    let prompt = "a blue square on the right";
    generate_demo(
        prompt,
        &inpainted,
        &["--init-image", init, "--mask", mask.to_str().unwrap()],
    );
    generate_demo(prompt, &text, &[]);
    let pixels = |p: &Path| image::open(p).unwrap().to_rgb8().into_raw();
    assert_eq!(pixels(&inpainted), pixels(&text));
    // A mask without an init image is refused by clap, naming the flag.
    let run = afa()
        .args(["generate", "--prompt", "a", "--mask"])
        .arg(&mask)
        .output()
        .unwrap();
    assert!(!run.status.success());
    assert!(String::from_utf8_lossy(&run.stderr).contains("--init-image"));
}
