//! The embedded demo learns the classic example: trained on user "2+2等于几" / assistant
//! "2+2等于5。", the model answers exactly "2+2等于5。".

mod common;

use common::{B, device, losses};
use qwen_chat::{Chat, Message};
use qwen_sft::generate::{GenerationConfig, generate};
use qwen_sft::{Silent, TrainConfig, train};

#[test]
fn demo_learns_the_classic_answer() {
    let out = tempfile::tempdir().unwrap();
    let mut config = TrainConfig::demo();
    config.output_dir = out.path().join("demo");
    let summary = train::<B>(&config, &device(), "cpu", None, &mut Silent).unwrap();
    assert_eq!(summary.steps, 60);

    let curve = losses(&config.output_dir);
    let (first, last) = (curve.first().unwrap().1, curve.last().unwrap().1);
    assert!(
        first > 10.0 && last < 0.2,
        "loss went from {first} to {last}"
    );

    let loaded = qwen_sft::source::load_dir::<common::Inner>(&summary.exported, &device()).unwrap();
    let tokenizer = loaded.files.tokenizer().unwrap();
    let prompt = tokenizer
        .encode_prompt(&Chat::new(vec![
            Message::system("You are a helpful assistant."),
            Message::user("2+2等于几"),
        ]))
        .unwrap();
    let greedy = GenerationConfig::default().greedy();
    let ids = generate(
        &loaded.model,
        &loaded.config,
        &prompt,
        &greedy,
        &tokenizer.stop_ids(),
        tokenizer.vocab_size(),
        0,
        |_| {},
    );
    assert_eq!(tokenizer.decode(&ids, true).unwrap(), "2+2等于5。");
    assert!(config.output_dir.join("loss.png").exists());
}
