//! Chat templates: how an instruct model wants a conversation laid out as text (role markers,
//! a default system prompt, the cue for the assistant's turn). They are Jinja templates, in
//! Hugging Face's `tokenizer_config.json` and in GGUF files (`tokenizer.chat_template`); they
//! are rendered here with minijinja, with the variables those templates expect: `messages`
//! (a list of `{role, content}`), `add_generation_prompt`, `bos_token`, `eos_token`, and the
//! function `raise_exception`. Python string methods (`.strip()`, `.startswith()`, ...) work
//! through minijinja-contrib's pycompat.

use crate::error::{Error, Result};
use crate::gguf::GgufFile;

/// One turn of a conversation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ChatMessage {
    pub role: String,
    pub content: String,
}

impl ChatMessage {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> ChatMessage {
        ChatMessage {
            role: role.into(),
            content: content.into(),
        }
    }
}

/// A model's chat template with the special-token texts it refers to.
#[derive(Clone, Debug)]
pub struct ChatTemplate {
    source: String,
    bos: String,
    eos: String,
}

impl ChatTemplate {
    pub fn new(source: impl Into<String>, bos: impl Into<String>, eos: impl Into<String>) -> Self {
        ChatTemplate {
            source: source.into(),
            bos: bos.into(),
            eos: eos.into(),
        }
    }

    /// The template of a GGUF file (`tokenizer.chat_template`), or None when it has none.
    pub fn from_gguf(g: &GgufFile) -> Result<Option<ChatTemplate>> {
        let Some(v) = g.get("tokenizer.chat_template") else {
            return Ok(None);
        };
        let source = v.as_str().ok_or_else(|| {
            Error::format(
                g.path(),
                format!(
                    "tokenizer.chat_template is a {}, not a string",
                    v.type_name()
                ),
            )
        })?;
        let token = |key: &str| -> String {
            let tokens = g.get("tokenizer.ggml.tokens").and_then(|t| t.as_array());
            g.get(key)
                .and_then(|v| v.as_u64())
                .and_then(|id| tokens.and_then(|t| t.get(id as usize)))
                .and_then(|t| t.as_str())
                .unwrap_or("")
                .to_string()
        };
        Ok(Some(ChatTemplate::new(
            source,
            token("tokenizer.ggml.bos_token_id"),
            token("tokenizer.ggml.eos_token_id"),
        )))
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Text of the beginning-of-sequence token (`bos_token` in the template).
    pub fn bos(&self) -> &str {
        &self.bos
    }

    /// Text of the end-of-sequence token (`eos_token` in the template).
    pub fn eos(&self) -> &str {
        &self.eos
    }

    /// The conversation as the model's prompt text; with `add_generation_prompt`, ending with
    /// the cue for the assistant's reply.
    pub fn render(&self, messages: &[ChatMessage], add_generation_prompt: bool) -> Result<String> {
        let mut env = minijinja::Environment::new();
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function(
            "raise_exception",
            |msg: String| -> std::result::Result<String, minijinja::Error> {
                Err(minijinja::Error::new(
                    minijinja::ErrorKind::InvalidOperation,
                    msg,
                ))
            },
        );
        let bad = |e: minijinja::Error| Error::Input(format!("chat template: {e:#}"));
        env.add_template("chat", &self.source).map_err(bad)?;
        let t = env.get_template("chat").map_err(bad)?;
        let messages: Vec<minijinja::Value> = messages
            .iter()
            .map(|m| minijinja::context! { role => &m.role, content => &m.content })
            .collect();
        t.render(minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos,
            eos_token => &self.eos,
        })
        .map_err(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_chatml_template_with_python_methods() {
        let t = ChatTemplate::new(
            "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content.strip() }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
            "<s>",
            "</s>",
        );
        let text = t
            .render(&[ChatMessage::new("user", "  hi  ")], true)
            .unwrap();
        assert_eq!(
            text,
            "<s><|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
        );
    }

    #[test]
    fn template_errors_name_the_problem() {
        let t = ChatTemplate::new("{% if %}", "", "");
        let e = t.render(&[], true).unwrap_err().to_string();
        assert!(e.contains("chat template"), "{e}");
        let t = ChatTemplate::new("{{ raise_exception('roles must alternate') }}", "", "");
        let e = t.render(&[], true).unwrap_err().to_string();
        assert!(e.contains("roles must alternate"), "{e}");
    }
}
