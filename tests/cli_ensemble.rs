//! `afa generate` on ensembles and `afa convert`, as a user runs them.
mod common;

use std::path::Path;
use std::process::{Command, Output};

use common::{legacy_folder, max_abs_diff, npy, official_folder, scratch};

fn afa(args: &[&str]) -> Output {
    let out = Command::new(env!("CARGO_BIN_EXE_afa"))
        .args(args)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stderr.contains("panicked"), "{stderr}");
    out
}

fn ok(args: &[&str]) -> Output {
    let out = afa(args);
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// `afa generate --model FOLDER` with the reference's prompt and initial noise; compares the
/// dumps with fixture ensemble `tag`'s reference and returns the image's pixels.
fn official_folder_matches_reference(folder: &Path, tag: &str) -> Vec<u8> {
    let n = if tag == "n2" { 2 } else { 3 };
    let dir = scratch("cli-official");
    let dump = dir.join("dump");
    let reference = Path::new("tests/fixtures/afa").join(tag).join("reference");
    ok(&[
        "generate",
        "--model",
        s(folder),
        "--prompt",
        "a photo of a cat",
        "--negative-prompt",
        "blurry",
        "--steps",
        "10",
        "--width",
        "128",
        "--height",
        "128",
        "--quiet",
        "--latents",
        s(&reference.join("latent_init.npy")),
        "--dump",
        s(&dump),
        "--out",
        s(&dir.join("x.png")),
    ]);
    for k in [0, 12, 24] {
        let name = format!("attention_maps_step0_{k}.npy");
        assert!(
            max_abs_diff(&npy(dump.join(&name)), &npy(reference.join(&name))) <= 1e-4,
            "{name}"
        );
    }
    let names = (0..n)
        .map(|e| format!("text_emb_e{e}.npy"))
        .chain(["text_emb_mean.npy".to_string()]);
    for name in names {
        assert!(
            max_abs_diff(&npy(dump.join(&name)), &npy(reference.join(&name))) <= 1e-4,
            "{name}"
        );
    }
    let eps = max_abs_diff(
        &npy(dump.join("noise_pred_step0.npy")),
        &npy(reference.join("noise_pred_step0.npy")),
    );
    assert!(eps <= 1e-3, "{eps}");
    let lat = max_abs_diff(
        &npy(dump.join("latent_final.npy")),
        &npy(reference.join("latent_final.npy")),
    );
    assert!(lat <= 1e-3, "{lat}");
    image::open(dir.join("x.png")).unwrap().to_rgb8().into_raw()
}

#[test]
fn the_official_layout_reproduces_the_reference_through_the_cli_for_n2_and_n3() {
    for tag in ["n2", "n3"] {
        let folder = official_folder(tag);
        // As `save_pretrained` wrote it: expert i >= 1 in additional_unet_{i-1}, none at N-1.
        let n = if tag == "n2" { 2 } else { 3 };
        assert!(folder.join(format!("additional_unet_{}", n - 2)).is_dir());
        assert!(!folder.join(format!("additional_unet_{}", n - 1)).exists());
        official_folder_matches_reference(&folder, tag);
    }
}

#[test]
fn our_earlier_layout_still_loads_with_a_warning() {
    let official = official_folder_matches_reference(&official_folder("n3"), "n3");
    let legacy = legacy_folder("n3");
    assert!(
        legacy.join("additional_unet_2").is_dir() && !legacy.join("additional_unet_0").exists()
    );
    assert_eq!(official_folder_matches_reference(&legacy, "n3"), official);
    let out = afa(&[
        "generate",
        "--model",
        s(&legacy),
        "--prompt",
        "x",
        "--steps",
        "1",
        "--width",
        "128",
        "--height",
        "128",
        "--quiet",
        "--out",
        s(&scratch("legacy").join("y.png")),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success() && stderr.contains("earlier layout"),
        "{stderr}"
    );
}

#[test]
fn declared_ensemble_writes_maps_and_every_mode_runs() {
    let dir = scratch("cli-maps");
    let maps = dir.join("maps");
    ok(&[
        "generate",
        "--config",
        "tests/fixtures/tiny-models.toml",
        "--prompt",
        "a cat",
        "--steps",
        "2",
        "--seed",
        "1",
        "--quiet",
        "--maps",
        s(&maps),
        "--out",
        s(&dir.join("a.png")),
    ]);
    assert!(maps.join("index.html").is_file() && maps.join("image0.html").is_file());
    for k in 0..25 {
        assert!(
            maps.join(format!("image0_point{k:02}.png")).is_file(),
            "point {k}"
        );
    }
    let raw = afa::npy::read(maps.join("point_00.npy")).unwrap();
    assert_eq!(raw.shape, vec![2, 2, 2, 16, 16]);
    for mode in ["mean", "single:tiny-a", "merge", "magicfusion"] {
        ok(&[
            "generate",
            "--config",
            "tests/fixtures/tiny-models.toml",
            "--mode",
            mode,
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--quiet",
            "--out",
            s(&dir.join("m.png")),
        ]);
    }
    let bad = afa(&[
        "generate",
        "--config",
        "tests/fixtures/tiny-models.toml",
        "--mode",
        "single:nobody",
        "--prompt",
        "x",
        "--quiet",
    ]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("tiny-a"));
    // A single model has no maps (with no --model at all, the embedded ensemble runs).
    let no_maps = afa(&[
        "generate",
        "--model",
        "tests/fixtures/tiny-sd",
        "--prompt",
        "x",
        "--maps",
        s(&dir.join("m")),
        "--quiet",
    ]);
    assert!(String::from_utf8_lossy(&no_maps.stderr).contains("need an ensemble"));
}

#[test]
fn convert_round_trips_and_refuses_foreign_members() {
    let folder = official_folder("n2");
    let dir = scratch("cli-convert");
    let file = dir.join("aggs.safetensors");
    ok(&["convert", "--from", s(&folder), "--to", s(&file)]);
    let back = dir.join("back");
    ok(&["convert", "--from", s(&file), "--to", s(&back)]);
    for k in [0, 24] {
        let a = afa::loading::aggregators::AggregatorCheckpoint::open_official(&folder).unwrap();
        let b = afa::loading::aggregators::AggregatorCheckpoint::open_official(&back).unwrap();
        assert_eq!(a.configs, b.configs);
        for ((na, ta), (nb, tb)) in a
            .tensors(k)
            .unwrap()
            .iter()
            .zip(b.tensors(k).unwrap().iter())
        {
            assert_eq!(na, nb);
            assert_eq!(max_abs_diff(ta, tb), 0.0);
        }
    }
    // The file carries the members' stamps: using it with the declared members (same weights)
    // gives the same image as the official folder.
    let run = |extra: &[&str], out: &Path| {
        let mut args = vec![
            "generate",
            "--prompt",
            "a cat",
            "--steps",
            "2",
            "--seed",
            "4",
            "--quiet",
            "--width",
            "128",
            "--height",
            "128",
            "--out",
            s(out),
        ];
        args.extend_from_slice(extra);
        ok(&args);
        std::fs::read(out).unwrap()
    };
    let a = run(&["--model", s(&folder)], &dir.join("a.png"));
    let b = run(
        &[
            "--config",
            "tests/fixtures/tiny-models.toml",
            "--aggregators",
            s(&file),
        ],
        &dir.join("b.png"),
    );
    // PNG metadata names differ (model name); compare the decoded pixels.
    let pixels = |bytes: Vec<u8>| {
        let mut r = png::Decoder::new(std::io::Cursor::new(bytes))
            .read_info()
            .unwrap();
        let mut buf = vec![0; r.output_buffer_size().unwrap()];
        r.next_frame(&mut buf).unwrap();
        buf
    };
    assert_eq!(pixels(a), pixels(b));
    // n3's aggregators do not fit the two declared members.
    let n3 = dir.join("n3.safetensors");
    ok(&[
        "convert",
        "--from",
        s(&official_folder("n3")),
        "--to",
        s(&n3),
    ]);
    let bad = afa(&[
        "generate",
        "--config",
        "tests/fixtures/tiny-models.toml",
        "--aggregators",
        s(&n3),
        "--prompt",
        "x",
        "--quiet",
    ]);
    assert!(!bad.status.success());
    let stderr = String::from_utf8_lossy(&bad.stderr);
    assert!(
        stderr.contains("3 members") && stderr.contains("has 2"),
        "{stderr}"
    );
}
