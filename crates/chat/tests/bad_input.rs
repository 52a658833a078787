//! Every kind of bad input is an error naming file, line and field; `Skip` counts it instead.

mod common;

use common::tok;
use qwen_chat::{ChatError, DataReport, DatasetOptions, SkipPolicy, parse_jsonl, read_jsonl};

/// Parses one line as line 1 of `data.jsonl` and returns the error message.
fn error_of(line: &[u8]) -> String {
    let mut report = DataReport::default();
    let err = parse_jsonl(line, "data.jsonl", SkipPolicy::Fail, &mut report)
        .expect_err("line must be refused");
    err.to_string()
}

#[test]
fn each_bad_line_has_its_message() {
    let cases: &[(&[u8], &str)] = &[
        (
            b"{\"messages\": [",
            "data.jsonl:1: malformed JSON: EOF while parsing a list at line 1 column 14",
        ),
        (
            b"{\"messages\": [{\"role\": \"user\", \"content\": \"caf\xE9\"}]}",
            "data.jsonl:1: invalid UTF-8 at byte 46 of the line",
        ),
        (
            br#"{"messages": [{"role": "wizard", "content": "x"}]}"#,
            "data.jsonl:1: messages[0].role: unknown role \"wizard\" (expected system, user, assistant or tool; human, gpt)",
        ),
        (
            br#"{"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}"#,
            "data.jsonl:1: messages[0].content: missing",
        ),
        (
            br#"{"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}"#,
            "data.jsonl:1: messages[0].content: expected a string, found a number",
        ),
        (
            br#"{"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}"#,
            "data.jsonl:1: messages[0].content: expected a string, found an array",
        ),
        (
            br#"{"messages": [{"role": "user", "content": null}]}"#,
            "data.jsonl:1: messages[0].content: expected a string, found null",
        ),
        (
            br#"{"messages": [{"content": "x"}]}"#,
            "data.jsonl:1: messages[0].role: missing",
        ),
        (br#"{"messages": []}"#, "data.jsonl:1: empty chat"),
        (
            br#"{"messages": [{"role": "user", "content": "x"}]}"#,
            "data.jsonl:1: the chat has no assistant turn, so there is nothing to learn",
        ),
        (
            br#"{"conversations": [{"from": "human", "value": "x"}, {"from": "bot", "value": "y"}]}"#,
            "data.jsonl:1: conversations[1].from: unknown role \"bot\" (expected system, user, assistant or tool; human, gpt)",
        ),
        (
            br#"{"conversations": [{"from": "human", "value": "x"}, {"from": "gpt"}]}"#,
            "data.jsonl:1: conversations[1].value: missing",
        ),
        (
            br#"{"prompt": "x"}"#,
            "data.jsonl:1: completion: missing",
        ),
        (
            br#"{"prompt": "x", "completion": 1}"#,
            "data.jsonl:1: completion: expected a string or an array of messages, found a number",
        ),
        (
            br#"{"text": "x"}"#,
            "data.jsonl:1: unknown record format: expected an object with `messages`, `conversations`, or `prompt` and `completion`",
        ),
        (
            br#"[1, 2]"#,
            "data.jsonl:1: unknown record format: expected an object with `messages`, `conversations`, or `prompt` and `completion`",
        ),
        (
            br#"{"messages": {"role": "user"}}"#,
            "data.jsonl:1: messages: expected an array, found an object",
        ),
        (
            br#"{"messages": [{"role": "user", "content": "x", "train": "yes"}, {"role": "assistant", "content": "y"}]}"#,
            "data.jsonl:1: messages[0].train: expected a boolean, found a string",
        ),
    ];
    for (line, want) in cases {
        assert_eq!(error_of(line), *want);
    }
}

#[test]
fn good_lines_in_all_three_formats_parse() {
    let data = concat!(
        r#"{"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#,
        "\n",
        r#"{"system": "s", "conversations": [{"from": "human", "value": "u"}, {"from": "gpt", "value": "a"}]}"#,
        "\r\n",
        "\n",
        r#"{"conversations": [{"from": "system", "value": "s"}, {"from": "user", "value": "u"}, {"from": "assistant", "value": "a"}]}"#,
        "\n",
        r#"{"prompt": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}], "completion": "a"}"#,
        "\n",
        r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": null, "tool_calls": [{"type": "function", "function": {"name": "f", "arguments": {}}}]}]}"#,
    );
    let mut report = DataReport::default();
    let chats = parse_jsonl(data.as_bytes(), "ok.jsonl", SkipPolicy::Fail, &mut report).unwrap();
    assert_eq!(chats.len(), 5);
    assert_eq!(report.examples_read, 5);
    assert_eq!(report.blank_lines, 1);
    let texts: Vec<String> = chats[..4]
        .iter()
        .map(|c| tok().render(c).unwrap())
        .collect();
    assert!(texts.iter().all(|t| t == &texts[0]), "{texts:?}");
    assert_eq!(chats[3].source.to_string(), "ok.jsonl:5");
    assert!(chats[4].messages[1].extra.contains_key("tool_calls"));
}

#[test]
fn skip_policy_counts_every_skip_with_its_line() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mixed.jsonl");
    let mut data = Vec::new();
    data.extend_from_slice(br#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#);
    data.extend_from_slice(b"\nnot json\n");
    data.extend_from_slice(b"{\"prompt\": \"\xFF\", \"completion\": \"a\"}\n");
    data.extend_from_slice(br#"{"messages": [{"role": "user", "content": "u"}]}"#);
    data.extend_from_slice(b"\n");
    std::fs::write(&path, &data).unwrap();

    let opts = DatasetOptions {
        policy: SkipPolicy::Skip,
        ..DatasetOptions::default()
    };
    let ds = tok().build_dataset(&[&path], &opts).unwrap();
    assert_eq!(ds.report.examples_read, 4);
    assert_eq!(ds.report.kept, 1);
    let lines: Vec<usize> = ds.report.skipped.iter().map(|s| s.at.line).collect();
    assert_eq!(lines, vec![2, 3, 4]);
    let reasons = ds.report.skipped_by_reason();
    assert_eq!(reasons["malformed_json"], 1);
    assert_eq!(reasons["invalid_utf8"], 1);
    assert_eq!(reasons["no_assistant_turn"], 1);
    assert!(
        ds.report.skipped[0]
            .message
            .starts_with(&format!("{}:2: malformed JSON", path.display()))
    );

    let fail = DatasetOptions {
        policy: SkipPolicy::Fail,
        ..DatasetOptions::default()
    };
    let err = tok().build_dataset(&[&path], &fail).unwrap_err();
    assert!(
        matches!(err, ChatError::MalformedJson { ref at, .. } if at.line == 2),
        "{err}"
    );
}

#[test]
fn template_errors_follow_the_policy_with_their_line() {
    let tok = qwen_chat::ChatTokenizer::bundled()
        .unwrap()
        .with_chat_template(
            "{% for m in messages %}{% if m.role == 'tool' %}{{ raise_exception('no tools here') }}{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}",
        )
        .unwrap();
    let data = concat!(
        r#"{"messages": [{"role": "user", "content": "u"}, {"role": "assistant", "content": "a"}]}"#,
        "\n",
        r#"{"messages": [{"role": "tool", "content": "t"}, {"role": "assistant", "content": "a"}]}"#,
        "\n",
    );
    let mut report = DataReport::default();
    let chats = parse_jsonl(data.as_bytes(), "t.jsonl", SkipPolicy::Fail, &mut report).unwrap();
    let opts = DatasetOptions {
        policy: SkipPolicy::Skip,
        ..DatasetOptions::default()
    };
    let examples = tok.tokenize_chats(&chats, &opts, &mut report).unwrap();
    assert_eq!(examples.len(), 1);
    assert_eq!(report.skipped.len(), 1);
    assert_eq!(report.skipped[0].reason, "template_render");
    assert!(
        report.skipped[0]
            .message
            .starts_with("t.jsonl:2: the chat template failed")
    );
    assert!(
        report.skipped[0].message.contains("no tools here"),
        "{}",
        report.skipped[0].message
    );
}

#[test]
fn a_missing_file_names_the_path() {
    let mut report = DataReport::default();
    let err = read_jsonl("/nonexistent/x.jsonl", SkipPolicy::Skip, &mut report).unwrap_err();
    assert!(
        err.to_string().starts_with("/nonexistent/x.jsonl: "),
        "{err}"
    );
}
