//! The CLIP text tokenizer: prompt text -> the fixed-length id sequence the SD 1.5 text encoder
//! reads. Pure Rust, built from a [`BpeVocab`]; it reproduces HF `transformers`' `CLIPTokenizer`
//! as diffusers' SD pipelines call it (`padding="max_length", max_length=77, truncation=True`).
//!
//! Since transformers 5 `CLIPTokenizer` *is* the `tokenizers`-backed tokenizer (formerly
//! `CLIPTokenizerFast`; the pure-Python "slow" one with its ftfy/`BasicTokenizer` cleanup is
//! gone), and that is the behaviour matched here, step by step:
//!
//! 1. The literal special tokens `<|startoftext|>` / `<|endoftext|>` are cut out of the raw
//!    text (exact, case-sensitive match) and become their ids wherever they appear.
//! 2. Each remaining piece is normalised: Unicode NFC, every run of Unicode whitespace
//!    (`\s+`, e.g. tabs, newlines, NBSP, U+3000) becomes one space, then each *character* is
//!    lowercased on its own (`char::to_lowercase`, so a final `Σ` gives `σ`, not `ς`, and
//!    `İ` gives `i` + U+0307). No ftfy mojibake repair, HTML unescaping or accent stripping
//!    happens; HF's current tokenizer does none either.
//! 3. Pre-tokenisation with CLIP's regex, *without* the case-insensitive flag: the text is
//!    already lowercase, and HF's (Oniguruma) pattern is case-sensitive, so `'ſ` is not `'s`.
//!    Each piece is then re-split by GPT-2's byte-level regex, as HF's `ByteLevel`
//!    pre-tokenizer does; that only matters for an upper-case `<|ENDOFTEXT|>`, which after
//!    lowercasing is split into `<|`, `endoftext`, `|>` rather than mapped to the special id.
//! 4. Each piece's UTF-8 bytes become GPT-2's printable byte symbols, `</w>` is appended to
//!    the last symbol, and merges are applied lowest rank first (leftmost on ties), exactly as
//!    `tokenizers`' BPE model does. A symbol missing from a (small) vocabulary becomes the
//!    unknown token, which for CLIP is `<|endoftext|>`.
//! 5. `bos`, the first `max_len - 2` tokens, `eos`, then padding to `max_len` with the pad id.
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;

use regex::Regex;
use unicode_normalization::UnicodeNormalization;

use crate::loading::tokenizer_files::{BOS_TOKEN, BpeVocab, EOS_TOKEN, byte_level_pairs};

/// SD 1.5's text encoder context length.
pub const DEFAULT_MAX_LEN: usize = 77;

const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";
/// GPT-2's byte-level split; the trailing `\s+` only guarantees no character is ever dropped
/// (pieces reaching it contain no whitespace).
const GPT2_PATTERN: &str = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+";
const END_OF_WORD: &str = "</w>";

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

/// CLIP's byte-level BPE tokenizer. Encoding never fails and never panics on any `&str`.
/// Lookup tables of a tokenizer.
#[derive(Debug)]
struct Tables {
    encoder: HashMap<String, u32>,
    decoder: HashMap<u32, String>,
    /// `(left id, right id)` -> `(rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_decoder: HashMap<char, u8>,
}

#[derive(Debug, Clone)]
pub struct ClipTokenizer {
    /// The vocabulary tables, shared so that a clone (one per served batch) costs nothing.
    tables: Arc<Tables>,
    byte_encoder: [char; 256],
    clip_split: Regex,
    gpt2_split: Regex,
    whitespace: Regex,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_len: usize,
}

impl ClipTokenizer {
    /// A tokenizer with the SD 1.5 defaults (77 ids, padded with eos).
    pub fn new(vocab: BpeVocab) -> Self {
        Self::with_options(vocab, TokenizerOptions::default())
    }

    /// A tokenizer with explicit length / padding options (`max_len` below 2 is raised to 2).
    pub fn with_options(vocab: BpeVocab, options: TokenizerOptions) -> Self {
        let (encoder, merge_list) = vocab.into_parts();
        // `BpeVocab` guarantees both special tokens and every merge's tokens are present;
        // the fallbacks below only keep this constructor total.
        let bos_id = encoder.get(BOS_TOKEN).copied().unwrap_or_default();
        let eos_id = encoder.get(EOS_TOKEN).copied().unwrap_or(bos_id);
        let mut merges = HashMap::with_capacity(merge_list.len());
        for (rank, (a, b)) in (0u32..).zip(&merge_list) {
            let ids = (
                encoder.get(a),
                encoder.get(b),
                encoder.get(&format!("{a}{b}")),
            );
            if let (Some(&a), Some(&b), Some(&ab)) = ids {
                merges.insert((a, b), (rank, ab));
            }
        }
        let decoder = encoder.iter().map(|(s, &id)| (id, s.clone())).collect();
        let mut byte_encoder = ['\0'; 256];
        let mut byte_decoder = HashMap::with_capacity(256);
        for (b, c) in byte_level_pairs() {
            byte_encoder[usize::from(b)] = c;
            byte_decoder.insert(c, b);
        }
        ClipTokenizer {
            tables: Arc::new(Tables {
                encoder,
                decoder,
                merges,
                byte_decoder,
            }),
            byte_encoder,
            clip_split: Regex::new(CLIP_PATTERN).expect("CLIP pattern is a valid regex"),
            gpt2_split: Regex::new(GPT2_PATTERN).expect("GPT-2 pattern is a valid regex"),
            whitespace: Regex::new(r"\s+").expect("whitespace pattern is a valid regex"),
            bos_id,
            eos_id,
            pad_id: options.pad_id.unwrap_or(eos_id),
            max_len: options.max_len.max(2),
        }
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
    pub fn tokenize(&self, text: &str) -> Vec<u32> {
        let mut ids = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            let (plain, special) = self.next_special(rest);
            self.tokenize_plain(&rest[..plain], &mut ids);
            match special {
                Some((id, len)) => {
                    ids.push(id);
                    rest = &rest[plain + len..];
                }
                None => break,
            }
        }
        ids
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

    /// Best-effort text for `ids`: `</w>` becomes a space, byte symbols become bytes (invalid
    /// UTF-8 is replaced), unknown ids are skipped, and the result is trimmed.
    pub fn decode(&self, ids: &[u32]) -> String {
        let joined: String = ids
            .iter()
            .filter_map(|id| self.tables.decoder.get(id))
            .map(String::as_str)
            .collect();
        let mut bytes = Vec::with_capacity(joined.len());
        for c in joined.replace(END_OF_WORD, " ").chars() {
            match self.tables.byte_decoder.get(&c) {
                Some(&b) => bytes.push(b),
                None => bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        String::from_utf8_lossy(&bytes).trim().to_string()
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

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tables.encoder.len()
    }

    /// Byte offset of the next literal special token in `text`, with its id and length
    /// (`text.len()` and `None` when there is none).
    fn next_special(&self, text: &str) -> (usize, Option<(u32, usize)>) {
        [(BOS_TOKEN, self.bos_id), (EOS_TOKEN, self.eos_id)]
            .into_iter()
            .filter_map(|(s, id)| text.find(s).map(|at| (at, Some((id, s.len())))))
            .min_by_key(|&(at, _)| at)
            .unwrap_or((text.len(), None))
    }

    /// Normalises, pre-tokenises and BPE-encodes text that contains no special token.
    fn tokenize_plain(&self, text: &str, out: &mut Vec<u32>) {
        if text.is_empty() {
            return;
        }
        let nfc: String = text.nfc().collect();
        let collapsed = self.whitespace.replace_all(&nfc, " ");
        let lower: String = collapsed.chars().flat_map(char::to_lowercase).collect();
        for word in self.clip_split.find_iter(&lower) {
            for piece in self.gpt2_split.find_iter(word.as_str()) {
                self.bpe(piece.as_str(), out);
            }
        }
    }

    /// Byte-level BPE of one pre-token, appending its ids to `out`.
    fn bpe(&self, piece: &str, out: &mut Vec<u32>) {
        let symbols: Vec<char> = piece
            .bytes()
            .map(|b| self.byte_encoder[usize::from(b)])
            .collect();
        let Some(last) = symbols.len().checked_sub(1) else {
            return;
        };
        let mut key = String::new();
        let ids: Vec<u32> = symbols
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                key.clear();
                key.push(c);
                if i == last {
                    key.push_str(END_OF_WORD);
                }
                self.tables
                    .encoder
                    .get(&key)
                    .copied()
                    .unwrap_or(self.eos_id)
            })
            .collect();
        out.extend(merge_all(ids, &self.tables.merges));
    }
}

/// Applies merges to a word's symbol ids: repeatedly the lowest-rank adjacent pair, the
/// leftmost one on ties, until none applies (the order HF `tokenizers` uses).
fn merge_all(mut ids: Vec<u32>, merges: &HashMap<(u32, u32), (u32, u32)>) -> Vec<u32> {
    const NONE: usize = usize::MAX;
    let n = ids.len();
    let mut next: Vec<usize> = (1..=n).map(|i| if i == n { NONE } else { i }).collect();
    let mut prev: Vec<usize> = (0..n).map(|i| if i == 0 { NONE } else { i - 1 }).collect();
    let mut alive = vec![true; n];
    let mut queue = BinaryHeap::new();
    for i in 1..n {
        if let Some(&(rank, new_id)) = merges.get(&(ids[i - 1], ids[i])) {
            queue.push(Reverse((rank, i - 1, new_id)));
        }
    }
    while let Some(Reverse((rank, pos, new_id))) = queue.pop() {
        let right = next[pos];
        if !alive[pos]
            || right == NONE
            || merges.get(&(ids[pos], ids[right])) != Some(&(rank, new_id))
        {
            continue; // stale entry: one side was merged away since it was queued
        }
        ids[pos] = new_id;
        alive[right] = false;
        next[pos] = next[right];
        if next[pos] != NONE {
            prev[next[pos]] = pos;
        }
        if prev[pos] != NONE
            && let Some(&(r, id)) = merges.get(&(ids[prev[pos]], ids[pos]))
        {
            queue.push(Reverse((r, prev[pos], id)));
        }
        if next[pos] != NONE
            && let Some(&(r, id)) = merges.get(&(ids[pos], ids[next[pos]]))
        {
            queue.push(Reverse((r, pos, id)));
        }
    }
    ids.into_iter()
        .zip(alive)
        .filter_map(|(id, a)| a.then_some(id))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::OnceLock;

    fn clip() -> &'static ClipTokenizer {
        static TOKENIZER: OnceLock<ClipTokenizer> = OnceLock::new();
        TOKENIZER.get_or_init(|| ClipTokenizer::new(BpeVocab::embedded_default().unwrap()))
    }

    #[test]
    fn cat_prompt_matches_clip() {
        let t = clip().encode("a photo of a cat");
        assert_eq!(&t.ids[..7], &[49406, 320, 1125, 539, 320, 2368, 49407]);
        assert_eq!(t.ids.len(), 77);
        assert!(t.ids[7..].iter().all(|&id| id == 49407));
        assert_eq!((t.truncated, t.num_prompt_tokens), (false, 5));
        assert_eq!(clip().truncation_warning(&t), None);
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
        let vocab = BpeVocab::embedded_default().unwrap();
        let tok = ClipTokenizer::with_options(
            vocab,
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
        let path = std::path::Path::new("test");
        let vocab = BpeVocab::from_parts(encoder, merges, path, path).unwrap();
        let tok = ClipTokenizer::new(vocab);
        // "aaa": (a,a) at 0 first -> [aa, a</w>] -> aaa</w>.
        assert_eq!(tok.tokenize("aaa"), vec![4]);
        // "aaaa": (a,a) at 0 -> [aa, a, a</w>] -> (a,a) at 1 -> [aa, aa</w>]: no merge left.
        assert_eq!(tok.tokenize("aaaa"), vec![2, 3]);
    }
}
