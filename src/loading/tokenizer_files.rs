//! Tokenizer files: reads a CLIP BPE vocabulary (`vocab.json` + `merges.txt`, the layout of
//! diffusers' `tokenizer/` folder) into a validated [`BpeVocab`], and derives CLIP's standard
//! 49,408-token vocabulary from the merges list embedded in the binary
//! (`assets/clip/bpe_simple_vocab_16e6.txt.gz`, as shipped by OpenAI CLIP / open_clip), so the
//! default tokenizer needs no download. Turning text into ids is `models::tokenizer`'s job.
use std::collections::HashMap;
use std::io::Read;
use std::path::Path;

use super::LoadError;

/// The beginning-of-text token every CLIP vocabulary must contain.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// The end-of-text token (also CLIP's padding and unknown token).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// Number of merges CLIP uses from the embedded list (49,408 - 256 - 256 - 2).
pub const CLIP_NUM_MERGES: usize = 49_152 - 256 - 2;
/// Size of CLIP's vocabulary.
pub const CLIP_VOCAB_SIZE: usize = 49_408;

const EMBEDDED_MERGES_GZ: &[u8] = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");
const EMBEDDED_NAME: &str = "<embedded>/assets/clip/bpe_simple_vocab_16e6.txt.gz";
const END_OF_WORD: &str = "</w>";

/// A validated byte-level BPE vocabulary: token string -> id, plus merges in rank order.
///
/// Invariants (checked by every constructor): [`BOS_TOKEN`] and [`EOS_TOKEN`] are in the
/// encoder, and for every merge `(a, b)` the tokens `a`, `b` and `a + b` are in the encoder
/// (HF `tokenizers` refuses merges naming unknown tokens too).
#[derive(Debug, Clone)]
pub struct BpeVocab {
    encoder: HashMap<String, u32>,
    merges: Vec<(String, String)>,
}

impl BpeVocab {
    /// Reads a diffusers `tokenizer/` folder: `vocab.json` + `merges.txt` (what transformers 4
    /// writes), or else `tokenizer.json` alone (what transformers 5 writes).
    pub fn from_dir(dir: &Path) -> Result<Self, LoadError> {
        let (vocab, merges, json) = (
            dir.join("vocab.json"),
            dir.join("merges.txt"),
            dir.join("tokenizer.json"),
        );
        if !vocab.is_file() && !merges.is_file() && json.is_file() {
            return Self::from_tokenizer_json(&json);
        }
        Self::from_files(&vocab, &merges)
    }

    /// Reads a HF `tokenizers` `tokenizer.json` of a BPE model: `model.vocab`, `model.merges`
    /// (`"a b"` strings or `["a", "b"]` pairs) and `added_tokens`. Its normalizer and
    /// pre-tokenizer are CLIP's, which `models::tokenizer` implements; they are not read.
    pub fn from_tokenizer_json(path: &Path) -> Result<Self, LoadError> {
        #[derive(serde::Deserialize)]
        struct File {
            model: Model,
            #[serde(default)]
            added_tokens: Vec<Added>,
        }
        #[derive(serde::Deserialize)]
        struct Model {
            #[serde(rename = "type")]
            kind: String,
            vocab: HashMap<String, u32>,
            merges: Vec<serde_json::Value>,
        }
        #[derive(serde::Deserialize)]
        struct Added {
            id: u32,
            content: String,
        }
        let text = std::fs::read_to_string(path).map_err(|e| LoadError::io(path, e))?;
        let file: File = serde_json::from_str(&text).map_err(|source| LoadError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        if file.model.kind != "BPE" {
            return Err(LoadError::format(
                path,
                format!("a '{}' tokenizer, not BPE", file.model.kind),
            ));
        }
        let mut encoder = file.model.vocab;
        for added in file.added_tokens {
            encoder.entry(added.content).or_insert(added.id);
        }
        let merges = file
            .model
            .merges
            .iter()
            .enumerate()
            .map(|(i, m)| match m {
                serde_json::Value::String(line) => parse_merge_line(line, i + 1, path),
                serde_json::Value::Array(pair) => match pair.as_slice() {
                    [serde_json::Value::String(a), serde_json::Value::String(b)] => {
                        Ok((a.clone(), b.clone()))
                    }
                    _ => Err(LoadError::format(
                        path,
                        format!("merge {} is not a pair", i + 1),
                    )),
                },
                _ => Err(LoadError::format(
                    path,
                    format!("merge {} is not a pair", i + 1),
                )),
            })
            .collect::<Result<Vec<_>, _>>()?;
        if encoder.is_empty() {
            return Err(LoadError::format(path, "the vocabulary is empty"));
        }
        Self::from_parts(encoder, merges, path, path)
    }

    /// Reads a `vocab.json` (`{"token": id, ...}`) and a `merges.txt` (`#version` header
    /// optional, then one `left right` pair per line, highest priority first).
    pub fn from_files(vocab_json: &Path, merges_txt: &Path) -> Result<Self, LoadError> {
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
        Self::from_parts(encoder, merges, vocab_json, merges_txt)
    }

    /// CLIP's standard vocabulary, derived from the merges list embedded in the binary.
    pub fn embedded_default() -> Result<Self, LoadError> {
        Self::from_clip_merges_gz(EMBEDDED_MERGES_GZ, Path::new(EMBEDDED_NAME))
    }

    /// Derives CLIP's vocabulary from an OpenAI-format gzipped merges list (`source` names it in
    /// errors): skip the header line, take the first [`CLIP_NUM_MERGES`] merges; the vocabulary
    /// is the 256 byte symbols, the same with `</w>`, one token per merge, then bos and eos.
    pub fn from_clip_merges_gz(gz: &[u8], source: &Path) -> Result<Self, LoadError> {
        let mut text = String::new();
        flate2::read::GzDecoder::new(gz)
            .read_to_string(&mut text)
            .map_err(|e| LoadError::io(source, e))?;
        let mut merges = Vec::with_capacity(CLIP_NUM_MERGES);
        for (i, line) in text.split('\n').skip(1).take(CLIP_NUM_MERGES).enumerate() {
            merges.push(parse_merge_line(line, i + 2, source)?);
        }
        if merges.len() != CLIP_NUM_MERGES {
            let reason = format!(
                "expected {CLIP_NUM_MERGES} merges after the header, found {}",
                merges.len()
            );
            return Err(LoadError::format(source, reason));
        }
        let alphabet = byte_level_alphabet();
        let mut tokens: Vec<String> = Vec::with_capacity(CLIP_VOCAB_SIZE);
        tokens.extend(alphabet.iter().map(|c| c.to_string()));
        tokens.extend(alphabet.iter().map(|c| format!("{c}{END_OF_WORD}")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(BOS_TOKEN.to_string());
        tokens.push(EOS_TOKEN.to_string());
        let encoder: HashMap<String, u32> = tokens.into_iter().zip(0u32..).collect();
        if encoder.len() != CLIP_VOCAB_SIZE {
            let reason = format!(
                "derived {} distinct tokens, expected {CLIP_VOCAB_SIZE}",
                encoder.len()
            );
            return Err(LoadError::format(source, reason));
        }
        Self::from_parts(encoder, merges, source, source)
    }

    /// Builds a vocabulary from in-memory parts, checking the invariants; `vocab_src` and
    /// `merges_src` are the files named in errors.
    pub fn from_parts(
        encoder: HashMap<String, u32>,
        merges: Vec<(String, String)>,
        vocab_src: &Path,
        merges_src: &Path,
    ) -> Result<Self, LoadError> {
        for special in [BOS_TOKEN, EOS_TOKEN] {
            if !encoder.contains_key(special) {
                return Err(LoadError::format(
                    vocab_src,
                    format!("missing the special token {special}"),
                ));
            }
        }
        for (rank, (a, b)) in merges.iter().enumerate() {
            let joined = format!("{a}{b}");
            if let Some(missing) = [a, b, &joined]
                .into_iter()
                .find(|t| !encoder.contains_key(t.as_str()))
            {
                let reason = format!(
                    "merge #{} ({a:?} {b:?}) uses the token {missing:?}, which is not in the vocabulary {}",
                    rank + 1,
                    vocab_src.display()
                );
                return Err(LoadError::format(merges_src, reason));
            }
        }
        Ok(BpeVocab { encoder, merges })
    }

    /// Token string -> id.
    pub fn encoder(&self) -> &HashMap<String, u32> {
        &self.encoder
    }

    /// Merges, highest priority (rank 0) first.
    pub fn merges(&self) -> &[(String, String)] {
        &self.merges
    }

    /// Number of tokens.
    pub fn len(&self) -> usize {
        self.encoder.len()
    }

    /// Never true for a validated vocabulary (it holds at least bos and eos).
    pub fn is_empty(&self) -> bool {
        self.encoder.is_empty()
    }

    /// Consumes the vocabulary, returning `(encoder, merges)`.
    pub fn into_parts(self) -> (HashMap<String, u32>, Vec<(String, String)>) {
        (self.encoder, self.merges)
    }
}

/// GPT-2's byte -> printable-char table (`bytes_to_unicode`), listed in vocabulary order:
/// the printable bytes `!..=~`, `¡..=¬`, `®..=ÿ` map to themselves, then the remaining bytes,
/// in increasing order, map to U+0100, U+0101, ... Returns `(byte, char)` pairs in that order.
pub fn byte_level_pairs() -> Vec<(u8, char)> {
    let printable = |b: u8| (b'!'..=b'~').contains(&b) || (0xA1..=0xAC).contains(&b) || b >= 0xAE;
    let mut pairs: Vec<(u8, char)> = (0..=255u8)
        .filter(|&b| printable(b))
        .map(|b| (b, char::from(b)))
        .collect();
    let others = (0..=255u8).filter(|&b| !printable(b));
    pairs.extend(
        others
            .zip(256u32..)
            .map(|(b, cp)| (b, char::from_u32(cp).unwrap_or('\u{FFFD}'))),
    );
    pairs
}

/// The 256 byte-level symbols in vocabulary order (see [`byte_level_pairs`]).
pub fn byte_level_alphabet() -> Vec<char> {
    byte_level_pairs().into_iter().map(|(_, c)| c).collect()
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
    use std::path::PathBuf;

    fn scratch_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("afa-tokfiles-{}-{name}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn tokenizer_json_of_transformers_5_reads_like_vocab_and_merges() {
        // The official folder fixture was saved by transformers 5 (tokenizer.json only); the
        // member folder by transformers 4 (vocab.json + merges.txt); same tokenizer.
        let json =
            BpeVocab::from_dir(Path::new("tests/fixtures/afa/n2/official/tokenizer")).unwrap();
        let pair = BpeVocab::from_dir(Path::new("tests/fixtures/tiny-sd/tokenizer")).unwrap();
        assert_eq!(json.encoder(), pair.encoder());
        assert_eq!(json.merges(), pair.merges());
        let dir = scratch_dir("tokjson");
        std::fs::write(
            dir.join("tokenizer.json"),
            r#"{"model": {"type": "WordPiece", "vocab": {}, "merges": []}}"#,
        )
        .unwrap();
        let err = BpeVocab::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("WordPiece"), "{err}");
    }

    #[test]
    fn embedded_default_has_clip_layout() {
        let v = BpeVocab::embedded_default().unwrap();
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
    }

    #[test]
    fn byte_table_is_a_bijection() {
        let pairs = byte_level_pairs();
        let bytes: std::collections::HashSet<u8> = pairs.iter().map(|p| p.0).collect();
        let chars: std::collections::HashSet<char> = pairs.iter().map(|p| p.1).collect();
        assert_eq!((pairs.len(), bytes.len(), chars.len()), (256, 256, 256));
        assert_eq!(pairs[0], (b'!', '!'));
        assert!(pairs.contains(&(b' ', '\u{120}')));
    }

    #[test]
    fn reads_tiny_tokenizer_folder() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/tiny-sd/tokenizer");
        let v = BpeVocab::from_dir(&dir).unwrap();
        assert_eq!(v.len(), 1000);
        assert_eq!(v.encoder()[BOS_TOKEN], 998);
        assert_eq!(v.merges()[0], ("i".to_string(), "n".to_string()));
    }

    #[test]
    fn missing_file_names_it() {
        let dir = scratch_dir("missing");
        let err = BpeVocab::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("vocab.json"), "{err}");
        std::fs::write(
            dir.join("vocab.json"),
            r#"{"<|startoftext|>": 0, "<|endoftext|>": 1}"#,
        )
        .unwrap();
        let err = BpeVocab::from_dir(&dir).unwrap_err().to_string();
        assert!(err.contains("merges.txt"), "{err}");
    }

    #[test]
    fn malformed_files_name_them() {
        let dir = scratch_dir("malformed");
        std::fs::write(dir.join("vocab.json"), "{not json").unwrap();
        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b\n").unwrap();
        let err = BpeVocab::from_dir(&dir).unwrap_err();
        assert!(matches!(err, LoadError::Json { .. }));
        assert!(err.to_string().contains("vocab.json"), "{err}");

        std::fs::write(
            dir.join("vocab.json"),
            r#"{"a": 0, "b": 1, "<|startoftext|>": 2, "<|endoftext|>": 3}"#,
        )
        .unwrap();
        let err = BpeVocab::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("merges.txt") && err.contains("\"ab\""),
            "{err}"
        );

        std::fs::write(dir.join("merges.txt"), "#version: 0.2\na b c\n").unwrap();
        let err = BpeVocab::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("merges.txt") && err.contains("line 2"),
            "{err}"
        );

        std::fs::write(dir.join("vocab.json"), r#"{"a": 0, "b": 1}"#).unwrap();
        std::fs::write(dir.join("merges.txt"), "").unwrap();
        let err = BpeVocab::from_dir(&dir).unwrap_err().to_string();
        assert!(
            err.contains("vocab.json") && err.contains(BOS_TOKEN),
            "{err}"
        );
    }

    #[test]
    fn truncated_gz_is_an_error() {
        let err = BpeVocab::from_clip_merges_gz(&EMBEDDED_MERGES_GZ[..1000], Path::new("x.gz"))
            .unwrap_err();
        assert!(err.to_string().contains("x.gz"), "{err}");
    }
}
