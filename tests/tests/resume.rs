//! `--resume` continues so exactly that the loss curve after resuming equals the uninterrupted
//! run's, with shuffling, packing, gradient accumulation, warmup and a cosine schedule all in play.
// The tests change a few fields of a default config, one per line, for readability.
#![allow(clippy::field_reassign_with_default)]

mod common;

use common::{B, device, losses, write_corpus};
use qwen_sft::optim::OptimizerConfig;
use qwen_sft::schedule::ScheduleKind;
use qwen_sft::{Silent, TrainConfig, train};

fn config(out: &std::path::Path, data: &std::path::Path) -> TrainConfig {
    let mut config = TrainConfig::default();
    config.output_dir = out.to_path_buf();
    config.data.train = vec![data.to_path_buf()];
    config.data.max_len = 64;
    config.data.packing = true;
    config.optim.lr = 2e-3;
    config.optim.schedule = ScheduleKind::Cosine;
    config.optim.warmup_steps = Some(2);
    config.optim.optimizer = OptimizerConfig::Adamw {
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
    };
    config.train.batch_size = 2;
    config.train.grad_accum = 2;
    config.train.epochs = 3;
    config.train.max_steps = Some(8);
    config.checkpoint.every = 4;
    config.checkpoint.keep_last = 5;
    config
}

#[test]
fn resumed_run_has_the_same_loss_curve() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_corpus(&data, 24);

    let full = dir.path().join("full");
    train::<B>(&config(&full, &data), &device(), "cpu", None, &mut Silent).unwrap();
    let uninterrupted = losses(&full);
    assert_eq!(uninterrupted.len(), 8);

    // Resume a fresh run directory from the uninterrupted run's step-4 checkpoint.
    let resumed_dir = dir.path().join("resumed");
    let checkpoint = full.join("checkpoints").join("step-000004");
    train::<B>(
        &config(&resumed_dir, &data),
        &device(),
        "cpu",
        Some(&checkpoint),
        &mut Silent,
    )
    .unwrap();
    let resumed = losses(&resumed_dir);
    assert_eq!(
        resumed.iter().map(|p| p.0).collect::<Vec<_>>(),
        vec![5, 6, 7, 8]
    );
    assert_eq!(
        resumed,
        uninterrupted[4..],
        "the curve after resuming must be identical"
    );

    // Resuming in place from the run directory picks its newest checkpoint and rewrites the log
    // from there; the curve is again the same.
    let again = config(&full, &data);
    let step4 = full.join("checkpoints").join("step-000004");
    train::<B>(&again, &device(), "cpu", Some(&step4), &mut Silent).unwrap();
    assert_eq!(losses(&full), uninterrupted);
}
