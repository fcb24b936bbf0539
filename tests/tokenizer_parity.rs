//! Parity of the Rust CLIP tokenizer with HF transformers' `CLIPTokenizer(Fast)` on the prompts
//! in tests/fixtures/tokenizer/cases.json (written by scripts/fixtures/tokenizer.py): the full
//! embedded CLIP vocabulary and the tiny test pipeline's 1000-id tokenizer folder.
use std::path::{Path, PathBuf};

use afa::loading::tokenizer_files;
use afa::models::tokenizer::ClipTokenizer;
use serde_json::Value;

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn load_cases() -> Vec<Value> {
    let path = repo().join("tests/fixtures/tokenizer/cases.json");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let root: Value = serde_json::from_str(&text).expect("cases.json is valid JSON");
    root["cases"]
        .as_array()
        .expect("cases.json has a `cases` array")
        .clone()
}

fn tokenizer_for(name: &str) -> ClipTokenizer {
    let tokenizer = match name {
        "clip" => tokenizer_files::embedded_tokenizer(),
        "tiny" => tokenizer_files::read_tokenizer_dir(
            &repo().join(Path::new("tests/fixtures/tiny-sd/tokenizer")),
        ),
        other => panic!("unknown tokenizer {other:?} in cases.json"),
    };
    tokenizer.expect("tokenizer files load")
}

fn ids_of(v: &Value) -> Vec<u32> {
    let ids = v.as_array().expect("ids array");
    ids.iter()
        .map(|x| x.as_u64().expect("integer id") as u32)
        .collect()
}

#[test]
fn matches_hf_clip_tokenizer() {
    let cases = load_cases();
    let clip = tokenizer_for("clip");
    let tiny = tokenizer_for("tiny");
    let mut failures = Vec::new();
    let mut counts = (0, 0, 0);
    for case in &cases {
        let text = case["text"].as_str().expect("text");
        let tok = match case["tokenizer"].as_str() {
            Some("tiny") => {
                counts.1 += 1;
                &tiny
            }
            _ => {
                counts.0 += 1;
                &clip
            }
        };
        let expected = ids_of(&case["ids"]);
        let got = tok.encode(text);
        counts.2 += usize::from(got.truncated);
        let want_truncated = case["truncated"].as_bool().expect("truncated");
        let want_count = case["num_prompt_tokens"]
            .as_u64()
            .expect("num_prompt_tokens") as usize;
        if got.ids != expected
            || got.truncated != want_truncated
            || got.num_prompt_tokens != want_count
        {
            failures.push(format!(
                "{text:?}\n  expected {expected:?} (truncated {want_truncated}, {want_count} tokens)\n  got      {:?} (truncated {}, {} tokens)",
                got.ids, got.truncated, got.num_prompt_tokens
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {} cases differ from HF:\n{}",
        failures.len(),
        cases.len(),
        failures.join("\n")
    );
    assert!(counts.0 >= 30 && counts.1 >= 3, "too few cases: {counts:?}");
    assert!(
        counts.2 >= 3,
        "the fixture should exercise truncation: {counts:?}"
    );
}

#[test]
fn truncated_cases_warn() {
    let clip = tokenizer_for("clip");
    for case in load_cases() {
        if case["tokenizer"] != "clip" {
            continue;
        }
        let t = clip.encode(case["text"].as_str().expect("text"));
        let warning = clip.truncation_warning(&t);
        assert_eq!(warning.is_some(), t.truncated, "{case}");
        if let Some(w) = warning {
            assert!(w.contains("77") && w.contains("dropped"), "{w}");
        }
    }
}

/// Timing, run by hand (`cargo test --test tokenizer_parity -- --ignored --nocapture`): building
/// the embedded CLIP tokenizer, one cold pass over the fixture's prompts, then 1000 passes (the
/// steady state for repeated prompts: `tokenizers`' BPE caches words per thread), and clones.
#[test]
#[ignore]
fn encode_timing() {
    use std::time::Instant;
    let texts: Vec<String> = load_cases()
        .iter()
        .map(|c| c["text"].as_str().expect("text").to_string())
        .collect();
    let start = Instant::now();
    let clip = tokenizer_for("clip");
    let build = start.elapsed();
    let start = Instant::now();
    let mut sink = 0usize;
    for text in &texts {
        sink += clip.encode(text).num_prompt_tokens;
    }
    let cold = start.elapsed();
    let start = Instant::now();
    for _ in 0..1000 {
        for text in &texts {
            sink += clip.encode(text).num_prompt_tokens;
        }
    }
    let warm = start.elapsed();
    let start = Instant::now();
    for _ in 0..1000 {
        sink += clip.clone().max_len();
    }
    let clone = start.elapsed();
    println!(
        "build {build:?}; cold pass over {} prompts {cold:?}; 1000 passes {warm:?} ({:?} per encode); 1000 clones {clone:?} [{sink}]",
        texts.len(),
        warm / (1000 * texts.len() as u32)
    );
}
