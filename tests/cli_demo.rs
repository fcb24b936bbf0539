//! The demonstration world from the command line: `afa demo render` writes a captioned dataset
//! the judge reads back at 100%, and `afa eval` runs on the default ensemble of models.toml
//! (a quick smoke: one seed, one held-out render per scene, one timestep).
use std::process::Command;

fn afa(args: &[&str]) -> std::process::Output {
    let out = Command::new(env!("CARGO_BIN_EXE_afa"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn scratch(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("afa-demo-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

#[test]
fn rendered_datasets_are_judged_perfectly() {
    let dir = scratch("render");
    let out = dir.to_str().unwrap();
    afa(&[
        "demo",
        "render",
        "--out",
        out,
        "--per-combo",
        "2",
        "--seed",
        "5",
    ]);
    let listing = std::fs::read_to_string(dir.join("metadata.jsonl")).unwrap();
    assert_eq!(listing.lines().count(), 120);
    assert!(
        listing
            .lines()
            .next()
            .unwrap()
            .contains("\"text\":\"a red circle on the left\"")
    );
    let judged = afa(&["demo", "judge", "--dir", out, "--json"]);
    let v: serde_json::Value = serde_json::from_slice(&judged.stdout).unwrap();
    assert_eq!(v["images"], 120);
    assert_eq!(v["all_three"], 1.0);
}

#[test]
fn eval_runs_on_the_default_ensemble() {
    let json = scratch("eval.json");
    let out = afa(&[
        "eval",
        "--seeds",
        "1",
        "--heldout",
        "1",
        "--timesteps",
        "500",
        "--steps",
        "2",
        "--json",
        json.to_str().unwrap(),
    ]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("| mode | eps-MSE |"), "{text}");
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    let modes = report["modes"].as_array().unwrap();
    assert!(
        modes.len() >= 4,
        "afa or mean, each member, merge, magicfusion: {modes:?}"
    );
    for m in modes {
        assert_eq!(m["images"], 60);
        assert!(m["eps_mse"].as_f64().unwrap().is_finite());
    }
}
