//! Shared helpers: the bundled tokenizer (loaded once) and the golden fixtures.
#![allow(dead_code)]

use std::path::PathBuf;
use std::sync::OnceLock;

use qwen_chat::{Chat, ChatTokenizer, Source, parse_record};
use serde_json::Value;

pub fn tok() -> &'static ChatTokenizer {
    static TOK: OnceLock<ChatTokenizer> = OnceLock::new();
    TOK.get_or_init(|| ChatTokenizer::bundled().expect("bundled tokenizer loads"))
}

/// The bundled tokenizer with the Qwen2-Instruct template.
pub fn tok_qwen2() -> &'static ChatTokenizer {
    static TOK: OnceLock<ChatTokenizer> = OnceLock::new();
    TOK.get_or_init(|| {
        ChatTokenizer::bundled()
            .and_then(|t| t.with_chat_template(qwen_chat::bundled::QWEN2_CHAT_TEMPLATE))
            .expect("qwen2 template compiles")
    })
}

pub fn fixtures_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../tests/fixtures/chat")
}

pub fn fixture(name: &str) -> Value {
    let path = fixtures_dir().join(name);
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).expect("fixture is JSON")
}

pub fn fixture_text(name: &str) -> String {
    std::fs::read_to_string(fixtures_dir().join(name)).expect("fixture exists")
}

/// A fixture case's `messages` (and `tools`) as a chat, through the JSONL record parser.
pub fn chat_of(case: &Value) -> Chat {
    let record = serde_json::json!({
        "messages": case["messages"],
        "tools": case.get("tools").cloned().unwrap_or(Value::Null),
    });
    parse_record(&record, Source::new(case["name"].as_str().unwrap(), 0)).expect("fixture parses")
}

pub fn ids(v: &Value) -> Vec<u32> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_u64().expect("id") as u32)
        .collect()
}

pub fn ints(v: &Value) -> Vec<i64> {
    v.as_array()
        .expect("array")
        .iter()
        .map(|x| x.as_i64().expect("int"))
        .collect()
}

/// Where two id lists first differ, with the tokens around it decoded, for readable failures.
pub fn first_difference(tok: &ChatTokenizer, got: &[u32], want: &[u32]) -> String {
    let at = got
        .iter()
        .zip(want)
        .position(|(a, b)| a != b)
        .unwrap_or(got.len().min(want.len()));
    let window = |v: &[u32]| {
        let lo = at.saturating_sub(3);
        let hi = (at + 4).min(v.len());
        format!(
            "{:?} = {:?}",
            &v[lo..hi],
            tok.decode(&v[lo..hi], false).unwrap_or_default()
        )
    };
    format!(
        "lengths {} vs {}; first difference at {at}: got {} want {}",
        got.len(),
        want.len(),
        window(got),
        window(want)
    )
}
