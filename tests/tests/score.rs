//! `score` equals the per-example loss that transformers computes, on the fixture model
//! `fixtures/model/tied_f32` and the chats of `fixtures/score/chats.jsonl`
//! (expected values: `fixtures/score/generate.py`).

mod common;

use burn::tensor::DType;
use common::{Inner, device, fixtures};
use qwen_chat::{ChatTokenizer, DatasetOptions};
use qwen_model::load_pretrained;
use qwen_sft::eval::score_examples;

#[test]
fn score_matches_transformers() {
    let (_, model) =
        load_pretrained::<Inner>(fixtures().join("model/tied_f32"), &device(), DType::F32).unwrap();
    let tokenizer = ChatTokenizer::bundled().unwrap();
    let (examples, _) = qwen_sft::train::load_examples(
        &tokenizer,
        &[fixtures().join("score/chats.jsonl")],
        &DatasetOptions::default(),
    )
    .unwrap();
    let scores = score_examples(&model, &examples, 4, 2048, 64 << 20).unwrap();

    let expected: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(fixtures().join("score/expected.json")).unwrap(),
    )
    .unwrap();
    let expected = expected["scores"].as_array().unwrap();
    assert_eq!(scores.len(), expected.len());
    let mut worst = 0.0f64;
    for (ours, theirs) in scores.iter().zip(expected) {
        assert_eq!(ours.index as u64, theirs["index"].as_u64().unwrap());
        assert_eq!(
            ours.n_tokens as u64,
            theirs["n_tokens"].as_u64().unwrap(),
            "example {}",
            ours.index
        );
        let want = theirs["loss_sum"].as_f64().unwrap();
        let rel = (ours.loss_sum - want).abs() / want.abs();
        worst = worst.max(rel);
    }
    println!("score: worst relative difference {worst:e}");
    assert!(worst < 1e-4, "{worst}");
}
