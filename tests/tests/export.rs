//! An exported model directory loads back with identical logits, and carries what transformers
//! and vLLM expect beside the weights.
// The tests change a few fields of a default config, one per line, for readability.
#![allow(clippy::field_reassign_with_default)]

mod common;

use burn::tensor::{DType, Int, Tensor, TensorData};
use common::{B, Inner, device, write_corpus};
use qwen_model::{Qwen2Input, SaveDtype, load_pretrained};
use qwen_sft::{Silent, TrainConfig, train};

fn logits(dir: &std::path::Path) -> Vec<f32> {
    let (_, model) = load_pretrained::<Inner>(dir, &device(), DType::F32).unwrap();
    let ids = Tensor::<Inner, 2, Int>::from_data(
        TensorData::new(vec![151_644i64, 872, 198, 17, 10, 17, 151_645], [1, 7]),
        &device(),
    );
    model
        .forward(&Qwen2Input::new(ids))
        .into_data()
        .to_vec::<f32>()
        .unwrap()
}

#[test]
fn export_then_load_gives_identical_logits() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_corpus(&data, 6);
    let mut config = TrainConfig::default();
    config.output_dir = dir.path().join("run");
    config.data.train = vec![data];
    config.data.max_len = 64;
    config.optim.lr = 1e-3;
    config.train.batch_size = 2;
    config.train.max_steps = Some(3);
    config.checkpoint.export_dtype = SaveDtype::F32;
    let summary = train::<B>(&config, &device(), "cpu", None, &mut Silent).unwrap();

    for file in [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    ] {
        assert!(
            summary.exported.join(file).exists(),
            "{file} missing from the export"
        );
    }
    // The final checkpoint holds the trained f32 weights exactly; the f32 export must equal it.
    let checkpoint = config.output_dir.join("checkpoints/step-000003/model");
    assert_eq!(logits(&summary.exported), logits(&checkpoint));
    // The trained model differs from its random start.
    let start = qwen_sft::source::init_preset::<Inner>("tiny", 0, &device()).unwrap();
    let start_dir = dir.path().join("start");
    qwen_sft::source::export(&start, &start_dir, &Default::default()).unwrap();
    assert_ne!(logits(&summary.exported), logits(&start_dir));
}
