//! Properties of the training loop: gradient accumulation normalises by the whole step's
//! supervised tokens, and a non-finite loss stops the run with the last good checkpoint kept.
// The tests change a few fields of a default config, one per line, for readability.
#![allow(clippy::field_reassign_with_default)]

mod common;

use common::{B, device, write_corpus};
use qwen_sft::{StepRecorder, TrainConfig, TrainError, train};

fn base(out: &std::path::Path, data: &std::path::Path) -> TrainConfig {
    let mut config = TrainConfig::default();
    config.output_dir = out.to_path_buf();
    config.data.train = vec![data.to_path_buf()];
    config.data.max_len = 64;
    config.data.shuffle = false;
    config.optim.lr = 1e-3;
    config.train.max_steps = Some(1);
    config.checkpoint.save_final = false;
    config
}

/// One step over 4 chats of different lengths, as one micro-batch of 4 rows or as 2
/// accumulated micro-batches of 2: the loss (normalised by all supervised tokens of the step,
/// not averaged per micro-batch) and the gradient must be the same.
#[test]
fn accumulated_step_equals_the_full_batch() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_corpus(&data, 4);

    let mut full = base(&dir.path().join("full"), &data);
    full.train.batch_size = 4;
    let mut whole = StepRecorder::default();
    train::<B>(&full, &device(), "cpu", None, &mut whole).unwrap();

    let mut split = base(&dir.path().join("split"), &data);
    split.train.batch_size = 2;
    split.train.grad_accum = 2;
    let mut accumulated = StepRecorder::default();
    train::<B>(&split, &device(), "cpu", None, &mut accumulated).unwrap();

    let (a, b) = (&whole.0[0], &accumulated.0[0]);
    println!(
        "full: loss {} |g| {}; accumulated: loss {} |g| {}",
        a.loss, a.grad_norm, b.loss, b.grad_norm
    );
    assert_eq!(a.supervised_tokens, b.supervised_tokens);
    assert!(
        (a.loss - b.loss).abs() < 1e-5 * a.loss,
        "{} vs {}",
        a.loss,
        b.loss
    );
    assert!(
        (a.grad_norm - b.grad_norm).abs() < 1e-4 * a.grad_norm,
        "{} vs {}",
        a.grad_norm,
        b.grad_norm
    );
}

#[test]
fn non_finite_loss_stops_and_keeps_the_last_good_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_corpus(&data, 8);
    let mut config = base(&dir.path().join("run"), &data);
    config.train.batch_size = 2;
    config.train.max_steps = Some(4);
    // A learning rate no model survives: the first update moves every weight by about 1e38.
    config.optim.lr = 1e38;
    config.optim.max_grad_norm = 0.0;
    config.checkpoint.every = 1;
    config.checkpoint.keep_last = 3;
    match train::<B>(
        &config,
        &device(),
        "cpu",
        None,
        &mut StepRecorder::default(),
    ) {
        Err(TrainError::NonFinite {
            step,
            what,
            last_checkpoint,
            ..
        }) => {
            assert_eq!(
                step, 2,
                "the first update is still finite, the second loss is not"
            );
            assert_eq!(what, "loss");
            let kept = last_checkpoint.expect("step 1 was saved");
            assert!(
                kept.ends_with("checkpoints/step-000001"),
                "{}",
                kept.display()
            );
            assert!(kept.join("state.json").exists());
            let message = TrainError::NonFinite {
                step,
                what,
                value: f64::NAN,
                last_checkpoint: Some(kept),
            }
            .to_string();
            assert!(
                message.contains("step 2") && message.contains("step-000001"),
                "{message}"
            );
        }
        other => panic!(
            "expected a non-finite stop, got {:?}",
            other.map(|s| s.steps)
        ),
    }
}

/// bf16 compute with f32 master weights: the first losses follow the f32 run within bf16
/// rounding, and the loss falls as it does in f32 (the CPU runs bf16 too, through flex).
#[test]
fn bf16_compute_tracks_f32() {
    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_corpus(&data, 8);
    let mut runs = Vec::new();
    for precision in [
        qwen_sft::config::Precision::F32,
        qwen_sft::config::Precision::Bf16,
    ] {
        let mut config = base(&dir.path().join(format!("{precision:?}")), &data);
        config.train.batch_size = 4;
        config.train.max_steps = Some(6);
        config.train.epochs = 3;
        config.optim.lr = 3e-3;
        config.train.precision = precision;
        let mut steps = StepRecorder::default();
        train::<B>(&config, &device(), "cpu", None, &mut steps).unwrap();
        runs.push(steps.0);
    }
    let (f32_run, bf16_run) = (&runs[0], &runs[1]);
    println!(
        "f32 losses {:?}\nbf16 losses {:?}",
        f32_run.iter().map(|m| m.loss).collect::<Vec<_>>(),
        bf16_run.iter().map(|m| m.loss).collect::<Vec<_>>()
    );
    let first = (f32_run[0].loss - bf16_run[0].loss).abs() / f32_run[0].loss;
    assert!(first < 1e-2, "first loss differs by {first} relative");
    assert!(
        bf16_run.last().unwrap().loss < bf16_run[0].loss - 0.5,
        "bf16 training must learn"
    );
    assert!(
        bf16_run
            .iter()
            .all(|m| m.loss.is_finite() && m.grad_norm.is_finite())
    );
}

/// burn's balanced activation checkpointing (`train.checkpointing = "balanced"`, the backend
/// `Autodiff<_, BalancedCheckpointing>`) recomputes memory-bound ops in the backward pass
/// instead of storing their outputs. Recomputing the same ops on the same inputs gives the same
/// numbers, so the loss curve and gradient norms equal the plain run's, in f32 and bf16.
#[test]
fn balanced_checkpointing_keeps_the_loss_curve() {
    use burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing;
    use qwen_sft::config::{Checkpointing, Precision};
    type Checkpointed = burn::backend::Autodiff<burn::backend::Flex, BalancedCheckpointing>;

    let dir = tempfile::tempdir().unwrap();
    let data = dir.path().join("data.jsonl");
    write_corpus(&data, 8);
    for precision in [Precision::F32, Precision::Bf16] {
        let mut config = base(&dir.path().join(format!("{precision:?}")), &data);
        config.data.packing = true;
        config.train.batch_size = 2;
        config.train.max_steps = Some(4);
        config.train.epochs = 3;
        config.optim.lr = 3e-3;
        config.train.precision = precision;
        let mut plain = StepRecorder::default();
        train::<B>(&config, &device(), "cpu", None, &mut plain).unwrap();

        config.output_dir = dir.path().join(format!("{precision:?}-checkpointed"));
        config.train.checkpointing = Checkpointing::Balanced;
        let mut checkpointed = StepRecorder::default();
        train::<Checkpointed>(&config, &device(), "cpu", None, &mut checkpointed).unwrap();

        assert_eq!(plain.0.len(), 4);
        for (a, b) in plain.0.iter().zip(&checkpointed.0) {
            println!(
                "{precision:?} step {}: loss {} vs {}, |g| {} vs {}",
                a.step, a.loss, b.loss, a.grad_norm, b.grad_norm
            );
            assert!((a.loss - b.loss).abs() <= 1e-6 * a.loss, "step {}", a.step);
            assert!(
                (a.grad_norm - b.grad_norm).abs() <= 1e-6 * a.grad_norm,
                "step {}",
                a.step
            );
        }
    }
}
