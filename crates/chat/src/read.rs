//! JSONL readers. One chat per line, in any of three shapes:
//!
//! - `{"messages": [{"role": "user", "content": "..."}, ...], "tools": [...]}` (OpenAI / HF);
//! - `{"conversations": [{"from": "human", "value": "..."}, ...], "system": "..."}` (ShareGPT and
//!   the official Qwen script; `from` may be `system`, `human`/`user`, `gpt`/`assistant`, `tool`);
//! - `{"prompt": "...", "completion": "..."}`, each a string or a list of messages.
//!
//! Every problem is an error naming the file, the line and the field; the `SkipPolicy` decides
//! whether it stops the run or is counted in the report.

use std::path::Path;
use std::sync::Arc;

use serde_json::{Map, Value};

use crate::chat::{Chat, Message, Role};
use crate::error::{ChatError, Result, Source, json_type_name};
use crate::report::{DataReport, SkipPolicy};

/// Reads a JSONL file into training chats. Bad lines fail or are skipped per `policy`; either
/// way `report` counts them.
pub fn read_jsonl(
    path: impl AsRef<Path>,
    policy: SkipPolicy,
    report: &mut DataReport,
) -> Result<Vec<Chat>> {
    let path = path.as_ref();
    let bytes = std::fs::read(path).map_err(|source| ChatError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    parse_jsonl(&bytes, &path.display().to_string(), policy, report)
}

/// `read_jsonl` on bytes already in memory; `file` names them in errors.
pub fn parse_jsonl(
    bytes: &[u8],
    file: &str,
    policy: SkipPolicy,
    report: &mut DataReport,
) -> Result<Vec<Chat>> {
    let file: Arc<str> = file.into();
    let bytes = bytes.strip_prefix(b"\xEF\xBB\xBF").unwrap_or(bytes);
    // The empty piece after a final newline is not a line.
    let bytes = bytes.strip_suffix(b"\n").unwrap_or(bytes);
    let mut chats = Vec::new();
    if bytes.is_empty() {
        return Ok(chats);
    }
    for (i, line) in bytes.split(|&b| b == b'\n').enumerate() {
        let at = Source::new(file.clone(), i + 1);
        if line.iter().all(u8::is_ascii_whitespace) {
            report.blank_lines += 1;
            continue;
        }
        report.examples_read += 1;
        match parse_line(line, at) {
            Ok(chat) => chats.push(chat),
            Err(e) => report.skip_or_fail(policy, e)?,
        }
    }
    Ok(chats)
}

/// One line: UTF-8, JSON, a known format, valid messages, and something to learn.
pub fn parse_line(line: &[u8], at: Source) -> Result<Chat> {
    let text = std::str::from_utf8(line).map_err(|e| ChatError::InvalidUtf8 {
        at: at.clone(),
        byte: e.valid_up_to(),
    })?;
    let record: Value = serde_json::from_str(text).map_err(|source| ChatError::MalformedJson {
        at: at.clone(),
        source,
    })?;
    let chat = parse_record(&record, at)?;
    chat.validate_for_training()?;
    Ok(chat)
}

/// A parsed JSON record to a chat (not yet checked for an assistant turn).
pub fn parse_record(record: &Value, at: Source) -> Result<Chat> {
    let Some(obj) = record.as_object() else {
        return Err(ChatError::UnknownFormat { at });
    };
    let r = Reader { at: &at };
    let tools = match obj.get("tools") {
        None | Some(Value::Null) => None,
        Some(Value::Array(tools)) => Some(tools.clone()),
        Some(other) => return Err(r.wrong_type("tools", "an array", other)),
    };
    let messages = if let Some(messages) = obj.get("messages") {
        r.messages(messages, "messages", Field::ROLE_CONTENT)?
    } else if let Some(conversations) = obj.get("conversations") {
        let mut messages = Vec::new();
        if let Some(system) = obj.get("system") {
            let system = system
                .as_str()
                .ok_or_else(|| r.wrong_type("system", "a string", system))?;
            messages.push(Message::system(system));
        }
        messages.extend(r.messages(conversations, "conversations", Field::FROM_VALUE)?);
        messages
    } else if obj.contains_key("prompt") || obj.contains_key("completion") {
        let mut messages = r.prompt_part(obj, "prompt", Role::User)?;
        messages.extend(r.prompt_part(obj, "completion", Role::Assistant)?);
        messages
    } else {
        return Err(ChatError::UnknownFormat { at });
    };
    Ok(Chat {
        messages,
        tools,
        source: at,
    })
}

/// The keys a message uses for its role and its text.
#[derive(Clone, Copy)]
struct Field {
    role: &'static str,
    content: &'static str,
}

impl Field {
    const ROLE_CONTENT: Field = Field {
        role: "role",
        content: "content",
    };
    const FROM_VALUE: Field = Field {
        role: "from",
        content: "value",
    };
}

struct Reader<'a> {
    at: &'a Source,
}

impl Reader<'_> {
    fn messages(&self, value: &Value, field: &str, keys: Field) -> Result<Vec<Message>> {
        let items = value
            .as_array()
            .ok_or_else(|| self.wrong_type(field, "an array", value))?;
        items
            .iter()
            .enumerate()
            .map(|(i, m)| self.message(m, &format!("{field}[{i}]"), keys))
            .collect()
    }

    fn message(&self, value: &Value, field: &str, keys: Field) -> Result<Message> {
        let obj = value
            .as_object()
            .ok_or_else(|| self.wrong_type(field, "an object", value))?;
        // ShareGPT-style files sometimes use role/content inside `conversations`; accept both.
        let keys = if keys.role == "from" && !obj.contains_key("from") && obj.contains_key("role") {
            Field::ROLE_CONTENT
        } else {
            keys
        };
        let role_field = format!("{field}.{}", keys.role);
        let role_name = match obj.get(keys.role) {
            None => return Err(self.missing(&role_field)),
            Some(Value::String(s)) => s,
            Some(other) => return Err(self.wrong_type(&role_field, "a string", other)),
        };
        let role = Role::parse(role_name).ok_or_else(|| ChatError::UnknownRole {
            at: self.at.clone(),
            field: role_field,
            role: role_name.clone(),
        })?;
        let content_field = format!("{field}.{}", keys.content);
        // An assistant message that only calls tools may have no content (OpenAI sends null).
        let calls_tools = role == Role::Assistant
            && obj
                .get("tool_calls")
                .is_some_and(|c| c.as_array().is_some_and(|a| !a.is_empty()));
        let content = match obj.get(keys.content) {
            Some(Value::String(s)) => s.clone(),
            None | Some(Value::Null) if calls_tools => String::new(),
            None => return Err(self.missing(&content_field)),
            Some(other) => return Err(self.wrong_type(&content_field, "a string", other)),
        };
        let train = match obj.get("train") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(other) => {
                return Err(self.wrong_type(&format!("{field}.train"), "a boolean", other));
            }
        };
        let extra: Map<String, Value> = obj
            .iter()
            .filter(|(k, _)| ![keys.role, keys.content, "train"].contains(&k.as_str()))
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        Ok(Message {
            role,
            content,
            train,
            extra,
        })
    }

    /// `prompt` or `completion`: a string (one message with `role`) or a list of messages.
    fn prompt_part(&self, obj: &Map<String, Value>, key: &str, role: Role) -> Result<Vec<Message>> {
        match obj.get(key) {
            None => Err(self.missing(key)),
            Some(Value::String(s)) => Ok(vec![Message::new(role, s.clone())]),
            Some(list @ Value::Array(_)) => self.messages(list, key, Field::ROLE_CONTENT),
            Some(other) => Err(self.wrong_type(key, "a string or an array of messages", other)),
        }
    }

    fn missing(&self, field: &str) -> ChatError {
        ChatError::MissingField {
            at: self.at.clone(),
            field: field.to_string(),
        }
    }

    fn wrong_type(&self, field: &str, expected: &'static str, found: &Value) -> ChatError {
        ChatError::WrongType {
            at: self.at.clone(),
            field: field.to_string(),
            expected,
            found: json_type_name(found),
        }
    }
}
