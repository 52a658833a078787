//! The rest of the public surface: bundled files, special ids, decode, parallel order, bench.

mod common;

use common::tok;
use qwen_chat::{
    Chat, DataReport, DatasetOptions, MaskMode, Message, bench_tokenize, bundled, synthetic_chats,
};

#[test]
fn bundled_tokenizer_is_qwen2_5() {
    let t = tok();
    assert_eq!(t.vocab_size(), 151_665);
    assert_eq!(t.pad_id(), 151_643);
    assert_eq!(t.im_start_id(), 151_644);
    assert_eq!(t.im_end_id(), 151_645);
    assert_eq!(t.eos_id(), 151_645);
    assert_eq!(t.stop_ids(), vec![151_643, 151_645]);
    assert_eq!(t.token_to_id("<think>"), None, "Qwen3-only tokens are gone");
    assert_eq!(t.token_to_id("<|file_sep|>"), Some(151_664));
    assert!(bundled::TOKENIZER_CONFIG_JSON.contains("You are Qwen, created by Alibaba Cloud."));
    assert!(bundled::NOTICE.contains("MIT License") && bundled::NOTICE.contains("Apache"));
}

#[test]
fn decode_round_trips_and_can_skip_control_tokens() {
    let chat = Chat::new(vec![
        Message::user("héllo 世界 👋"),
        Message::assistant("ok"),
    ]);
    let e = tok().encode_chat(&chat, MaskMode::Assistant).unwrap();
    assert_eq!(tok().decode(&e.input_ids, false).unwrap(), e.text);
    let plain = tok().decode(&e.input_ids, true).unwrap();
    assert!(!plain.contains("<|im_start|>") && plain.contains("héllo 世界 👋"));
}

#[test]
fn offsets_cover_the_rendered_text_in_order() {
    let chat = Chat::new(vec![
        Message::user("Cafe\u{301} \r\n  x"),
        Message::assistant("  👨‍👩‍👧 done\n"),
    ]);
    let e = tok().encode_chat(&chat, MaskMode::Assistant).unwrap();
    assert_eq!(e.offsets.len(), e.input_ids.len());
    assert_eq!(e.offsets[0].0, 0);
    assert_eq!(e.offsets.last().unwrap().1, e.text.len());
    for w in e.offsets.windows(2) {
        // Byte-level BPE can split one character over several tokens; they share its offsets.
        assert!(w[0].0 <= w[1].0 && w[0].1 <= w[1].1, "{w:?}");
    }
}

#[test]
fn nfc_is_applied_like_transformers() {
    let decomposed = Chat::new(vec![
        Message::user("Cafe\u{301}"),
        Message::assistant("e\u{301}"),
    ]);
    let composed = Chat::new(vec![
        Message::user("Caf\u{e9}"),
        Message::assistant("\u{e9}"),
    ]);
    let a = tok().encode_chat(&decomposed, MaskMode::Assistant).unwrap();
    let b = tok().encode_chat(&composed, MaskMode::Assistant).unwrap();
    assert_eq!(a.input_ids, b.input_ids);
    assert_eq!(a.labels, b.labels);
}

#[test]
fn parallel_tokenizing_keeps_input_order() {
    let chats = synthetic_chats(200, 5);
    let opts = DatasetOptions {
        max_len: usize::MAX,
        ..DatasetOptions::default()
    };
    let mut report = DataReport::default();
    let examples = tok().tokenize_chats(&chats, &opts, &mut report).unwrap();
    assert_eq!(examples.len(), 200);
    for (chat, example) in chats.iter().zip(&examples) {
        let e = tok().encode_chat(chat, MaskMode::Assistant).unwrap();
        assert_eq!(e.input_ids, example.input_ids);
        assert_eq!(e.labels, example.labels);
    }
}

#[test]
fn synthetic_corpus_is_deterministic() {
    assert_eq!(synthetic_chats(30, 1), synthetic_chats(30, 1));
    assert_ne!(synthetic_chats(30, 1), synthetic_chats(30, 2));
}

#[test]
fn bench_reports_counts() {
    let r = bench_tokenize(40).unwrap();
    assert_eq!(r.chats, 40);
    assert!(r.tokens > r.supervised_tokens && r.supervised_tokens > 0);
    assert!(r.threads >= 1);
    let json = serde_json::to_value(&r).unwrap();
    assert!(json["tokens_per_second"].is_number());
}
