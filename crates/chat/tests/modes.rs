//! Masking modes: `qwen` against the official Qwen fine-tuning script, and the spans of
//! `last`, `all`, per-message `train` overrides, truncation and dropping.

mod common;

use common::{fixture, ids, ints, tok, tok_qwen2};
use qwen_chat::{
    Chat, DatasetOptions, InspectOptions, Markup, MaskMode, Message, SkipPolicy, Source,
    parse_record,
};

/// The decoded text of the supervised tokens, runs joined by `|`.
fn learned(chat: &Chat, mode: MaskMode) -> String {
    let e = tok().encode_chat(chat, mode).unwrap();
    let mut out = String::new();
    let mut run = Vec::new();
    for (&id, &l) in e.input_ids.iter().zip(&e.labels) {
        if l != -100 {
            run.push(id);
        } else if !run.is_empty() {
            out.push_str(&tok().decode(&run, false).unwrap());
            out.push('|');
            run.clear();
        }
    }
    if !run.is_empty() {
        out.push_str(&tok().decode(&run, false).unwrap());
        out.push('|');
    }
    out
}

fn two_turns() -> Chat {
    Chat::new(vec![
        Message::system("S"),
        Message::user("u1"),
        Message::assistant("a1"),
        Message::user("u2"),
        Message::assistant("a2"),
    ])
}

#[test]
fn qwen_mode_matches_the_official_script() {
    let script = fixture("qwen_script.json");
    let cases = script["cases"].as_array().unwrap();
    assert!(cases.iter().any(|c| c["name"] == "classic_2_plus_2"));
    for case in cases {
        let record = serde_json::json!({
            "system": case["system"],
            "conversations": case["conversations"],
        });
        let chat = parse_record(&record, Source::memory()).unwrap();
        for tok in [tok(), tok_qwen2()] {
            let e = tok.encode_chat(&chat, MaskMode::Qwen).unwrap();
            assert_eq!(e.input_ids, ids(&case["input_ids"]), "{}", case["name"]);
            assert_eq!(e.labels, ints(&case["labels"]), "{}", case["name"]);
        }
    }
}

/// The classic example, spelled out so the expectation is readable without the fixture.
#[test]
fn qwen_mode_classic_example() {
    let chat = Chat::new(vec![
        Message::system("You are a helpful assistant."),
        Message::user("2+2等于几"),
        Message::assistant("2+2等于5。"),
    ]);
    assert_eq!(
        learned(&chat, MaskMode::Qwen),
        "<|im_start|>|<|im_end|>\n<|im_start|>|<|im_end|>\n<|im_start|>|2+2等于5。<|im_end|>\n|"
    );
}

#[test]
fn assistant_mode_learns_newline_content_im_end_newline() {
    assert_eq!(
        learned(&two_turns(), MaskMode::Assistant),
        "\na1<|im_end|>\n|\na2<|im_end|>\n|"
    );
}

#[test]
fn last_mode_learns_only_the_final_assistant_turn() {
    assert_eq!(learned(&two_turns(), MaskMode::Last), "\na2<|im_end|>\n|");
}

#[test]
fn all_mode_learns_everything() {
    let chat = two_turns();
    let e = tok().encode_chat(&chat, MaskMode::All).unwrap();
    assert!(
        e.labels
            .iter()
            .zip(&e.input_ids)
            .all(|(&l, &id)| l == i64::from(id))
    );
}

#[test]
fn train_false_and_true_override_the_mode() {
    let mut chat = two_turns();
    chat.messages[2].train = Some(false);
    assert_eq!(learned(&chat, MaskMode::Assistant), "\na2<|im_end|>\n|");
    assert_eq!(
        learned(&chat, MaskMode::Qwen),
        // The a1 turn is silent as a whole: no <|im_start|>, <|im_end|> or content from it.
        "<|im_start|>|<|im_end|>\n<|im_start|>|<|im_end|>\n|<|im_start|>|<|im_end|>\n<|im_start|>|a2<|im_end|>\n|"
    );
    let all = learned(&chat, MaskMode::All);
    assert!(
        !all.contains("a1") && all.contains("a2") && all.contains("u1"),
        "{all}"
    );

    let mut chat = two_turns();
    chat.messages[1].train = Some(true);
    assert_eq!(
        learned(&chat, MaskMode::Assistant),
        "\nu1<|im_end|>\n|\na1<|im_end|>\n|\na2<|im_end|>\n|"
    );
    chat.messages[2].train = Some(true);
    assert_eq!(
        learned(&chat, MaskMode::Last),
        "\nu1<|im_end|>\n|\na1<|im_end|>\n|\na2<|im_end|>\n|"
    );
}

#[test]
fn train_override_reaches_empty_messages_and_tool_turns() {
    let record = serde_json::json!({"messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": "", "train": false,
         "tool_calls": [{"type": "function", "function": {"name": "w", "arguments": {}}}]},
        {"role": "tool", "content": "sunny"},
        {"role": "assistant", "content": "It is sunny."}
    ]});
    let chat = parse_record(&record, Source::memory()).unwrap();
    assert_eq!(
        learned(&chat, MaskMode::Assistant),
        "\nIt is sunny.<|im_end|>\n|"
    );
}

#[test]
fn truncation_keeps_the_start_and_drops_examples_left_with_nothing() {
    let long_user = "word ".repeat(400);
    let chats = vec![
        Chat::new(vec![Message::user("hi"), Message::assistant("hello")]),
        Chat::new(vec![
            Message::user(long_user.clone()),
            Message::assistant("ok"),
        ]),
        Chat::new(vec![
            Message::user("q"),
            Message::assistant("a ".repeat(400)),
        ]),
    ];
    let opts = DatasetOptions {
        mode: MaskMode::Assistant,
        max_len: 64,
        policy: SkipPolicy::Fail,
    };
    let ds = tok().dataset_from_chats(&chats, &opts).unwrap();
    assert_eq!(ds.report.examples_read, 3);
    assert_eq!(ds.report.kept, 2);
    assert_eq!(ds.report.truncated, 2);
    assert_eq!(ds.report.dropped_no_supervised.len(), 1);
    assert_eq!(ds.examples[1].len(), 64);
    assert!(ds.examples[1].truncated);
    let full = tok().encode_chat(&chats[2], MaskMode::Assistant).unwrap();
    assert_eq!(ds.examples[1].input_ids, full.input_ids[..64]);
    assert_eq!(ds.examples[1].labels, full.labels[..64]);
    assert_eq!(
        ds.report.tokens,
        ds.examples.iter().map(|e| e.len()).sum::<usize>()
    );
    assert_eq!(
        ds.report.supervised_tokens,
        ds.examples
            .iter()
            .map(|e| e.supervised_tokens())
            .sum::<usize>()
    );
}

#[test]
fn a_chat_whose_turns_are_all_train_false_is_dropped_and_counted() {
    let chat = Chat::new(vec![
        Message::user("u"),
        Message::assistant("a").with_train(false),
    ]);
    let ds = tok()
        .dataset_from_chats(&[chat], &DatasetOptions::default())
        .unwrap();
    assert_eq!(ds.report.kept, 0);
    assert_eq!(ds.report.dropped_no_supervised.len(), 1);
    assert_eq!(ds.report.truncated, 0);
}

#[test]
fn inspect_marks_supervised_spans_and_counts() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("d.jsonl");
    std::fs::write(
        &path,
        concat!(
            r#"{"messages": [{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]}"#,
            "\n",
            r#"{"messages": [{"role": "user", "content": "no answer"}]}"#,
            "\n"
        ),
    )
    .unwrap();
    let report = tok()
        .inspect_files(&[&path], &InspectOptions::default())
        .unwrap();
    assert_eq!(report.examples.len(), 1);
    let shown = &report.examples[0].marked;
    assert!(
        shown.ends_with("<|im_start|>user\n2+2?<|im_end|>\n<|im_start|>assistant⟦\n4<|im_end|>\n⟧"),
        "{shown}"
    );
    assert_eq!(report.report.examples_read, 2);
    assert_eq!(report.report.kept, 1);
    assert_eq!(report.report.skipped.len(), 1);
    assert_eq!(report.report.skipped[0].reason, "no_assistant_turn");
    let printed = report.to_string();
    assert!(
        printed.contains("d.jsonl:2: the chat has no assistant turn"),
        "{printed}"
    );
    assert!(printed.contains("supervised tokens:"), "{printed}");

    let ansi = tok()
        .inspect_files(
            &[&path],
            &InspectOptions {
                markup: Markup::Ansi,
                max_len: 20,
                ..InspectOptions::default()
            },
        )
        .unwrap();
    assert!(ansi.examples[0].marked.contains("tokens cut at max_len"));
}
