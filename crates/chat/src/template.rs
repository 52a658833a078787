//! The chat template: a Jinja environment set up like transformers', and a renderer that also
//! reports which bytes of the output are message content.
//!
//! Content is found with sentinels: each non-empty content is replaced by a private-use marker
//! (`\u{E000}3\u{E001}` for message 3), the template is rendered, and the markers are swapped
//! back for the real content while their positions are recorded. The template is then rendered
//! once more with the real content, and the two texts must be equal; if they are not, the
//! template transformed content (strip, split, ...) and the spans would lie, so we refuse.

use std::ops::Range;

use minijinja::value::{Kwargs, Value as JinjaValue};
use minijinja::{Environment, Error as JinjaError, ErrorKind};
use serde_json::{Map, Value};

use crate::chat::Message;

const TEMPLATE_NAME: &str = "chat";

/// Bytes `range` of the rendered text are the content of message `message`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ContentSpan {
    pub range: Range<usize>,
    pub message: usize,
}

/// A rendered chat: the text, and where each message's content sits in it (in text order).
#[derive(Debug, Clone)]
pub(crate) struct Rendered {
    pub text: String,
    pub content_spans: Vec<ContentSpan>,
}

#[derive(Debug)]
pub(crate) enum RenderError {
    Jinja(JinjaError),
    /// The template changed content on its way to the output.
    NotVerbatim,
}

impl From<JinjaError> for RenderError {
    fn from(e: JinjaError) -> Self {
        RenderError::Jinja(e)
    }
}

/// A compiled chat template.
pub(crate) struct ChatTemplate {
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").finish_non_exhaustive()
    }
}

impl ChatTemplate {
    /// Compiles `source` the way transformers does: `trim_blocks` and `lstrip_blocks` on, Python's
    /// string methods (`.strip()`, `.startswith()`, ...), `raise_exception`, and a `tojson` that
    /// prints like Python's `json.dumps` rather than minijinja's HTML-safe one.
    pub fn new(source: &str) -> Result<Self, JinjaError> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_keep_trailing_newline(false);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        env.add_function("raise_exception", raise_exception);
        env.add_filter("tojson", tojson);
        env.add_template_owned(TEMPLATE_NAME, rewrite_generation_tags(source))?;
        Ok(Self { env })
    }

    /// Renders the chat and finds each message's content in the output.
    pub fn render(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
        special_tokens: &[(String, String)],
    ) -> Result<Rendered, RenderError> {
        let (open, close) = pick_sentinels(messages, tools);
        let with_markers = self.render_with(
            messages,
            tools,
            add_generation_prompt,
            special_tokens,
            |i, m| {
                // Empty content stays empty: templates test `if message.content`.
                if m.content.is_empty() {
                    String::new()
                } else {
                    format!("{open}{i}{close}")
                }
            },
        )?;
        let rendered = substitute_sentinels(&with_markers, messages, open, close)?;
        let real = self.render_with(
            messages,
            tools,
            add_generation_prompt,
            special_tokens,
            |_, m| m.content.clone(),
        )?;
        if real != rendered.text {
            return Err(RenderError::NotVerbatim);
        }
        Ok(rendered)
    }

    fn render_with(
        &self,
        messages: &[Message],
        tools: Option<&[Value]>,
        add_generation_prompt: bool,
        special_tokens: &[(String, String)],
        content: impl Fn(usize, &Message) -> String,
    ) -> Result<String, JinjaError> {
        let messages: Vec<Value> = messages
            .iter()
            .enumerate()
            .map(|(i, m)| message_value(m, content(i, m)))
            .collect();
        let mut ctx = Map::new();
        for (name, token) in special_tokens {
            ctx.insert(name.clone(), Value::String(token.clone()));
        }
        ctx.insert("messages".into(), Value::Array(messages));
        if let Some(tools) = tools {
            ctx.insert("tools".into(), Value::Array(tools.to_vec()));
        }
        ctx.insert(
            "add_generation_prompt".into(),
            Value::Bool(add_generation_prompt),
        );
        let template = self.env.get_template(TEMPLATE_NAME)?;
        template.render(JinjaValue::from_serialize(Value::Object(ctx)))
    }
}

/// A message as the template sees it: `role`, `content`, then the extra fields. Like
/// transformers, fields whose value is null are left out, so `message.tool_calls` is undefined
/// rather than none.
fn message_value(message: &Message, content: String) -> Value {
    let mut map = Map::new();
    map.insert("role".into(), Value::String(message.role.as_str().into()));
    map.insert("content".into(), Value::String(content));
    for (key, value) in &message.extra {
        if !value.is_null() {
            map.insert(key.clone(), value.clone());
        }
    }
    Value::Object(map)
}

/// Two private-use characters that occur nowhere in the chat, so a marker cannot be forged by
/// the data. Candidates run through the BMP private-use area, then plane 15.
fn pick_sentinels(messages: &[Message], tools: Option<&[Value]>) -> (char, char) {
    // Fields other than content rarely exist; serialize them once to search them as text.
    let mut others: Vec<String> = messages
        .iter()
        .filter(|m| !m.extra.is_empty())
        .map(|m| Value::Object(m.extra.clone()).to_string())
        .collect();
    if let Some(tools) = tools {
        others.push(Value::Array(tools.to_vec()).to_string());
    }
    let unused = |c: char| {
        !messages.iter().any(|m| m.content.contains(c)) && !others.iter().any(|s| s.contains(c))
    };
    let candidates = (0xE000u32..0xF8FF)
        .step_by(2)
        .chain((0xF0000..0xFFFFD).step_by(2));
    for lo in candidates {
        let (a, b) = (char::from_u32(lo), char::from_u32(lo + 1));
        if let (Some(a), Some(b)) = (a, b)
            && unused(a)
            && unused(b)
        {
            return (a, b);
        }
    }
    // Unreachable in practice: the chat would have to contain ~70k distinct private-use chars.
    ('\u{E000}', '\u{E001}')
}

/// Replaces each `{open}{index}{close}` marker with the content of message `index`, recording
/// the byte range the content lands in.
fn substitute_sentinels(
    with_markers: &str,
    messages: &[Message],
    open: char,
    close: char,
) -> Result<Rendered, RenderError> {
    let mut text = String::with_capacity(with_markers.len() * 2);
    let mut content_spans = Vec::new();
    let mut rest = with_markers;
    while let Some(at) = rest.find(open) {
        text.push_str(&rest[..at]);
        let after = &rest[at + open.len_utf8()..];
        let end = after.find(close).ok_or(RenderError::NotVerbatim)?;
        let index: usize = after[..end].parse().map_err(|_| RenderError::NotVerbatim)?;
        let message = messages.get(index).ok_or(RenderError::NotVerbatim)?;
        let start = text.len();
        text.push_str(&message.content);
        content_spans.push(ContentSpan {
            range: start..text.len(),
            message: index,
        });
        rest = &after[end + close.len_utf8()..];
    }
    text.push_str(rest);
    Ok(Rendered {
        text,
        content_spans,
    })
}

/// transformers' `{% generation %}...{% endgeneration %}` marks what the assistant says, for its
/// `return_assistant_tokens_mask`. We derive masks from the turn structure instead, so the tags
/// only need to render their body: they become `{% if true %}...{% endif %}`, keeping the
/// whitespace-control dashes so the output is unchanged.
pub(crate) fn rewrite_generation_tags(source: &str) -> String {
    let mut out = String::with_capacity(source.len());
    let mut rest = source;
    while let Some(start) = rest.find("{%") {
        let Some(len) = rest[start..].find("%}") else {
            break;
        };
        let tag = &rest[start..start + len + 2];
        let inner = &tag[2..tag.len() - 2];
        let left = if inner.starts_with(['-', '+']) {
            &inner[..1]
        } else {
            ""
        };
        let right = if inner.ends_with(['-', '+']) {
            &inner[inner.len() - 1..]
        } else {
            ""
        };
        let word = inner.trim_matches(['-', '+']).trim();
        out.push_str(&rest[..start]);
        match word {
            "generation" => out.push_str(&format!("{{%{left} if true {right}%}}")),
            "endgeneration" => out.push_str(&format!("{{%{left} endif {right}%}}")),
            _ => out.push_str(tag),
        }
        rest = &rest[start + tag.len()..];
    }
    out.push_str(rest);
    out
}

fn raise_exception(message: String) -> Result<JinjaValue, JinjaError> {
    Err(JinjaError::new(ErrorKind::InvalidOperation, message))
}

/// `tojson` as transformers defines it: Python's `json.dumps(x, ensure_ascii=False, indent=None,
/// separators=None, sort_keys=False)`, so `", "` and `": "` separate items and keys and non-ASCII
/// text is kept. (Floats print as Rust prints them, e.g. `1e20` where Python prints `1e+20`.)
fn tojson(value: JinjaValue, kwargs: Kwargs) -> Result<JinjaValue, JinjaError> {
    let ensure_ascii: Option<bool> = kwargs.get("ensure_ascii")?;
    let indent: Option<usize> = kwargs.get("indent")?;
    let sort_keys: Option<bool> = kwargs.get("sort_keys")?;
    let separators: Option<Vec<String>> = kwargs.get("separators")?;
    kwargs.assert_all_used()?;
    let json = serde_json::to_value(&value).map_err(|e| {
        JinjaError::new(ErrorKind::InvalidOperation, "tojson: cannot serialize").with_source(e)
    })?;
    let (item_sep, key_sep) = match separators.as_deref() {
        Some([item, key]) => (item.clone(), key.clone()),
        Some(_) => {
            return Err(JinjaError::new(
                ErrorKind::InvalidOperation,
                "tojson: separators must be two strings",
            ));
        }
        // Python drops the space after "," when indenting, since a newline follows.
        None if indent.is_some() => (",".into(), ": ".into()),
        None => (", ".into(), ": ".into()),
    };
    let style = PyJson {
        ensure_ascii: ensure_ascii.unwrap_or(false),
        indent,
        sort_keys: sort_keys.unwrap_or(false),
        item_sep,
        key_sep,
    };
    let mut out = String::new();
    style.write(&mut out, &json, 0);
    Ok(JinjaValue::from_safe_string(out))
}

/// Python `json.dumps` formatting.
struct PyJson {
    ensure_ascii: bool,
    indent: Option<usize>,
    sort_keys: bool,
    item_sep: String,
    key_sep: String,
}

impl PyJson {
    fn write(&self, out: &mut String, value: &Value, level: usize) {
        match value {
            Value::Null => out.push_str("null"),
            Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
            Value::Number(n) => out.push_str(&n.to_string()),
            Value::String(s) => self.write_str(out, s),
            Value::Array(items) => {
                if items.is_empty() {
                    out.push_str("[]");
                    return;
                }
                out.push('[');
                for (i, item) in items.iter().enumerate() {
                    self.separate(out, i, level + 1);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push(']');
            }
            Value::Object(map) => {
                if map.is_empty() {
                    out.push_str("{}");
                    return;
                }
                let mut entries: Vec<(&String, &Value)> = map.iter().collect();
                if self.sort_keys {
                    entries.sort_by(|a, b| a.0.cmp(b.0));
                }
                out.push('{');
                for (i, (key, item)) in entries.into_iter().enumerate() {
                    self.separate(out, i, level + 1);
                    self.write_str(out, key);
                    out.push_str(&self.key_sep);
                    self.write(out, item, level + 1);
                }
                self.newline(out, level);
                out.push('}');
            }
        }
    }

    fn separate(&self, out: &mut String, index: usize, level: usize) {
        if index > 0 {
            out.push_str(&self.item_sep);
        }
        self.newline(out, level);
    }

    fn newline(&self, out: &mut String, level: usize) {
        if let Some(width) = self.indent {
            out.push('\n');
            out.push_str(&" ".repeat(width * level));
        }
    }

    fn write_str(&self, out: &mut String, s: &str) {
        out.push('"');
        for c in s.chars() {
            match c {
                '"' => out.push_str("\\\""),
                '\\' => out.push_str("\\\\"),
                '\n' => out.push_str("\\n"),
                '\r' => out.push_str("\\r"),
                '\t' => out.push_str("\\t"),
                '\u{08}' => out.push_str("\\b"),
                '\u{0C}' => out.push_str("\\f"),
                c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
                c if self.ensure_ascii && !c.is_ascii() => {
                    let mut units = [0u16; 2];
                    for unit in c.encode_utf16(&mut units) {
                        out.push_str(&format!("\\u{unit:04x}"));
                    }
                }
                c => out.push(c),
            }
        }
        out.push('"');
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn render(source: &str, ctx: Value) -> String {
        let t = ChatTemplate::new(source).unwrap();
        t.env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(JinjaValue::from_serialize(ctx))
            .unwrap()
    }

    #[test]
    fn tojson_prints_like_python_json_dumps() {
        let v = serde_json::json!({"b": [1, "é\n", null], "a": {"x": true}, "e": {}});
        assert_eq!(
            render("{{ v | tojson }}", serde_json::json!({ "v": v })),
            r#"{"b": [1, "é\n", null], "a": {"x": true}, "e": {}}"#
        );
        assert_eq!(
            render(
                "{{ v | tojson(indent=2, sort_keys=true) }}",
                serde_json::json!({ "v": {"b": 1, "a": [2]} })
            ),
            "{\n  \"a\": [\n    2\n  ],\n  \"b\": 1\n}"
        );
        assert_eq!(
            render(
                "{{ v | tojson(ensure_ascii=true) }}",
                serde_json::json!({ "v": "é😀<" })
            ),
            r#""\u00e9\ud83d\ude00<""#
        );
    }

    #[test]
    fn python_string_methods_and_raise_exception_work() {
        assert_eq!(
            render(
                "{{ s.strip().startswith('a') }} {{ s.split(',')[1] }}",
                serde_json::json!({"s": "  a,b  "})
            ),
            "True b  "
        );
        let t = ChatTemplate::new("{{ raise_exception('nope') }}").unwrap();
        let err = t
            .env
            .get_template(TEMPLATE_NAME)
            .unwrap()
            .render(JinjaValue::from_serialize(serde_json::json!({})))
            .unwrap_err();
        assert!(err.to_string().contains("nope"), "{err}");
    }

    #[test]
    fn generation_tags_render_their_body() {
        assert_eq!(
            rewrite_generation_tags("a{%- generation -%} b {%+ endgeneration %}c"),
            "a{%- if true -%} b {%+ endif %}c"
        );
        assert_eq!(
            render(
                "x{% generation %}y{% endgeneration %}z",
                serde_json::json!({})
            ),
            "xyz"
        );
    }

    #[test]
    fn content_spans_point_at_the_content() {
        let t = ChatTemplate::new(
            "{% for m in messages %}<{{ m.role }}>{{ m.content }}</{{ m.role }}>{% endfor %}",
        )
        .unwrap();
        let messages = vec![
            Message::user("hi \u{E000}0\u{E001}"),
            Message::assistant(""),
        ];
        let r = t.render(&messages, None, false, &[]).unwrap();
        assert_eq!(
            r.text,
            "<user>hi \u{E000}0\u{E001}</user><assistant></assistant>"
        );
        assert_eq!(r.content_spans.len(), 1);
        assert_eq!(
            &r.text[r.content_spans[0].range.clone()],
            messages[0].content
        );
    }

    #[test]
    fn a_template_that_changes_content_is_refused() {
        let t =
            ChatTemplate::new("{% for m in messages %}{{ m.content | trim }}{% endfor %}").unwrap();
        let err = t
            .render(&[Message::user(" padded ")], None, false, &[])
            .unwrap_err();
        assert!(matches!(err, RenderError::NotVerbatim));
    }
}
