//! The benchmark entry point runs at a reduced size on the CPU; no assertion on time.

mod common;

use common::{Ad, device};
use qwen_loss::bench::{LossBenchConfig, LossPath, run_loss_bench};

#[test]
fn bench_runs_both_paths_and_serialises() {
    let config = LossBenchConfig {
        tokens: 64,
        hidden: 16,
        vocab: 500,
        supervised: 32,
        warmup: 1,
        iterations: 2,
        paths: vec![LossPath::Chunked, LossPath::Plain],
        options: qwen_loss::CrossEntropyOptions::default().with_chunk_memory_bytes(32 << 10),
    };
    let calls = std::cell::Cell::new(0u64);
    let probe = || {
        calls.set(calls.get() + 1);
        calls.get() * 10
    };
    let report = run_loss_bench::<Ad>(&config, &device(), Some(&probe));
    assert_eq!(report.paths.len(), 2);
    for path in &report.paths {
        assert_eq!(path.iteration_ms.len(), 2);
        assert!(path.loss.is_finite() && path.loss > 0.0);
        assert!(path.peak_bytes_over_baseline.is_some());
    }
    let (chunked, plain) = (report.paths[0].loss, report.paths[1].loss);
    assert!(
        (chunked - plain).abs() <= 1e-5 * plain.abs(),
        "{chunked} vs {plain}"
    );
    let json = serde_json::to_string(&report).unwrap();
    assert!(json.contains("\"chunked\"") && json.contains("\"plain\""));
}
