//! The CLIP text tokenizer: prompt text -> the fixed-length id sequence the SD 1.5 text encoder
//! reads, as HF `transformers`' `CLIPTokenizer` gives it to diffusers' SD pipelines
//! (`padding="max_length", max_length=77, truncation=True`). This module owns [`ClipTokenizer`]
//! and its options; the vocabulary it is built from is [`BpeVocab`] (`models::vocab`).
//!
//! The text -> tokens part is HF's own `tokenizers` crate, the code transformers runs. Since
//! transformers 5 `CLIPTokenizer` *is* the `tokenizers`-backed tokenizer (formerly
//! `CLIPTokenizerFast`; the pure-Python one with its ftfy cleanup is gone), and
//! [`ClipTokenizer::with_options`] builds the `tokenizers::Tokenizer` exactly as the
//! `tokenizer.json` transformers 5 saves for CLIP defines it (a unit test compares the two):
//!
//! 1. Added special tokens `<|startoftext|>` / `<|endoftext|>` (not normalised): their literal,
//!    case-sensitive occurrences in the raw text are cut out first and become their ids.
//! 2. Normalizer `Sequence[NFC, Replace(/\s+/ -> " "), Lowercase]`: Unicode NFC, every run of
//!    Unicode whitespace becomes one space, each *character* lowercased on its own (a final `Σ`
//!    gives `σ`, `İ` gives `i` + U+0307). No ftfy repair, HTML unescaping or accent stripping.
//! 3. Pre-tokenizer `Sequence[Split(CLIP's pattern, Removed, invert), ByteLevel(no prefix
//!    space, GPT-2 regex)]`: CLIP's regex is case-sensitive (the text is already lowercase, so
//!    `'ſ` is not `'s`); GPT-2's regex then re-splits each piece, which only changes a
//!    lowercased `<|ENDOFTEXT|>` (into `<|`, `endoftext`, `|>`). Bytes become GPT-2's printable
//!    symbols. The regexes run on `fancy-regex` (the feature candle already enables) where
//!    Python's `tokenizers` uses Oniguruma; the parity fixture shows no difference.
//! 4. Model `BPE` with end-of-word suffix `</w>`, unknown token `<|endoftext|>`, no dropout:
//!    merges lowest rank first, leftmost on ties.
//! 5. Here, on top of the prompt's ids: `bos`, the first `max_len - 2` tokens, `eos`, then
//!    padding to `max_len` with the pad id, and what truncation dropped ([`Tokenized`]).
//!
//! A transformers 5 `tokenizer.json` is used as it is ([`ClipTokenizer::from_tokenizer_json`]),
//! its own truncation and padding switched off in favour of step 5.
use std::sync::Arc;

use tokenizers::decoders::byte_level::ByteLevel;
use tokenizers::models::bpe::{BPE, Vocab};
use tokenizers::normalizers::replace::ReplacePattern;
use tokenizers::normalizers::{Lowercase, NFC, Replace, Sequence as NormalizerSequence};
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::processors::roberta::RobertaProcessing;
use tokenizers::{AddedToken, ModelWrapper, SplitDelimiterBehavior, Tokenizer};

use super::ModelError;
use super::vocab::{BOS_TOKEN, BpeVocab, END_OF_WORD, EOS_TOKEN};

/// SD 1.5's text encoder context length.
pub const DEFAULT_MAX_LEN: usize = 77;

/// CLIP's pre-tokenisation pattern, as transformers 5 writes it into `tokenizer.json`.
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// Construction options for [`ClipTokenizer`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenizerOptions {
    /// Length of every encoded sequence, bos and eos included (at least 2).
    pub max_len: usize,
    /// Id used for padding; `None` means the eos id (as SD 1.5's tokenizer does).
    pub pad_id: Option<u32>,
}

impl Default for TokenizerOptions {
    fn default() -> Self {
        TokenizerOptions {
            max_len: DEFAULT_MAX_LEN,
            pad_id: None,
        }
    }
}

/// An encoded prompt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tokenized {
    /// Exactly `max_len` ids: bos, the (possibly truncated) prompt tokens, eos, padding.
    pub ids: Vec<u32>,
    /// Whether prompt tokens were dropped to fit `max_len`.
    pub truncated: bool,
    /// Number of prompt tokens (between bos and eos) before truncation.
    pub num_prompt_tokens: usize,
    /// The prompt tokens that were dropped (empty unless `truncated`).
    pub dropped_ids: Vec<u32>,
}

/// CLIP's byte-level BPE tokenizer. Encoding never panics on any `&str`; a clone (one per
/// served batch) shares the `tokenizers::Tokenizer` and costs nothing.
#[derive(Clone)]
pub struct ClipTokenizer {
    inner: Arc<Tokenizer>,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_len: usize,
    vocab_size: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("vocab_size", &self.vocab_size)
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_len", &self.max_len)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// A tokenizer with the SD 1.5 defaults (77 ids, padded with eos).
    pub fn new(vocab: BpeVocab) -> Self {
        Self::with_options(vocab, TokenizerOptions::default())
    }

    /// A tokenizer with explicit length / padding options (`max_len` below 2 is raised to 2).
    pub fn with_options(vocab: BpeVocab, options: TokenizerOptions) -> Self {
        // Nothing here can fail: `BpeVocab` guarantees what the BPE model checks (every merge's
        // tokens and both special tokens are in the vocabulary) and the patterns are constants
        // (the unit tests build them).
        let inner = clip_definition(vocab).expect("a BpeVocab always makes a CLIP tokenizer");
        Self::from_inner(inner, options).expect("a BpeVocab holds both special tokens")
    }

    /// A tokenizer from a HF `tokenizers` `tokenizer.json` (what transformers 5 saves), used as
    /// it defines itself; only its truncation and padding are replaced by `options`'. The model
    /// must be BPE and the vocabulary must hold `<|startoftext|>` and `<|endoftext|>`.
    pub fn from_tokenizer_json(json: &str, options: TokenizerOptions) -> Result<Self, ModelError> {
        let mut inner: Tokenizer = json
            .parse()
            .map_err(|e| ModelError::Tokenizer(format!("not a tokenizer.json: {e}")))?;
        let kind = match inner.get_model() {
            ModelWrapper::BPE(_) => None,
            ModelWrapper::WordPiece(_) => Some("WordPiece"),
            ModelWrapper::WordLevel(_) => Some("WordLevel"),
            ModelWrapper::Unigram(_) => Some("Unigram"),
        };
        if let Some(kind) = kind {
            return Err(ModelError::Tokenizer(format!(
                "a '{kind}' tokenizer, not BPE"
            )));
        }
        inner
            .with_truncation(None)
            .map_err(|e| ModelError::Tokenizer(e.to_string()))?;
        inner.with_padding(None);
        Self::from_inner(inner, options)
    }

    fn from_inner(inner: Tokenizer, options: TokenizerOptions) -> Result<Self, ModelError> {
        let id = |token: &'static str| {
            inner
                .token_to_id(token)
                .ok_or(ModelError::MissingSpecialToken(token))
        };
        let (bos_id, eos_id) = (id(BOS_TOKEN)?, id(EOS_TOKEN)?);
        Ok(ClipTokenizer {
            vocab_size: inner.get_vocab_size(true),
            inner: Arc::new(inner),
            bos_id,
            eos_id,
            pad_id: options.pad_id.unwrap_or(eos_id),
            max_len: options.max_len.max(2),
        })
    }

    /// Encodes `text` to exactly `max_len` ids (bos, tokens, eos, padding), truncating the
    /// prompt tokens to `max_len - 2` like HF's `truncation=True`.
    pub fn encode(&self, text: &str) -> Tokenized {
        let mut tokens = self.tokenize(text);
        let num_prompt_tokens = tokens.len();
        let keep = self.max_len - 2;
        let dropped_ids = if tokens.len() > keep {
            tokens.split_off(keep)
        } else {
            Vec::new()
        };
        let mut ids = Vec::with_capacity(self.max_len);
        ids.push(self.bos_id);
        ids.extend(tokens);
        ids.push(self.eos_id);
        ids.resize(self.max_len, self.pad_id);
        Tokenized {
            ids,
            truncated: !dropped_ids.is_empty(),
            num_prompt_tokens,
            dropped_ids,
        }
    }

    /// The prompt's token ids without bos/eos, truncation or padding.
    ///
    /// Should the `tokenizers` crate report an error (it cannot for the CLIP definition: its
    /// regexes need no backtracking and its unknown token is in the vocabulary; a foreign
    /// `tokenizer.json` might), the prompt gets no tokens and a warning is logged.
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        match self.inner.encode_fast(text, false) {
            Ok(encoding) => encoding.get_ids().to_vec(),
            Err(e) => {
                tracing::warn!("tokenizer error, the prompt is encoded as empty: {e}");
                Vec::new()
            }
        }
    }

    /// A human-readable warning for a truncated prompt (`None` when nothing was dropped),
    /// in the spirit of diffusers' "The following part of your input was truncated" log.
    pub fn truncation_warning(&self, t: &Tokenized) -> Option<String> {
        if !t.truncated {
            return None;
        }
        Some(format!(
            "the prompt was truncated to {} tokens (CLIP reads at most {} prompt tokens; this one has {}); dropped: \"{}\"",
            self.max_len,
            self.max_len - 2,
            t.num_prompt_tokens,
            self.decode(&t.dropped_ids)
        ))
    }

    /// Best-effort text for `ids`, as transformers decodes CLIP: the byte-level decoder turns
    /// symbols back into bytes (invalid UTF-8 is replaced), then `</w>` becomes a space and
    /// the result is trimmed. Unknown ids are skipped; special tokens are kept.
    pub fn decode(&self, ids: &[u32]) -> String {
        let text = self.inner.decode(ids, false).unwrap_or_default();
        text.replace(END_OF_WORD, " ").trim().to_string()
    }

    /// Id of `<|startoftext|>`.
    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    /// Id of `<|endoftext|>` (also the unknown token).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Id used for padding.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// Length of every [`Tokenized::ids`].
    pub fn max_len(&self) -> usize {
        self.max_len
    }

    /// Number of tokens in the vocabulary (added tokens included).
    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }
}

/// CLIP's `tokenizers` definition over `vocab`: what transformers 5's `CLIPTokenizer` builds
/// from `vocab.json` + `merges.txt` and saves as `tokenizer.json` (see the module docs).
fn clip_definition(vocab: BpeVocab) -> tokenizers::Result<Tokenizer> {
    let (encoder, merges) = vocab.into_parts();
    let special_id = |t: &str| encoder.get(t).copied().unwrap_or_default();
    let (bos_id, eos_id) = (special_id(BOS_TOKEN), special_id(EOS_TOKEN));
    let model = BPE::builder()
        .vocab_and_merges(encoder.into_iter().collect::<Vocab>(), merges)
        .unk_token(EOS_TOKEN.to_string())
        .continuing_subword_prefix(String::new())
        .end_of_word_suffix(END_OF_WORD.to_string())
        .fuse_unk(false)
        .build()?;
    let mut tokenizer = Tokenizer::new(model);
    tokenizer.with_normalizer(Some(NormalizerSequence::new(vec![
        NFC.into(),
        Replace::new(ReplacePattern::Regex(r"\s+".to_string()), " ")?.into(),
        Lowercase.into(),
    ])))?;
    tokenizer.with_pre_tokenizer(Some(PreTokenizerSequence::new(vec![
        Split::new(
            SplitPattern::Regex(CLIP_PATTERN.to_string()),
            SplitDelimiterBehavior::Removed,
            true,
        )?
        .into(),
        ByteLevel::new(false, true, true).into(),
    ])));
    tokenizer.with_post_processor(Some(
        RobertaProcessing::new(
            (EOS_TOKEN.to_string(), eos_id),
            (BOS_TOKEN.to_string(), bos_id),
        )
        .trim_offsets(false)
        .add_prefix_space(false),
    ));
    tokenizer.with_decoder(Some(ByteLevel::default()));
    tokenizer.add_special_tokens([
        AddedToken::from(BOS_TOKEN, true),
        AddedToken::from(EOS_TOKEN, true),
    ])?;
    Ok(tokenizer)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::io::Read;
    use std::sync::OnceLock;
    use unicode_normalization::UnicodeNormalization;

    /// CLIP's vocabulary from the merges list embedded in the binary, read here the way
    /// `loading::tokenizer_files` reads it (models may not use `loading`).
    fn clip_vocab() -> BpeVocab {
        let gz = include_bytes!("../../assets/clip/bpe_simple_vocab_16e6.txt.gz");
        let mut text = String::new();
        flate2::read::GzDecoder::new(&gz[..])
            .read_to_string(&mut text)
            .unwrap();
        let merges = text.split('\n').skip(1).map(|line| {
            let (a, b) = line.split_once(' ').unwrap_or((line, ""));
            (a.to_string(), b.to_string())
        });
        BpeVocab::from_clip_merges(merges).unwrap()
    }

    fn clip() -> &'static ClipTokenizer {
        static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| ClipTokenizer::new(clip_vocab()))
    }

    #[test]
    fn cat_prompt_matches_clip() {
        let t = clip().encode("a photo of a cat");
        assert_eq!(&t.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!(t.ids.len(), 77);
        assert!(t.ids[7..].iter().all(|&id| id == 49407));
        assert_eq!((t.truncated, t.num_prompt_tokens), (false, 5));
        assert_eq!(clip().truncation_warning(&t), None);
        assert_eq!(clip().vocab_size(), 49_408);
    }

    #[test]
    fn empty_and_whitespace_prompts() {
        for text in ["", "   \t\n "] {
            let t = clip().encode(text);
            assert_eq!(t.ids.len(), 77);
            assert_eq!(&t.ids[..2], &[49406, 49407]);
            assert_eq!(t.num_prompt_tokens, 0);
        }
    }

    #[test]
    fn long_prompt_is_truncated() {
        let text = "cat ".repeat(100);
        let t = clip().encode(&text);
        assert_eq!(t.ids.len(), 77);
        assert!(t.truncated);
        assert_eq!(t.num_prompt_tokens, 100);
        assert_eq!(t.dropped_ids.len(), 25);
        assert_eq!((t.ids[0], t.ids[75], t.ids[76]), (49406, 2368, 49407));
        let warning = clip().truncation_warning(&t).unwrap();
        assert!(
            warning.contains("77 tokens") && warning.contains("cat cat"),
            "{warning}"
        );
        // Exactly 75 tokens fit without truncation.
        let t = clip().encode(&"cat ".repeat(75));
        assert!(!t.truncated);
        assert_eq!(t.ids[76], 49407);
    }

    #[test]
    fn options_change_length_and_padding() {
        let tok = ClipTokenizer::with_options(
            clip_vocab(),
            TokenizerOptions {
                max_len: 5,
                pad_id: Some(0),
            },
        );
        let t = tok.encode("a cat");
        assert_eq!(t.ids, vec![49406, 320, 2368, 49407, 0]);
        let t = tok.encode("a photo of a cat");
        assert_eq!(t.ids, vec![49406, 320, 1125, 539, 49407]);
        assert!(t.truncated);
        assert_eq!(tok.decode(&t.dropped_ids), "a cat");
    }

    #[test]
    fn special_tokens_and_case() {
        let t = clip().tokenize("a <|endoftext|> b<|startoftext|>");
        assert_eq!(t, vec![320, 49407, 321, 49406]);
        // Upper-case specials are ordinary text after lowercasing.
        assert_eq!(
            clip().tokenize("x<|ENDOFTEXT|>y"),
            vec![343, 27, 347, 40786, 4160, 91, 285, 344]
        );
    }

    #[test]
    fn unicode_never_panics_and_round_trips() {
        let text = "Café ΟΔΟΣ 東京 🐱‍👤 שָׁלוֹם e\u{301}\u{0}\u{FFFF} İ";
        let t = clip().tokenize(text);
        assert!(!t.is_empty());
        let squash = |s: &str| s.chars().filter(|c| !c.is_whitespace()).collect::<String>();
        let normalized: String = text.nfc().flat_map(char::to_lowercase).collect();
        assert_eq!(squash(&clip().decode(&t)), squash(&normalized));
        assert!(normalized.contains('σ') && !normalized.contains('ς'));
    }

    #[test]
    fn huge_prompts_encode() {
        // Long runs the regexes must not choke on: one 100k-symbol "word", and many words.
        for text in ["!".repeat(100_000), "a ".repeat(50_000), "é".repeat(30_000)] {
            let t = clip().encode(&text);
            assert!(
                t.truncated && t.num_prompt_tokens > 75,
                "{}",
                t.num_prompt_tokens
            );
        }
    }

    #[test]
    fn merges_lowest_rank_first_leftmost_on_ties() {
        let mut encoder: HashMap<String, u32> = HashMap::new();
        for (i, t) in [
            "a", "a</w>", "aa", "aa</w>", "aaa</w>", BOS_TOKEN, EOS_TOKEN,
        ]
        .iter()
        .enumerate()
        {
            encoder.insert(t.to_string(), i as u32);
        }
        let merges = vec![
            ("a".into(), "a".into()),
            ("a".into(), "a</w>".into()),
            ("aa".into(), "a</w>".into()),
        ];
        let vocab = BpeVocab::from_parts(encoder, merges).unwrap();
        let tok = ClipTokenizer::new(vocab);
        // "aaa": (a,a) at 0 first -> [aa, a</w>] -> aaa</w>.
        assert_eq!(tok.tokenize("aaa"), vec![4]);
        // "aaaa": (a,a) at 0 -> [aa, a, a</w>] -> (a,a) at 1 -> [aa, aa</w>]: no merge left.
        assert_eq!(tok.tokenize("aaaa"), vec![2, 3]);
    }

    fn official_tokenizer_json() -> String {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/tests/fixtures/afa/n2/official/tokenizer/tokenizer.json"
        );
        std::fs::read_to_string(path).unwrap()
    }

    #[test]
    fn definition_is_transformers_5s_tokenizer_json() {
        // The tiny fixture folder saved by transformers 5: build ours from its vocabulary and
        // merges, and compare every part of the definition with the saved one.
        let saved: serde_json::Value = serde_json::from_str(&official_tokenizer_json()).unwrap();
        let model = &saved["model"];
        let encoder: HashMap<String, u32> = serde_json::from_value(model["vocab"].clone()).unwrap();
        let merges: Vec<(String, String)> =
            serde_json::from_value(model["merges"].clone()).unwrap();
        let ours = ClipTokenizer::new(BpeVocab::from_parts(encoder, merges).unwrap());
        let ours: serde_json::Value =
            serde_json::from_str(&ours.inner.to_string(false).unwrap()).unwrap();
        for part in [
            "added_tokens",
            "normalizer",
            "pre_tokenizer",
            "post_processor",
            "decoder",
            "model",
        ] {
            assert_eq!(ours[part], saved[part], "{part}");
        }
    }

    #[test]
    fn tokenizer_json_is_used_as_saved() {
        let json = official_tokenizer_json();
        let tok = ClipTokenizer::from_tokenizer_json(&json, TokenizerOptions::default()).unwrap();
        // The file's own truncation/padding to 77 is off: all 100 prompt tokens are counted.
        let t = tok.encode(&"a ".repeat(100));
        assert_eq!((t.num_prompt_tokens, t.ids.len()), (100, 77));
        assert_eq!(
            (tok.bos_id(), tok.eos_id(), tok.vocab_size()),
            (998, 999, 1000)
        );
        let err = ClipTokenizer::from_tokenizer_json("{}", TokenizerOptions::default());
        assert!(matches!(err, Err(ModelError::Tokenizer(_))));
    }
}
