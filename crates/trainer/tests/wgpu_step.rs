//! One training step on the wgpu backend (Mesa's software Vulkan in CI), against the same step
//! on the CPU backend. Both start from the same weights (initialisation is host-side and seeded)
//! and see the same batch, so the first loss must agree and the step must move the weights.
//!
//! Run with `cargo test -p qwen-sft --features wgpu --test wgpu_step`; `.ci/run` installs
//! `mesa-vulkan-drivers` first. On Mesa the first step compiles shaders for minutes.
#![cfg(feature = "wgpu")]

use burn::backend::{Autodiff, Flex, Wgpu};
use qwen_sft::metrics::read_losses;
use qwen_sft::{StepRecorder, TrainConfig, train};

fn config(out: &std::path::Path) -> TrainConfig {
    let mut config = TrainConfig::demo();
    config.output_dir = out.to_path_buf();
    config.train.max_steps = Some(1);
    config
}

#[test]
fn one_training_step_on_wgpu_matches_cpu() {
    let dir = tempfile::tempdir().unwrap();
    let mut gpu = StepRecorder::default();
    let summary = train::<Autodiff<Wgpu>>(
        &config(&dir.path().join("wgpu")),
        &Default::default(),
        "wgpu",
        None,
        &mut gpu,
    )
    .unwrap();
    assert_eq!(summary.steps, 1);
    let mut cpu = StepRecorder::default();
    train::<Autodiff<Flex>>(
        &config(&dir.path().join("cpu")),
        &Default::default(),
        "cpu",
        None,
        &mut cpu,
    )
    .unwrap();

    let (g, c) = (&gpu.0[0], &cpu.0[0]);
    println!(
        "wgpu: loss {} |g| {}; cpu: loss {} |g| {}",
        g.loss, g.grad_norm, c.loss, c.grad_norm
    );
    assert!(g.loss.is_finite() && g.grad_norm > 0.0);
    assert!(
        (g.loss - c.loss).abs() < 1e-3 * c.loss,
        "loss: wgpu {} vs cpu {}",
        g.loss,
        c.loss
    );
    assert!(
        (g.grad_norm - c.grad_norm).abs() < 1e-2 * c.grad_norm,
        "grad norm: wgpu {} vs cpu {}",
        g.grad_norm,
        c.grad_norm
    );
    // The exported wgpu model was written and differs from nothing: it loads on the CPU.
    let losses = read_losses(&dir.path().join("wgpu/metrics.jsonl"), "train").unwrap();
    assert_eq!(losses.len(), 1);
    qwen_sft::source::load_dir::<Flex>(&summary.exported, &Default::default()).unwrap();
}
