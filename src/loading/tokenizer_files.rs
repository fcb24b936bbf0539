//! Tokenizer files -> the models layer's tokenizer. Reads a diffusers `tokenizer/` folder:
//! `vocab.json` + `merges.txt` (transformers 4) into a [`BpeVocab`], or a `tokenizer.json`
//! (transformers 5) handed as it is to [`ClipTokenizer::from_tokenizer_json`]; and derives CLIP's
//! standard vocabulary from the merges list embedded in the binary
//! (`assets/clip/bpe_simple_vocab_16e6.txt.gz`, as shipped by OpenAI CLIP / open_clip), so the
//! default tokenizer needs no download. The vocabulary type, its invariants and the tokenizer
//! itself are `models::vocab`'s and `models::tokenizer`'s; this module only reads files and
//! names them in errors.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::LoadError;
use crate::models::ModelError;
use crate::models::tokenizer::{ClipTokenizer, TokenizerOptions};
use crate::models::vocab::{BpeVocab, CLIP_NUM_MERGES};

const EMBEDDED_MERGES_GZ: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");
const EMBEDDED_NAME: &str = "<embedded>/assets/clip/bpe_simple_vocab_16e6.txt.gz";

/// The tokenizer of a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt` (what
/// transformers 4 writes), or else `tokenizer.json` alone (what transformers 5 writes).
pub fn read_tokenizer_dir(dir: &Path) -> Result<ClipTokenizer, LoadError> {
    let (vocab, merges, json) = (
        dir.join("vocab.json"),
        dir.join("merges.txt"),
        dir.join("tokenizer.json"),
    );
    if !vocab.is_file() && !merges.is_file() && json.is_file() {
        return read_tokenizer_json(&json);
    }
    Ok(ClipTokenizer::new(read_vocab_files(&vocab, &merges)?))
}

/// CLIP's standard tokenizer, from the merges list embedded in the binary.
pub fn embedded_tokenizer() -> Result<ClipTokenizer, LoadError> {
    Ok(ClipTokenizer::new(embedded_vocab()?))
}

/// A HF `tokenizers` `tokenizer.json`, used as it defines itself (its model must be BPE and
/// hold CLIP's special tokens).
pub fn read_tokenizer_json(path: &Path) -> Result<ClipTokenizer, LoadError> {
    let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
    ClipTokenizer::from_tokenizer_json(&text, TokenizerOptions::default())
        .map_err(|e| LoadError::format(path, e.to_string()))
}

/// Reads a `vocab.json` (`{"token": id, ...}`) and a `merges.txt` (`#version` header
/// optional, then one `left right` pair per line, highest priority first).
pub fn read_vocab_files(vocab_json: &Path, merges_txt: &Path) -> Result<BpeVocab, LoadError> {
    let text = std::fs::read_to_string(vocab_json).map_err(|e| LoadError::io(vocab_json, e))?;
    let encoder: HashMap<String, u32> =
        serde_json::from_str(&text).map_err(|source| LoadError::Json {
            path: vocab_json.to_path_buf(),
            source,
        })?;
    if encoder.is_empty() {
        return Err(LoadError::format(vocab_json, "the vocabulary is empty"));
    }
    let text = std::fs::read_to_string(merges_txt).map_err(|e| LoadError::io(merges_txt, e))?;
    let merges = parse_merges_txt(&text, merges_txt)?;
    BpeVocab::from_parts(encoder, merges).map_err(|e| vocab_error(e, vocab_json, merges_txt))
}

/// CLIP's standard vocabulary, derived from the merges list embedded in the binary.
pub fn embedded_vocab() -> Result<BpeVocab, LoadError> {
    clip_vocab_from_merges_gz(EMBEDDED_MERGES_GZ, Path::new(EMBEDDED_NAME))
}

/// CLIP's vocabulary from an OpenAI-format gzipped merges list (`source` names it in errors):
/// the header line is skipped, the next [`CLIP_NUM_MERGES`] lines are merges
/// ([`BpeVocab::from_clip_merges`] lays the vocabulary out).
pub fn clip_vocab_from_merges_gz(gz: &[u8], source: &Path) -> Result<BpeVocab, LoadError> {
    let mut text = String::new();
    flate2::read::GzDecoder::new(gz)
        .read_to_string(&mut text)
        .map_err(|e| LoadError::io(source, e))?;
    let mut merges = Vec::with_capacity(CLIP_NUM_MERGES);
    for (i, line) in text.split('\n').skip(1).take(CLIP_NUM_MERGES).enumerate() {
        merges.push(parse_merge_line(line, i + 2, source)?);
    }
    BpeVocab::from_clip_merges(merges).map_err(|e| vocab_error(e, source, source))
}

/// A vocabulary's invariant error, naming the file at fault.
fn vocab_error(e: ModelError, vocab_src: &Path, merges_src: &Path) -> LoadError {
    match e {
        ModelError::UnknownMergeToken { .. } => {
            LoadError::format(merges_src, format!("{e} {}", vocab_src.display()))
        }
        other => LoadError::format(vocab_src, other.to_string()),
    }
}

fn parse_merges_txt(text: &str, path: &Path) -> Result<Vec<(String, String)>, LoadError> {
    let mut merges = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if line.starts_with("#version") || line.trim().is_empty() {
            continue;
        }
        merges.push(parse_merge_line(line, i + 1, path)?);
    }
    Ok(merges)
}

fn parse_merge_line(
    line: &str,
    line_no: usize,
    path: &Path,
) -> Result<(String, String), LoadError> {
    let mut parts = line.split(' ');
    match (parts.next(), parts.next(), parts.next()) {
        (Some(a), Some(b), None) if !a.is_empty() && !b.is_empty() => {
            Ok((a.to_string(), b.to_string()))
        }
        _ => Err(LoadError::format(
            path,
            format!("line {line_no}: expected two tokens separated by one space, found {line:?}"),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::vocab::{BOS_TOKEN, CLIP_VOCAB_SIZE, EOS_TOKEN};
    use std::path::PathBuf;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("afa-tokfiles-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    fn vocab_of(dir: &Path) -> Result<BpeVocab, LoadError> {
        read_vocab_files(&dir.join("vocab.json"), &dir.join("merges.txt"))
    }

    #[test]
    fn tokenizer_json_of_transformers_5_reads_like_vocab_and_merges() {
        // The official folder fixture was saved by transformers 5 (tokenizer.json only); the
        // member folder by transformers 4 (vocab.json + merges.txt); same tokenizer.
        let json =
            read_tokenizer_dir(Path::new("tests/fixtures/afa/n2/official/tokenizer")).unwrap();
        let pair = read_tokenizer_dir(Path::new("tests/fixtures/tiny-sd/tokenizer")).unwrap();
        assert_eq!(json.vocab_size(), pair.vocab_size());
        for text in [
            "a photo of a cat",
            "(masterpiece:1.2), Café 東京 🐱 don't <|endoftext|>",
            &"tower ".repeat(90),
        ] {
            assert_eq!(json.encode(text), pair.encode(text), "{text}");
        }
        let dir = scratch_dir("tokjson");
        std::fs::write(
            dir.join("tokenizer.json"),
            r###"{"model": {"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##", "max_input_chars_per_word": 100, "vocab": {"[UNK]": 0}}}"###,
        )
        .unwrap();
        let err = read_tokenizer_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("WordPiece") && err.contains("tokenizer.json"),
            "{err}"
        );
        std::fs::write(dir.join("tokenizer.json"), "{not json").unwrap();
        let err = read_tokenizer_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("tokenizer.json"), "{err}");
    }

    #[test]
    fn embedded_default_has_clip_layout() {
        let v = embedded_vocab().unwrap();
        assert_eq!(v.len(), CLIP_VOCAB_SIZE);
        assert_eq!(v.merges().len(), CLIP_NUM_MERGES);
        let e = v.encoder();
        assert_eq!(e["!"], 0);
        assert_eq!(e["!</w>"], 256);
        assert_eq!(e["a</w>"], 320);
        assert_eq!(e[BOS_TOKEN], 49_406);
        assert_eq!(e[EOS_TOKEN], 49_407);
        // The byte 0x00 is the first non-printable byte, mapped to U+0100 at index 188.
        assert_eq!(e["\u{100}"], 188);
        assert_eq!(embedded_tokenizer().unwrap().vocab_size(), CLIP_VOCAB_SIZE);
    }

    #[test]
    fn reads_tiny_tokenizer_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd/tokenizer");
        let v = vocab_of(&dir).unwrap();
        assert_eq!(v.len(), 1000);
        assert_eq!(v.encoder()[BOS_TOKEN], 998);
        assert_eq!(v.merges()[0], ("i".to_string(), "n".to_string()));
    }

    #[test]
    fn missing_file_names_it() {
        let dir = scratch_dir("missing");
        let err = read_tokenizer_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("vocab.json"), "{err}");
        std::fs::write(
            dir.join("vocab.json"),
            r#"{"<|startoftext|>": 0, "<|endoftext|>": 1}"#,
        )
        .unwrap();
        let err = read_tokenizer_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("merges.txt"), "{err}");
    }

    #[test]
    fn malformed_files_name_them() {
        let dir = scratch_dir("malformed");
        std::fs::write(dir.join("vocab.json"), "{not json").unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
        let err = vocab_of(&dir).unwrap_err();
        assert!(matches!(err, LoadError::Json { .. }));
        assert!(err.to_string().contains("vocab.json"), "{err}");

        std::fs::write(
            dir.join("vocab.json"),
            r#"{"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}"#,
        )
        .unwrap();
        let err = vocab_of(&dir).unwrap_err().to_string();
        assert!(
            err.contains("merges.txt") && err.contains("\"ab\""),
            "{err}"
        );

        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
        let err = vocab_of(&dir).unwrap_err().to_string();
        assert!(
            err.contains("merges.txt") && err.contains("line 2"),
            "{err}"
        );

        std::fs::write(dir.join("vocab.json"), r#"{"a": 0, "b": 1}"#).unwrap();
        std::fs::write(dir.join("merges.txt"), "").unwrap();
        let err = vocab_of(&dir).unwrap_err().to_string();
        assert!(
            err.contains("vocab.json") && err.contains(BOS_TOKEN),
            "{err}"
        );
    }

    #[test]
    fn truncated_gz_is_an_error() {
        let err =
            clip_vocab_from_merges_gz(&EMBEDDED_MERGES_GZ[..1000], Path::new("x.gz")).unwrap_err();
        assert!(err.to_string().contains("x.gz"), "{err}");
    }
}
