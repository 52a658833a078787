//! Conversations as the rest of the crate sees them: roles, messages, chats.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::error::{ChatError, Result, Source};

/// A message's role. ShareGPT's `human` and `gpt` are read as `User` and `Assistant`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    System,
    User,
    Assistant,
    Tool,
}

impl Role {
    /// The name the chat template sees (`message.role`).
    pub fn as_str(self) -> &'static str {
        match self {
            Role::System => "system",
            Role::User => "user",
            Role::Assistant => "assistant",
            Role::Tool => "tool",
        }
    }

    /// Reads a role name, accepting ShareGPT's aliases (`human`, `gpt`).
    pub fn parse(name: &str) -> Option<Role> {
        match name {
            "system" => Some(Role::System),
            "user" | "human" => Some(Role::User),
            "assistant" | "gpt" => Some(Role::Assistant),
            "tool" => Some(Role::Tool),
            _ => None,
        }
    }
}

/// One message of a chat.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: Role,
    pub content: String,
    /// Overrides the masking mode for this message's turn: `Some(false)` learns nothing from it,
    /// `Some(true)` learns it as the mode learns an assistant turn.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub train: Option<bool>,
    /// Every other field of the message (`tool_calls`, `name`, ...), handed to the template as is.
    #[serde(flatten)]
    pub extra: Map<String, Value>,
}

impl Message {
    pub fn new(role: Role, content: impl Into<String>) -> Self {
        Self {
            role,
            content: content.into(),
            train: None,
            extra: Map::new(),
        }
    }

    pub fn system(content: impl Into<String>) -> Self {
        Self::new(Role::System, content)
    }

    pub fn user(content: impl Into<String>) -> Self {
        Self::new(Role::User, content)
    }

    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new(Role::Assistant, content)
    }

    pub fn tool(content: impl Into<String>) -> Self {
        Self::new(Role::Tool, content)
    }

    /// Sets the per-message override of the masking mode.
    pub fn with_train(mut self, train: bool) -> Self {
        self.train = Some(train);
        self
    }
}

/// A conversation, with the tools offered to the model (if any) and where it came from.
#[derive(Debug, Clone, PartialEq, Default, Serialize, Deserialize)]
pub struct Chat {
    pub messages: Vec<Message>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tools: Option<Vec<Value>>,
    #[serde(default)]
    pub source: Source,
}

impl Chat {
    /// A chat built in code (its source is `<memory>`).
    pub fn new(messages: Vec<Message>) -> Self {
        Self {
            messages,
            tools: None,
            source: Source::memory(),
        }
    }

    pub fn with_tools(mut self, tools: Vec<Value>) -> Self {
        self.tools = Some(tools);
        self
    }

    pub fn with_source(mut self, source: Source) -> Self {
        self.source = source;
        self
    }

    /// A training chat must have messages and at least one assistant turn to learn from.
    pub fn validate_for_training(&self) -> Result<()> {
        if self.messages.is_empty() {
            return Err(ChatError::EmptyChat {
                at: self.source.clone(),
            });
        }
        if !self.messages.iter().any(|m| m.role == Role::Assistant) {
            return Err(ChatError::NoAssistantTurn {
                at: self.source.clone(),
            });
        }
        Ok(())
    }
}
