//! Token-for-token agreement with transformers' `apply_chat_template` for the Qwen2.5 and Qwen2
//! templates, and the `assistant` mode against `return_assistant_tokens_mask` with a
//! `{% generation %}` template. Goldens: tests/fixtures/chat/generate.py.

mod common;

use common::{chat_of, first_difference, fixture, fixture_text, ids, ints, tok, tok_qwen2};
use qwen_chat::{ChatTokenizer, MaskMode};
use serde_json::Value;

fn cases() -> Vec<Value> {
    let goldens = fixture("goldens.json");
    let cases = goldens["cases"].as_array().expect("cases").clone();
    assert!(
        cases.len() >= 20,
        "want 20+ conversations, have {}",
        cases.len()
    );
    cases
}

/// Checks one template's goldens: rendered text, ids, assistant mask and generation prompt.
fn check(tok: &ChatTokenizer, key: &str) -> usize {
    let mut checked = 0;
    for case in cases() {
        let Some(golden) = case.get(key) else {
            continue;
        };
        let name = case["name"].as_str().unwrap();
        let chat = chat_of(&case);

        let text = tok.render(&chat).unwrap();
        assert_eq!(
            text,
            golden["text"].as_str().unwrap(),
            "{key}/{name}: rendered text"
        );

        let encoded = tok.encode_chat(&chat, MaskMode::Assistant).unwrap();
        let want = ids(&golden["input_ids"]);
        assert!(
            encoded.input_ids == want,
            "{key}/{name}: {}",
            first_difference(tok, &encoded.input_ids, &want)
        );

        let mask: Vec<i64> = encoded
            .labels
            .iter()
            .map(|&l| i64::from(l != -100))
            .collect();
        assert_eq!(
            mask,
            ints(&golden["assistant_masks"]),
            "{key}/{name}: assistant mask"
        );
        for ((&l, &id), m) in encoded.labels.iter().zip(&encoded.input_ids).zip(&mask) {
            if *m == 1 {
                assert_eq!(l, i64::from(id), "{key}/{name}: labels are unshifted ids");
            }
        }

        let mut prompt = chat.clone();
        prompt.messages.pop();
        let want_prompt = ids(&golden["prompt_input_ids"]);
        let got_prompt = tok.encode_prompt(&prompt).unwrap();
        assert!(
            got_prompt == want_prompt,
            "{key}/{name} prompt: {}",
            first_difference(tok, &got_prompt, &want_prompt)
        );
        checked += 1;
    }
    checked
}

#[test]
fn qwen2_5_template_matches_transformers() {
    assert!(check(tok(), "qwen2_5") >= 20);
}

#[test]
fn qwen2_template_matches_transformers() {
    assert!(check(tok_qwen2(), "qwen2") >= 20);
}

#[test]
fn generation_tagged_templates_render_the_same() {
    let q25 = ChatTokenizer::bundled()
        .unwrap()
        .with_chat_template(&fixture_text("qwen2_5_generation.jinja"))
        .unwrap();
    assert!(check(&q25, "qwen2_5") >= 20);
    let q2 = ChatTokenizer::bundled()
        .unwrap()
        .with_chat_template(&fixture_text("qwen2_generation.jinja"))
        .unwrap();
    assert!(check(&q2, "qwen2") >= 20);
}

#[test]
fn bundled_qwen2_template_is_the_fixture_template() {
    assert_eq!(
        qwen_chat::bundled::QWEN2_CHAT_TEMPLATE,
        fixture_text("qwen2_chat_template.jinja")
    );
}

/// A model directory without a chat template renders with the built-in Qwen2.5 one.
#[test]
fn no_template_falls_back_to_qwen2_5() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        qwen_chat::bundled::TOKENIZER_JSON,
    )
    .unwrap();
    let mut config: Value =
        serde_json::from_str(qwen_chat::bundled::TOKENIZER_CONFIG_JSON).unwrap();
    config.as_object_mut().unwrap().remove("chat_template");
    std::fs::write(dir.path().join("tokenizer_config.json"), config.to_string()).unwrap();
    let no_template = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert!(check(&no_template, "qwen2_5") >= 20);

    std::fs::remove_file(dir.path().join("tokenizer_config.json")).unwrap();
    let no_config = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert_eq!(no_config.pad_id(), 151_643);
    assert_eq!(no_config.eos_id(), 151_645);
}

/// A `chat_template.jinja` beside the config wins over the config's template, as in transformers.
#[test]
fn chat_template_jinja_file_wins() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("tokenizer.json"),
        qwen_chat::bundled::TOKENIZER_JSON,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("tokenizer_config.json"),
        qwen_chat::bundled::TOKENIZER_CONFIG_JSON,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("chat_template.jinja"),
        qwen_chat::bundled::QWEN2_CHAT_TEMPLATE,
    )
    .unwrap();
    let tok = ChatTokenizer::from_dir(dir.path()).unwrap();
    assert!(check(&tok, "qwen2") >= 20);
}
