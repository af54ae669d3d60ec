//! Text -> token ids with the `tokenizers` crate, from the `tokenizer.json` embedded in the
//! model file.
//!
//! Hugging Face tokenizer files may switch on fixed-length padding (MiniLM's pads every input
//! to 128). We turn padding off and pad each batch only to its longest input: padding is masked
//! out anyway, and padding to 128 would make short inputs pay for 128 positions.
//!
//! Texts are cut to [`MAX_CHARS_PER_TOKEN`] characters per token of the truncation length
//! before tokenizing: the tokenizer truncates only after encoding the whole text, so a 1 MB body
//! cost seconds and hundreds of MB to keep 128 tokens of it.

use tokenizers::{
    PostProcessor, Tokenizer, TruncationDirection, TruncationParams, TruncationStrategy,
};

use crate::error::{Error, Result};
use crate::format::{ModelFile, Preprocessing};
use crate::models::bert::EncoderInput;

/// Characters kept per token of the truncation length. A WordPiece token covers at most 100
/// characters of a word (longer words become one `[UNK]`), so the cut changes the tokens only of
/// texts whose first tokens span more than that on average (long runs of spaces or of words
/// over 100 characters); ordinary text averages under 10.
pub const MAX_CHARS_PER_TOKEN: usize = 100;

/// The first `max_chars` characters of `text` (cut at a character boundary).
pub fn cut_chars(text: &str, max_chars: usize) -> &str {
    match text.char_indices().nth(max_chars) {
        Some((byte, _)) => &text[..byte],
        None => text,
    }
}

/// One text's tokens, as [`TextTokenizer::tokenize`] makes them (special tokens included,
/// truncated, not padded): the unit a serving request carries from submission to its batch.
#[derive(Clone, Debug, PartialEq)]
pub struct Tokens {
    pub ids: Vec<u32>,
    pub type_ids: Vec<u32>,
}

impl Tokens {
    pub fn len(&self) -> usize {
        self.ids.len()
    }
    pub fn is_empty(&self) -> bool {
        self.ids.is_empty()
    }
}

/// Runs `f`, turning a panic inside the tokenizers crate into an error.
fn no_panic<T>(f: impl FnOnce() -> T) -> Result<T> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|p| {
        let msg = p
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| p.downcast_ref::<&str>().copied())
            .unwrap_or("unknown panic");
        Error::Tokenizer(format!("the tokenizer failed: {msg}"))
    })
}

pub struct TextTokenizer {
    inner: Tokenizer,
    max_length: usize,
    pad_id: u32,
}

impl TextTokenizer {
    /// The tokenizer stored in a model file, with the file's truncation length.
    pub fn from_model(file: &ModelFile) -> Result<TextTokenizer> {
        let (Preprocessing::Text { max_length, .. }, crate::format::Family::Bert(c)) =
            (&file.meta().preprocessing, &file.meta().family)
        else {
            return Err(Error::format(
                file.path(),
                "not a text model (no tokenizer)",
            ));
        };
        let t = Self::from_json(file.tokenizer_json(), *max_length)
            .map_err(|e| Error::format(file.path(), format!("embedded {e}")))?;
        // Every id the tokenizer can produce must index the embedding table.
        if t.vocab_size() > c.vocab_size || t.pad_id as usize >= c.vocab_size {
            return Err(Error::format(
                file.path(),
                format!(
                    "embedded tokenizer has {} tokens (pad id {}) but the model's vocabulary is {}",
                    t.vocab_size(),
                    t.pad_id,
                    c.vocab_size
                ),
            ));
        }
        Ok(t)
    }

    /// Parses a `tokenizer.json`; inputs are truncated to `max_length` tokens (special tokens
    /// included).
    pub fn from_json(json: &str, max_length: usize) -> Result<TextTokenizer> {
        // Parsing can panic inside the tokenizers crate on malformed parts (its decoder
        // deserializer `expect`s); turn that into an error like any other parse failure.
        let mut inner: Tokenizer = no_panic(|| json.parse::<Tokenizer>())?
            .map_err(|e| Error::Tokenizer(format!("cannot parse tokenizer.json: {e}")))?;
        let pad_id = inner.get_padding().map_or(0, |p| p.pad_id);
        inner.with_padding(None);
        // The tokenizers crate subtracts the special tokens from the truncation length.
        let specials = inner
            .get_post_processor()
            .map_or(0, |p| p.added_tokens(false));
        if max_length <= specials {
            return Err(Error::Tokenizer(format!(
                "truncation length {max_length} leaves no room next to {specials} special tokens"
            )));
        }
        inner
            .with_truncation(Some(TruncationParams {
                max_length,
                strategy: TruncationStrategy::LongestFirst,
                stride: 0,
                direction: TruncationDirection::Right,
            }))
            .map_err(|e| Error::Tokenizer(format!("cannot set truncation: {e}")))?;
        let t = TextTokenizer {
            inner,
            max_length,
            pad_id,
        };
        // A tokenizer.json can parse and still be unusable (say, a template naming a special
        // token it does not define, on which the tokenizers crate panics): find out now.
        t.encode(&["a"])
            .map_err(|e| Error::Tokenizer(format!("tokenizer.json does not work: {e}")))?;
        Ok(t)
    }

    /// Largest token id this tokenizer can produce, plus one (special tokens included).
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// Number of tokens (with special tokens, after truncation) of one text.
    pub fn count_tokens(&self, text: &str) -> Result<usize> {
        Ok(self.encode(&[text])?.shape.lengths[0])
    }

    /// Most characters of a text that are tokenized (see [`MAX_CHARS_PER_TOKEN`]).
    pub fn max_chars(&self) -> usize {
        self.max_length.saturating_mul(MAX_CHARS_PER_TOKEN)
    }

    /// Tokenizes one text (cut to [`Self::max_chars`] first, truncated to the truncation
    /// length), without padding.
    pub fn tokenize(&self, text: &str) -> Result<Tokens> {
        let text = cut_chars(text, self.max_chars());
        let e = no_panic(|| self.inner.encode(text, true))?
            .map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
        let len = e
            .get_attention_mask()
            .iter()
            .take_while(|&&m| m != 0)
            .count();
        Ok(Tokens {
            ids: e.get_ids()[..len].to_vec(),
            type_ids: e.get_type_ids().iter().take(len).copied().collect(),
        })
    }

    /// A batch of tokenized texts, padded on the right to the longest.
    pub fn batch(&self, texts: &[&Tokens]) -> Result<EncoderInput> {
        let ids: Vec<Vec<u32>> = texts.iter().map(|t| t.ids.clone()).collect();
        let masks: Vec<Vec<u32>> = texts.iter().map(|t| vec![1; t.ids.len()]).collect();
        let mut input = EncoderInput::from_ids_and_masks(&ids, &masks, self.pad_id)?;
        let seq = input.shape.seq;
        for (b, t) in texts.iter().enumerate() {
            for (p, &ty) in t.type_ids.iter().enumerate().take(seq) {
                input.type_ids[b * seq + p] = ty;
            }
        }
        Ok(input)
    }

    /// Tokenizes a batch, padded on the right to its longest input.
    pub fn encode(&self, texts: &[&str]) -> Result<EncoderInput> {
        if texts.is_empty() {
            return Err(Error::Input("no texts given".into()));
        }
        let max_chars = self.max_chars();
        let texts: Vec<&str> = texts.iter().map(|t| cut_chars(t, max_chars)).collect();
        // The tokenizers crate panics on some malformed files instead of returning an error;
        // never let that reach the caller.
        let encodings = no_panic(|| self.inner.encode_batch(texts, true))?
            .map_err(|e| Error::Tokenizer(format!("cannot encode: {e}")))?;
        let ids: Vec<Vec<u32>> = encodings.iter().map(|e| e.get_ids().to_vec()).collect();
        let masks: Vec<Vec<u32>> = encodings
            .iter()
            .map(|e| e.get_attention_mask().to_vec())
            .collect();
        let mut input = EncoderInput::from_ids_and_masks(&ids, &masks, self.pad_id)?;
        // Segment ids from the tokenizer (all zero for single sentences, but kept faithful).
        let seq = input.shape.seq;
        for (b, e) in encodings.iter().enumerate() {
            for (p, &t) in e.get_type_ids().iter().enumerate().take(seq) {
                input.type_ids[b * seq + p] = t;
            }
        }
        Ok(input)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cuts_at_character_boundaries() {
        assert_eq!(cut_chars("héllo", 2), "hé");
        assert_eq!(cut_chars("héllo", 10), "héllo");
        assert_eq!(cut_chars("日本語", 1), "日");
        assert_eq!(cut_chars("", 3), "");
        assert_eq!(cut_chars("abc", 0), "");
    }
}
