#![allow(dead_code)]

use std::path::{Path, PathBuf};

pub type B = burn::backend::Autodiff<burn::backend::Flex>;
pub type Inner = burn::backend::Flex;

pub fn device() -> burn::backend::flex::FlexDevice {
    Default::default()
}

pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures")
}

/// Reads the `(step, loss)` of every train line of a run's metrics.
pub fn losses(run: &Path) -> Vec<(u64, f64)> {
    qwen_sft::metrics::read_losses(&run.join("metrics.jsonl"), "train").unwrap()
}

/// A small corpus of distinct chats of varied length.
pub fn write_corpus(path: &Path, n: usize) {
    let words = [
        "alpha", "beta", "gamma", "delta", "春天", "模型", "data", "token", "🙂", "42",
    ];
    let mut out = String::new();
    for i in 0..n {
        let user: Vec<&str> = (0..(3 + i % 7))
            .map(|k| words[(i * 3 + k) % words.len()])
            .collect();
        let reply: Vec<&str> = (0..(2 + i % 5))
            .map(|k| words[(i * 7 + k * 3) % words.len()])
            .collect();
        let record = serde_json::json!({"messages": [
            {"role": "user", "content": user.join(" ")},
            {"role": "assistant", "content": reply.join(" ")},
        ]});
        out.push_str(&record.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).unwrap();
}
