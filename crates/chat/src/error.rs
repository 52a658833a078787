//! The crate's error type, and `Source`, the file:line every chat carries so errors can point at it.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

/// Where a chat came from: a file and a 1-based line, or `<memory>` for chats built in code.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Source {
    pub file: Arc<str>,
    /// 1-based line number; 0 for chats that did not come from a file.
    pub line: usize,
}

impl Source {
    pub fn new(file: impl Into<Arc<str>>, line: usize) -> Self {
        Self {
            file: file.into(),
            line,
        }
    }

    /// The source of a chat built in code rather than read from a file.
    pub fn memory() -> Self {
        Self::new("<memory>", 0)
    }
}

impl Default for Source {
    fn default() -> Self {
        Self::memory()
    }
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.line == 0 {
            write!(f, "{}", self.file)
        } else {
            write!(f, "{}:{}", self.file, self.line)
        }
    }
}

/// Everything that can go wrong in this crate. Data errors carry the chat's `Source` (file:line)
/// and, where it applies, the JSON field (`messages[2].content`).
#[derive(Debug, thiserror::Error)]
pub enum ChatError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },

    #[error("{path}: cannot load the tokenizer: {source}")]
    TokenizerLoad {
        path: PathBuf,
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("{path}: invalid tokenizer_config.json: {source}")]
    TokenizerConfig {
        path: PathBuf,
        source: serde_json::Error,
    },

    #[error("{path}: {message}")]
    TokenizerConfigField { path: PathBuf, message: String },

    #[error("the tokenizer has no token {token:?}")]
    MissingToken { token: String },

    #[error("invalid chat template: {source}")]
    TemplateSyntax { source: minijinja::Error },

    // ---- bad input, one per chat; all of them carry file:line ----
    #[error("{at}: invalid UTF-8 at byte {byte} of the line")]
    InvalidUtf8 { at: Source, byte: usize },

    #[error("{at}: malformed JSON: {source}")]
    MalformedJson {
        at: Source,
        source: serde_json::Error,
    },

    #[error(
        "{at}: unknown record format: expected an object with `messages`, `conversations`, or `prompt` and `completion`"
    )]
    UnknownFormat { at: Source },

    #[error(
        "{at}: {field}: unknown role {role:?} (expected system, user, assistant or tool; human, gpt)"
    )]
    UnknownRole {
        at: Source,
        field: String,
        role: String,
    },

    #[error("{at}: {field}: missing")]
    MissingField { at: Source, field: String },

    #[error("{at}: {field}: expected {expected}, found {found}")]
    WrongType {
        at: Source,
        field: String,
        expected: &'static str,
        found: &'static str,
    },

    #[error("{at}: empty chat")]
    EmptyChat { at: Source },

    #[error("{at}: the chat has no assistant turn, so there is nothing to learn")]
    NoAssistantTurn { at: Source },

    #[error(
        "{at}: {field} contains the control token {token:?}; only message content may contain control tokens (it is read as plain text there)"
    )]
    ControlTokenInField {
        at: Source,
        field: String,
        token: String,
    },

    #[error("{at}: the chat template failed: {source}")]
    Render {
        at: Source,
        source: minijinja::Error,
    },

    #[error(
        "{at}: the chat template changes message content (strip, split, ...), so content cannot be told apart from template text"
    )]
    ContentNotVerbatim { at: Source },

    #[error("{at}: tokenizing failed: {source}")]
    Encode {
        at: Source,
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    #[error("decoding failed: {source}")]
    Decode {
        source: Box<dyn std::error::Error + Send + Sync>,
    },

    // ---- batching ----
    #[error("{at}: example of {len} tokens does not fit max_len {max_len}")]
    ExampleTooLong {
        at: Source,
        len: usize,
        max_len: usize,
    },

    #[error("invalid loader config: {message}")]
    LoaderConfig { message: String },

    #[error("cannot resume from this cursor: {message}")]
    Cursor { message: String },
}

impl ChatError {
    /// A short stable name for the kind of error, used to count skips by reason.
    pub fn kind(&self) -> &'static str {
        match self {
            ChatError::Io { .. } => "io",
            ChatError::TokenizerLoad { .. } => "tokenizer_load",
            ChatError::TokenizerConfig { .. } | ChatError::TokenizerConfigField { .. } => {
                "tokenizer_config"
            }
            ChatError::MissingToken { .. } => "missing_token",
            ChatError::TemplateSyntax { .. } => "template_syntax",
            ChatError::InvalidUtf8 { .. } => "invalid_utf8",
            ChatError::MalformedJson { .. } => "malformed_json",
            ChatError::UnknownFormat { .. } => "unknown_format",
            ChatError::UnknownRole { .. } => "unknown_role",
            ChatError::MissingField { .. } => "missing_field",
            ChatError::WrongType { .. } => "wrong_type",
            ChatError::EmptyChat { .. } => "empty_chat",
            ChatError::NoAssistantTurn { .. } => "no_assistant_turn",
            ChatError::ControlTokenInField { .. } => "control_token_in_field",
            ChatError::Render { .. } => "template_render",
            ChatError::ContentNotVerbatim { .. } => "content_not_verbatim",
            ChatError::Encode { .. } => "encode",
            ChatError::Decode { .. } => "decode",
            ChatError::ExampleTooLong { .. } => "example_too_long",
            ChatError::LoaderConfig { .. } => "loader_config",
            ChatError::Cursor { .. } => "cursor",
        }
    }

    /// The chat this error is about, for errors about one chat.
    pub fn source_location(&self) -> Option<&Source> {
        match self {
            ChatError::InvalidUtf8 { at, .. }
            | ChatError::MalformedJson { at, .. }
            | ChatError::UnknownFormat { at }
            | ChatError::UnknownRole { at, .. }
            | ChatError::MissingField { at, .. }
            | ChatError::WrongType { at, .. }
            | ChatError::EmptyChat { at }
            | ChatError::NoAssistantTurn { at }
            | ChatError::ControlTokenInField { at, .. }
            | ChatError::Render { at, .. }
            | ChatError::ContentNotVerbatim { at }
            | ChatError::Encode { at, .. }
            | ChatError::ExampleTooLong { at, .. } => Some(at),
            _ => None,
        }
    }
}

pub type Result<T, E = ChatError> = std::result::Result<T, E>;

/// The JSON type name of a value, for `WrongType` messages.
pub(crate) fn json_type_name(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}
