//! Text generation with a decoder model: a [`LanguageModel`] (the decoder, its tokenizer, chat
//! template and stop tokens, all from one GGUF file), the incremental detokenizer that turns a
//! token stream into text as it comes ([`TextStream`]), and the serving engine that runs many
//! generations at once with iteration-level batching ([`engine`]).

pub mod engine;

use std::path::Path;

use crate::backend::decoder::DecoderBackend;
use crate::chat::{ChatMessage, ChatTemplate};
use crate::error::{Error, Result};
use crate::gguf::GgufFile;
use crate::models::llama::Llama;

pub use engine::{
    AsyncGenerationStream, Engine, EngineConfig, EngineStats, FinishReason, GenerateRequest,
    GenerationStats, GenerationStream, TokenEvent,
};

/// A decoder with what turns text into its tokens and back.
pub struct LanguageModel<B: DecoderBackend> {
    pub model: Llama<B>,
    pub tokenizer: tokenizers::Tokenizer,
    /// The chat template of an instruct model (None for a base model).
    pub template: Option<ChatTemplate>,
    /// Tokens that end a generation: the end-of-sequence token and, where the file names it,
    /// the end-of-turn token.
    pub stop: Vec<u32>,
}

/// Whether `path` starts with GGUF's magic (the way a file is told apart, whatever its name).
pub fn is_gguf(path: &Path) -> bool {
    use std::io::Read as _;
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| f.read_exact(&mut magic))
        .is_ok()
        && &magic == b"GGUF"
}

impl<B: DecoderBackend> LanguageModel<B> {
    /// Loads a decoder from a GGUF file or from a model file converted from one (told apart by
    /// their first bytes).
    pub fn open(be: B, path: impl AsRef<Path>) -> Result<LanguageModel<B>> {
        let path = path.as_ref();
        if is_gguf(path) {
            return Self::open_gguf(be, path);
        }
        let file = crate::format::ModelFile::open(path)?;
        let crate::format::Family::Llama(c) = &file.meta().family else {
            return Err(Error::format(
                path,
                format!(
                    "a {} model, not a decoder: `generate` runs llama models (a GGUF file or one \
                     converted from it)",
                    file.meta().family.name()
                ),
            ));
        };
        let tokenizer: tokenizers::Tokenizer = file
            .tokenizer_json()
            .parse()
            .map_err(|e| Error::Tokenizer(format!("{}: {e}", path.display())))?;
        let template = c
            .chat_template
            .as_ref()
            .map(|t| ChatTemplate::new(t.clone(), c.bos_token.clone(), c.eos_token.clone()));
        let stop = c.stop_tokens.clone();
        Ok(LanguageModel {
            model: Llama::load_file(be, &file)?,
            tokenizer,
            template,
            stop,
        })
    }

    /// Loads a `llama` GGUF file onto `be`: weights, tokenizer, chat template, stop tokens.
    pub fn open_gguf(be: B, path: impl AsRef<Path>) -> Result<LanguageModel<B>> {
        let g = GgufFile::open(path)?;
        let tokenizer = crate::gguf::tokenizer::tokenizer(&g)?;
        let template = ChatTemplate::from_gguf(&g)?;
        let stop = crate::models::llama::stop_tokens(&g);
        let model = Llama::load(be, &g)?;
        Ok(LanguageModel {
            model,
            tokenizer,
            template,
            stop,
        })
    }

    /// The prompt's token ids: with the chat template applied (one user turn, after `system`
    /// when given) unless `raw` or the model has none.
    pub fn prompt_ids(&self, prompt: &str, raw: bool, system: Option<&str>) -> Result<Vec<u32>> {
        prompt_ids(&self.tokenizer, self.template.as_ref(), prompt, raw, system)
    }

    /// A detokenizer for one generation.
    pub fn text_stream(&self) -> TextStream<'_> {
        TextStream::new(&self.tokenizer)
    }
}

/// A prompt's token ids: with `template` applied (one user turn, after `system` when given)
/// unless `raw` or there is none.
pub fn prompt_ids(
    tokenizer: &tokenizers::Tokenizer,
    template: Option<&ChatTemplate>,
    prompt: &str,
    raw: bool,
    system: Option<&str>,
) -> Result<Vec<u32>> {
    let text = match (template, raw) {
        (Some(t), false) => {
            let mut msgs = Vec::new();
            if let Some(s) = system {
                msgs.push(ChatMessage::new("system", s));
            }
            msgs.push(ChatMessage::new("user", prompt));
            t.render(&msgs, true)?
        }
        _ => prompt.to_string(),
    };
    let ids = tokenizer
        .encode(text, false)
        .map_err(|e| Error::Tokenizer(e.to_string()))?
        .get_ids()
        .to_vec();
    if ids.is_empty() {
        return Err(Error::Input("the prompt has no tokens".into()));
    }
    Ok(ids)
}

/// Turns tokens into text as they come. A token can end in the middle of a UTF-8 character (byte
/// tokens) or change how the previous ones decode, so each step decodes the tokens since the
/// last complete piece and returns only the new text, holding back a piece that ends in an
/// incomplete character. Special tokens (end of turn, ...) decode to nothing.
pub struct TextStream<'t> {
    tok: &'t tokenizers::Tokenizer,
    ids: Vec<u32>,
    /// Where the tokens not yet released as text begin, and the length of their prefix
    /// already released.
    start: usize,
    released: usize,
}

impl<'t> TextStream<'t> {
    pub fn new(tok: &'t tokenizers::Tokenizer) -> TextStream<'t> {
        TextStream {
            tok,
            ids: Vec::new(),
            start: 0,
            released: 0,
        }
    }

    /// The text that `id` completes (possibly empty).
    pub fn push(&mut self, id: u32) -> Result<String> {
        self.ids.push(id);
        let text = self
            .tok
            .decode(&self.ids[self.start..], true)
            .map_err(|e| Error::Tokenizer(e.to_string()))?;
        // A piece that ends inside a character waits for the next token.
        let Some(new) = text
            .get(self.released..)
            .filter(|_| !text.ends_with('\u{fffd}'))
        else {
            return Ok(String::new());
        };
        let new = new.to_string();
        // Keep a few tokens of context (a BPE decoder may fold a leading space into the next
        // token's text), start afresh after them.
        if self.ids.len() - self.start > 8 {
            self.start = self.ids.len() - 4;
            self.released = self
                .tok
                .decode(&self.ids[self.start..], true)
                .map_err(|e| Error::Tokenizer(e.to_string()))?
                .len();
        } else {
            self.released = text.len();
        }
        Ok(new)
    }
}
