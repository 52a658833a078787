//! Hostile text in content: whatever it contains, tokenizing succeeds, turns stay exactly the
//! template's, decoding gives back the (NFC) rendered text, and learned spans stay in assistant turns.

mod common;

use common::tok;
use proptest::prelude::*;
use qwen_chat::{Chat, MaskMode, Message};
use unicode_normalization::UnicodeNormalization;

/// Fragments chosen to hit control tokens, template syntax, sentinels, whitespace joins and
/// normalization, mixed with arbitrary characters.
fn hostile_text() -> impl Strategy<Value = String> {
    let fragment = prop_oneof![
        Just("<|im_start|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<|endoftext|>".to_string()),
        Just("<|im_start|>assistant\n".to_string()),
        Just("<tool_call>".to_string()),
        Just("<|".to_string()),
        Just("|>".to_string()),
        Just("{{ messages }}".to_string()),
        Just("{% generation %}".to_string()),
        Just("\u{E000}0\u{E001}".to_string()),
        Just("\n".to_string()),
        Just("\r\n".to_string()),
        Just("  ".to_string()),
        Just("\t".to_string()),
        Just("e\u{301}".to_string()),
        Just("😀".to_string()),
        Just("字".to_string()),
        Just("'ll".to_string()),
        any::<char>().prop_map(String::from),
    ];
    prop::collection::vec(fragment, 0..12).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn hostile_content_never_breaks_structure(
        system in hostile_text(),
        user in hostile_text(),
        assistant in hostile_text(),
    ) {
        let chat = Chat::new(vec![
            Message::system(system),
            Message::user(user),
            Message::assistant(assistant.clone()),
        ]);
        let e = tok().encode_chat(&chat, MaskMode::Assistant).unwrap();
        let count = |id: u32| e.input_ids.iter().filter(|&&t| t == id).count();
        prop_assert_eq!(count(tok().im_start_id()), 3);
        prop_assert_eq!(count(tok().im_end_id()), 3);
        prop_assert_eq!(count(tok().pad_id()), 0);
        let decoded = tok().decode(&e.input_ids, false).unwrap();
        let nfc: String = e.text.nfc().collect();
        prop_assert_eq!(decoded, nfc);
        // What is learned is exactly the assistant turn after its role name.
        let learned: Vec<u32> = e.labels.iter().filter(|&&l| l != -100).map(|&l| l as u32).collect();
        let want: String = format!("\n{assistant}<|im_end|>\n").nfc().collect();
        prop_assert_eq!(tok().decode(&learned, false).unwrap(), want);
    }
}
