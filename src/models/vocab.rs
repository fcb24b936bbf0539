//! The CLIP tokenizer's vocabulary as a value: [`BpeVocab`], a token -> id map plus BPE merges in
//! rank order, with the invariants the `tokenizers` BPE model relies on checked once, and CLIP's
//! standard 49,408-token layout derived from its merges list ([`BpeVocab::from_clip_merges`]).
//! Reading the files that hold one (`vocab.json` + `merges.txt`, `tokenizer.json`, the merges
//! list embedded in the binary) is `loading::tokenizer_files`' job.
use std::collections::HashMap;

use tokenizers::pre_tokenizers::byte_level::ByteLevel;

use super::ModelError;

/// The beginning-of-text token every CLIP vocabulary must contain.
pub const BOS_TOKEN: &str = "<|startoftext|>";
/// The end-of-text token (also CLIP's padding and unknown token).
pub const EOS_TOKEN: &str = "<|endoftext|>";
/// The suffix marking a word's last symbol in CLIP's BPE.
pub const END_OF_WORD: &str = "</w>";
/// Number of merges CLIP uses from its merges list (49,408 - 256 - 256 - 2).
pub const CLIP_NUM_MERGES: usize = 49_152 - 256 - 2;
/// Size of CLIP's vocabulary.
pub const CLIP_VOCAB_SIZE: usize = 49_408;

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
    /// Builds a vocabulary from its parts, checking the invariants:
    /// [`ModelError::MissingSpecialToken`] or [`ModelError::UnknownMergeToken`] otherwise.
    pub fn from_parts(
        encoder: HashMap<String, u32>,
        merges: Vec<(String, String)>,
    ) -> Result<Self, ModelError> {
        for special in [BOS_TOKEN, EOS_TOKEN] {
            if !encoder.contains_key(special) {
                return Err(ModelError::MissingSpecialToken(special));
            }
        }
        for (rank, (a, b)) in merges.iter().enumerate() {
            let joined = format!("{a}{b}");
            if let Some(missing) = [a, b, &joined]
                .into_iter()
                .find(|t| !encoder.contains_key(t.as_str()))
            {
                return Err(ModelError::UnknownMergeToken {
                    rank: rank + 1,
                    left: a.clone(),
                    right: b.clone(),
                    missing: missing.clone(),
                });
            }
        }
        Ok(BpeVocab { encoder, merges })
    }

    /// CLIP's vocabulary from an OpenAI-format merges list (header line already dropped): the
    /// first [`CLIP_NUM_MERGES`] merges; the tokens are the 256 byte-level symbols, the same
    /// with `</w>`, one token per merge, then bos and eos (ids in that order).
    pub fn from_clip_merges(
        merges: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Self, ModelError> {
        let merges: Vec<(String, String)> = merges.into_iter().take(CLIP_NUM_MERGES).collect();
        if merges.len() != CLIP_NUM_MERGES {
            return Err(ModelError::Tokenizer(format!(
                "expected {CLIP_NUM_MERGES} merges after the header, found {}",
                merges.len()
            )));
        }
        // GPT-2's byte symbols in vocabulary order: the printable bytes map to themselves and
        // the others to U+0100.., both in increasing byte order, so this is code point order.
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        let mut tokens: Vec<String> = Vec::with_capacity(CLIP_VOCAB_SIZE);
        tokens.extend(alphabet.iter().map(|c| c.to_string()));
        tokens.extend(alphabet.iter().map(|c| format!("{c}{END_OF_WORD}")));
        tokens.extend(merges.iter().map(|(a, b)| format!("{a}{b}")));
        tokens.push(BOS_TOKEN.to_string());
        tokens.push(EOS_TOKEN.to_string());
        let encoder: HashMap<String, u32> = tokens.into_iter().zip(0u32..).collect();
        if encoder.len() != CLIP_VOCAB_SIZE {
            return Err(ModelError::Tokenizer(format!(
                "derived {} distinct tokens, expected {CLIP_VOCAB_SIZE}",
                encoder.len()
            )));
        }
        Self::from_parts(encoder, merges)
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

#[cfg(test)]
mod tests {
    use super::*;

    fn pair(a: &str, b: &str) -> (String, String) {
        (a.to_string(), b.to_string())
    }

    #[test]
    fn invariants_are_checked() {
        let mut encoder: HashMap<String, u32> = [("a", 0), ("b", 1), (BOS_TOKEN, 2)]
            .into_iter()
            .map(|(t, i)| (t.to_string(), i))
            .collect();
        let err = BpeVocab::from_parts(encoder.clone(), vec![]).unwrap_err();
        assert!(
            matches!(err, ModelError::MissingSpecialToken(EOS_TOKEN)),
            "{err}"
        );
        encoder.insert(EOS_TOKEN.to_string(), 3);
        let err = BpeVocab::from_parts(encoder.clone(), vec![pair("a", "b")]).unwrap_err();
        assert!(err.to_string().contains("\"ab\""), "{err}");
        encoder.insert("ab".to_string(), 4);
        let v = BpeVocab::from_parts(encoder, vec![pair("a", "b")]).unwrap();
        assert_eq!((v.len(), v.merges().len()), (5, 1));
    }

    #[test]
    fn clip_layout_from_merges() {
        // Too few merges is refused; the byte alphabet is GPT-2's, in vocabulary order.
        let err = BpeVocab::from_clip_merges(vec![pair("a", "b")]).unwrap_err();
        assert!(err.to_string().contains("found 1"), "{err}");
        let mut alphabet: Vec<char> = ByteLevel::alphabet().into_iter().collect();
        alphabet.sort_unstable();
        assert_eq!(alphabet.len(), 256);
        assert_eq!(
            (alphabet[0], alphabet[187], alphabet[188]),
            ('!', 'ÿ', '\u{100}')
        );
        assert_eq!(alphabet[255], '\u{143}');
    }
}
