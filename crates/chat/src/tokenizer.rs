//! `ChatTokenizer`: `tokenizer.json` + the chat template -> token ids, offsets and labels.
//!
//! Tokenizing follows transformers' `apply_chat_template(tokenize=True)`, which renders the chat
//! to one string and encodes it whole, with one difference: control tokens are recognised only
//! where the template wrote them. The rendered text is split at those positions, and each run of
//! text between two of them (template text and content together, so the pre-tokenizer regex sees
//! exactly what it sees in transformers) is encoded with special-token matching off.

use std::ops::Range;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tokenizers::Tokenizer;

use crate::bundled;
use crate::chat::{Chat, Message};
use crate::error::{ChatError, Result, Source};
use crate::labels::{self, Control, MaskMode};
use crate::template::{ChatTemplate, ContentSpan, RenderError, Rendered};

/// The pad token of Qwen2 models, used when `tokenizer_config.json` names none.
pub const DEFAULT_PAD_TOKEN: &str = "<|endoftext|>";
const IM_START: &str = "<|im_start|>";
const IM_END: &str = "<|im_end|>";

/// A tokenizer plus chat template, able to turn chats into ids and labels.
///
/// Cheap to share across threads (`&ChatTokenizer` is `Sync`); tokenizing runs on rayon.
pub struct ChatTokenizer {
    /// Encodes runs of text between control tokens; special-token matching is off, so control
    /// tokens in content stay text. Non-special added tokens (`<tool_call>`) still match.
    tokenizer: Tokenizer,
    template: ChatTemplate,
    /// Special added tokens (their text and id), longest first so a longer token wins a tie.
    controls: Vec<(String, u32)>,
    /// `bos_token`, `eos_token`, ... as the template sees them.
    template_tokens: Vec<(String, String)>,
    im_start_id: u32,
    im_end_id: u32,
    eos_id: u32,
    pad_id: u32,
}

/// A summary: the full tokenizer's Debug would print the whole vocabulary.
impl std::fmt::Debug for ChatTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTokenizer")
            .field("vocab_size", &self.vocab_size())
            .field("control_tokens", &self.controls.len())
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .finish_non_exhaustive()
    }
}

/// A chat rendered and tokenized, before truncation, with what `inspect` needs to show it.
#[derive(Debug, Clone)]
pub struct EncodedChat {
    /// The rendered text (what transformers' `apply_chat_template(tokenize=False)` returns).
    pub text: String,
    pub input_ids: Vec<u32>,
    /// Byte range of `text` that each token covers.
    pub offsets: Vec<(usize, usize)>,
    /// Unshifted labels: the token id where supervised, -100 elsewhere.
    pub labels: Vec<i64>,
}

impl ChatTokenizer {
    /// Loads `tokenizer.json` and, when present, the chat template from `chat_template.jinja` or
    /// `tokenizer_config.json`'s `chat_template` (as transformers does, the `.jinja` file wins).
    /// Without a template, the built-in Qwen2.5 template is used.
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self> {
        let dir = dir.as_ref();
        let tokenizer_path = dir.join("tokenizer.json");
        let tokenizer_json = read(&tokenizer_path)?;
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.exists() {
            Some(read(&config_path)?)
        } else {
            None
        };
        let mut tok = Self::build(
            &tokenizer_json,
            config.as_deref(),
            &tokenizer_path,
            &config_path,
        )?;
        let jinja_path = dir.join("chat_template.jinja");
        if jinja_path.exists() {
            let source = String::from_utf8(read(&jinja_path)?).map_err(|e| {
                ChatError::TokenizerConfigField {
                    path: jinja_path.clone(),
                    message: format!("not UTF-8: {e}"),
                }
            })?;
            tok = tok.with_chat_template(&source)?;
        }
        Ok(tok)
    }

    /// Loads from the bytes of `tokenizer.json` and, optionally, `tokenizer_config.json`.
    pub fn from_bytes(tokenizer_json: &[u8], tokenizer_config_json: Option<&[u8]>) -> Result<Self> {
        Self::build(
            tokenizer_json,
            tokenizer_config_json,
            Path::new("<tokenizer.json>"),
            Path::new("<tokenizer_config.json>"),
        )
    }

    /// The Qwen2.5 tokenizer and chat template bundled with this crate (works offline).
    pub fn bundled() -> Result<Self> {
        Self::from_bytes(
            bundled::TOKENIZER_JSON,
            Some(bundled::TOKENIZER_CONFIG_JSON.as_bytes()),
        )
    }

    /// Replaces the chat template (for example with the Qwen2 one).
    pub fn with_chat_template(mut self, source: &str) -> Result<Self> {
        self.template =
            ChatTemplate::new(source).map_err(|source| ChatError::TemplateSyntax { source })?;
        Ok(self)
    }

    fn build(
        tokenizer_json: &[u8],
        config_json: Option<&[u8]>,
        tokenizer_path: &Path,
        config_path: &Path,
    ) -> Result<Self> {
        let mut tokenizer =
            Tokenizer::from_bytes(tokenizer_json).map_err(|source| ChatError::TokenizerLoad {
                path: tokenizer_path.to_path_buf(),
                source,
            })?;
        // Runs are pieces of one chat: a truncation or padding setting in tokenizer.json must not
        // apply to them. Truncation to max_len happens on the whole example.
        tokenizer
            .with_truncation(None)
            .map_err(|source| ChatError::TokenizerLoad {
                path: tokenizer_path.to_path_buf(),
                source,
            })?;
        tokenizer.with_padding(None);
        tokenizer.set_encode_special_tokens(true);

        let config = match config_json {
            Some(bytes) => Some(serde_json::from_slice::<Value>(bytes).map_err(|source| {
                ChatError::TokenizerConfig {
                    path: config_path.to_path_buf(),
                    source,
                }
            })?),
            None => None,
        };
        let template_source = match &config {
            Some(c) => chat_template_of(c, config_path)?,
            None => None,
        };
        let template = ChatTemplate::new(
            template_source
                .as_deref()
                .unwrap_or(bundled::QWEN2_5_CHAT_TEMPLATE),
        )
        .map_err(|source| ChatError::TemplateSyntax { source })?;

        let mut controls: Vec<(String, u32)> = tokenizer
            .get_added_tokens_decoder()
            .into_iter()
            .filter(|(_, t)| t.special)
            .map(|(id, t)| (t.content, id))
            .collect();
        controls.sort_by(|a, b| b.0.len().cmp(&a.0.len()).then(a.1.cmp(&b.1)));

        let token_id = |token: &str| {
            tokenizer
                .token_to_id(token)
                .ok_or_else(|| ChatError::MissingToken {
                    token: token.to_string(),
                })
        };
        let named = |name: &str| config.as_ref().and_then(|c| token_name(c.get(name)?));
        let pad_token = named("pad_token").unwrap_or_else(|| DEFAULT_PAD_TOKEN.to_string());
        let eos_token = named("eos_token").unwrap_or_else(|| IM_END.to_string());
        let template_tokens = ["bos_token", "eos_token", "pad_token", "unk_token"]
            .iter()
            .filter_map(|&name| named(name).map(|t| (name.to_string(), t)))
            .collect();
        Ok(Self {
            im_start_id: token_id(IM_START)?,
            im_end_id: token_id(IM_END)?,
            eos_id: token_id(&eos_token)?,
            pad_id: token_id(&pad_token)?,
            tokenizer,
            template,
            controls,
            template_tokens,
        })
    }

    /// `<|endoftext|>` for Qwen2: pads batches.
    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The configured `eos_token` (`<|im_end|>` for Qwen2.5-Instruct).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn im_start_id(&self) -> u32 {
        self.im_start_id
    }

    pub fn im_end_id(&self) -> u32 {
        self.im_end_id
    }

    /// Ids that end a generated reply: `<|im_end|>`, the eos token and the pad token
    /// (`<|endoftext|>`), without duplicates.
    pub fn stop_ids(&self) -> Vec<u32> {
        let mut ids = vec![self.im_end_id, self.eos_id, self.pad_id];
        ids.sort_unstable();
        ids.dedup();
        ids
    }

    /// Vocabulary size including added tokens.
    pub fn vocab_size(&self) -> usize {
        self.tokenizer.get_vocab_size(true)
    }

    /// The id of a token string, if the vocabulary has it.
    pub fn token_to_id(&self, token: &str) -> Option<u32> {
        self.tokenizer.token_to_id(token)
    }

    /// Ids back to text. With `skip_special_tokens`, control tokens are left out.
    pub fn decode(&self, ids: &[u32], skip_special_tokens: bool) -> Result<String> {
        self.tokenizer
            .decode(ids, skip_special_tokens)
            .map_err(|source| ChatError::Decode { source })
    }

    /// The chat rendered by the template, as text.
    pub fn render(&self, chat: &Chat) -> Result<String> {
        Ok(self.render_spans(chat, false)?.text)
    }

    /// Tokenizes a chat and labels it with `mode`, without truncation.
    pub fn encode_chat(&self, chat: &Chat, mode: MaskMode) -> Result<EncodedChat> {
        let rendered = self.render_spans(chat, false)?;
        let (input_ids, offsets, controls) = self.encode_rendered(&rendered, &chat.source)?;
        let turns = labels::find_turns(
            &rendered.text,
            &controls,
            &rendered.content_spans,
            &chat.messages,
        );
        let ranges = labels::supervised_ranges(&rendered.text, &turns, &chat.messages, mode);
        let labels = labels::label_tokens(&input_ids, &offsets, &ranges);
        Ok(EncodedChat {
            text: rendered.text,
            input_ids,
            offsets,
            labels,
        })
    }

    /// The text of `encode_prompt`: the chat rendered with `add_generation_prompt=True`.
    pub fn render_prompt(&self, chat: &Chat) -> Result<String> {
        Ok(self.render_spans(chat, true)?.text)
    }

    /// The ids a model continues from to answer `chat`: the chat rendered with
    /// `add_generation_prompt=True` (ending in `<|im_start|>assistant\n`).
    pub fn encode_prompt(&self, chat: &Chat) -> Result<Vec<u32>> {
        let rendered = self.render_spans(chat, true)?;
        Ok(self.encode_rendered(&rendered, &chat.source)?.0)
    }

    /// Renders with content spans, after refusing control tokens hidden in fields other than
    /// content (tools, tool calls): those are printed by the template as its own text, so they
    /// would become real control tokens.
    fn render_spans(&self, chat: &Chat, add_generation_prompt: bool) -> Result<Rendered> {
        self.check_fields(chat)?;
        self.template
            .render(
                &chat.messages,
                chat.tools.as_deref(),
                add_generation_prompt,
                &self.template_tokens,
            )
            .map_err(|e| match e {
                RenderError::Jinja(source) => ChatError::Render {
                    at: chat.source.clone(),
                    source,
                },
                RenderError::NotVerbatim => ChatError::ContentNotVerbatim {
                    at: chat.source.clone(),
                },
            })
    }

    fn check_fields(&self, chat: &Chat) -> Result<()> {
        let mut fields: Vec<(String, String)> = Vec::new();
        if let Some(tools) = &chat.tools {
            fields.push(("tools".into(), Value::Array(tools.clone()).to_string()));
        }
        for (i, m) in chat.messages.iter().enumerate() {
            for (key, value) in &m.extra {
                fields.push((format!("messages[{i}].{key}"), value.to_string()));
            }
        }
        for (field, text) in fields {
            if let Some((token, _)) = self
                .controls
                .iter()
                .find(|(t, _)| text.contains(t.as_str()))
            {
                return Err(ChatError::ControlTokenInField {
                    at: chat.source.clone(),
                    field,
                    token: token.clone(),
                });
            }
        }
        Ok(())
    }

    /// Encodes rendered text: control tokens where the template wrote them, and every run of text
    /// between them in one piece. Returns ids, byte offsets, and the control tokens' positions.
    #[allow(clippy::type_complexity)]
    fn encode_rendered(
        &self,
        rendered: &Rendered,
        at: &Source,
    ) -> Result<(Vec<u32>, Vec<(usize, usize)>, Vec<(Range<usize>, Control)>)> {
        let text = &rendered.text;
        let hits = self.template_controls(text, &rendered.content_spans);
        let mut ids = Vec::with_capacity(text.len() / 3);
        let mut offsets = Vec::with_capacity(text.len() / 3);
        let mut controls = Vec::with_capacity(hits.len());
        let mut pos = 0;
        for (range, id) in hits {
            self.encode_run(text, pos..range.start, at, &mut ids, &mut offsets)?;
            ids.push(id);
            offsets.push((range.start, range.end));
            let kind = match id {
                id if id == self.im_start_id => Control::ImStart,
                id if id == self.im_end_id => Control::ImEnd,
                _ => Control::Other,
            };
            pos = range.end;
            controls.push((range, kind));
        }
        self.encode_run(text, pos..text.len(), at, &mut ids, &mut offsets)?;
        Ok((ids, offsets, controls))
    }

    fn encode_run(
        &self,
        text: &str,
        run: Range<usize>,
        at: &Source,
        ids: &mut Vec<u32>,
        offsets: &mut Vec<(usize, usize)>,
    ) -> Result<()> {
        if run.is_empty() {
            return Ok(());
        }
        let encoding = self
            .tokenizer
            .encode(&text[run.clone()], false)
            .map_err(|source| ChatError::Encode {
                at: at.clone(),
                source,
            })?;
        ids.extend_from_slice(encoding.get_ids());
        offsets.extend(
            encoding
                .get_offsets()
                .iter()
                .map(|&(s, e)| (run.start + s, run.start + e)),
        );
        Ok(())
    }

    /// The control tokens in the template's own text (outside every content span), in order.
    fn template_controls(&self, text: &str, content: &[ContentSpan]) -> Vec<(Range<usize>, u32)> {
        let mut hits = Vec::new();
        let mut gap_start = 0;
        let gaps = content
            .iter()
            .map(|s| s.range.clone())
            .chain(std::iter::once(text.len()..text.len()));
        for span in gaps {
            self.find_controls(text, gap_start..span.start, &mut hits);
            gap_start = span.end;
        }
        hits
    }

    /// Leftmost control tokens in `text[gap]`, preferring the longest at a position.
    /// Gaps are template text only (short), so a plain search per token is fast enough.
    fn find_controls(&self, text: &str, gap: Range<usize>, hits: &mut Vec<(Range<usize>, u32)>) {
        let mut pos = gap.start;
        loop {
            let window = &text[pos..gap.end];
            // `controls` is longest first and `min_by_key` keeps the first minimum.
            let found = self
                .controls
                .iter()
                .filter_map(|(t, id)| window.find(t.as_str()).map(|at| (at, t.len(), *id)))
                .min_by_key(|&(at, _, _)| at);
            let Some((at, len, id)) = found else {
                return;
            };
            hits.push((pos + at..pos + at + len, id));
            pos += at + len;
        }
    }
}

/// A special-token setting from tokenizer_config.json: a string, or `{"content": ...}`.
fn token_name(value: &Value) -> Option<String> {
    match value {
        Value::String(s) => Some(s.clone()),
        Value::Object(o) => o.get("content")?.as_str().map(str::to_string),
        _ => None,
    }
}

/// `chat_template` is a string, or a list of `{name, template}` of which we take `default`.
fn chat_template_of(config: &Value, path: &Path) -> Result<Option<String>> {
    let bad = |message: &str| ChatError::TokenizerConfigField {
        path: path.to_path_buf(),
        message: message.to_string(),
    };
    match config.get("chat_template") {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s.clone())),
        Some(Value::Array(named)) => {
            let default = named
                .iter()
                .find(|t| t.get("name").and_then(Value::as_str) == Some("default"))
                .ok_or_else(|| bad("chat_template: a list without a \"default\" template"))?;
            let template = default
                .get("template")
                .and_then(Value::as_str)
                .ok_or_else(|| bad("chat_template: \"default\" has no string \"template\""))?;
            Ok(Some(template.to_string()))
        }
        Some(_) => Err(bad("chat_template: expected a string or a list")),
    }
}

fn read(path: &PathBuf) -> Result<Vec<u8>> {
    std::fs::read(path).map_err(|source| ChatError::Io {
        path: path.clone(),
        source,
    })
}

/// Lets `encode_prompt(&messages.into())` take plain messages.
impl From<Vec<Message>> for Chat {
    fn from(messages: Vec<Message>) -> Self {
        Chat::new(messages)
    }
}
