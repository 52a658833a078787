//! Tokenization throughput on a generated corpus (`cargo xtask bench-tokenize` prints it as JSON).

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::batch::SplitMix64;
use crate::chat::{Chat, Message};
use crate::dataset::DatasetOptions;
use crate::error::Result;
use crate::report::DataReport;
use crate::tokenizer::ChatTokenizer;

/// The seed of the corpus [`bench_tokenize`] generates.
pub const BENCH_SEED: u64 = 0x5eed;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct BenchReport {
    pub chats: usize,
    pub tokens: usize,
    pub supervised_tokens: usize,
    /// Rayon worker threads.
    pub threads: usize,
    /// Loading the bundled tokenizer (not part of the throughput).
    pub load_seconds: f64,
    /// Rendering, tokenizing and labelling every chat.
    pub seconds: f64,
    pub tokens_per_second: f64,
    pub chats_per_second: f64,
}

/// Generates `n_chats` chats (fixed seed) and times `tokenize_chats` over them with the bundled
/// Qwen2.5 tokenizer, default mode, no truncation.
pub fn bench_tokenize(n_chats: usize) -> Result<BenchReport> {
    let t0 = Instant::now();
    let tok = ChatTokenizer::bundled()?;
    let load_seconds = t0.elapsed().as_secs_f64();
    let chats = synthetic_chats(n_chats, BENCH_SEED);
    let opts = DatasetOptions {
        max_len: usize::MAX,
        ..DatasetOptions::default()
    };
    let mut report = DataReport::default();
    let t1 = Instant::now();
    tok.tokenize_chats(&chats, &opts, &mut report)?;
    let seconds = t1.elapsed().as_secs_f64();
    Ok(BenchReport {
        chats: n_chats,
        tokens: report.tokens,
        supervised_tokens: report.supervised_tokens,
        threads: rayon::current_num_threads(),
        load_seconds,
        seconds,
        tokens_per_second: report.tokens as f64 / seconds.max(1e-9),
        chats_per_second: n_chats as f64 / seconds.max(1e-9),
    })
}

const WORDS: &[&str] = &[
    "the",
    "model",
    "learns",
    "from",
    "data",
    "and",
    "every",
    "token",
    "counts",
    "when",
    "training",
    "a",
    "language",
    "network",
    "with",
    "gradient",
    "descent",
    "on",
    "large",
    "corpora",
    "of",
    "text",
    "quickly",
    "Paris",
    "Rust",
    "tensor",
    "shape",
    "matrix",
    "value",
    "question",
    "answer",
    "isn't",
    "we'll",
    "42",
    "3.14",
    "2024",
    "(see",
    "below)",
    "—",
    "e.g.,",
    "\"quoted\"",
];
const CJK: &[&str] = &[
    "你好",
    "世界",
    "模型",
    "训练",
    "数据",
    "我们",
    "今天",
    "天气",
    "很好",
    "学习",
    "東京",
    "こんにちは",
    "ありがとう",
    "한국어",
    "감사합니다",
];
const EXTRAS: &[&str] = &[
    "🙂",
    "🚀",
    "👨‍👩‍👧",
    "\n",
    "\n\n",
    "  ",
    "\t",
    "```rust\nfn main() {}\n```",
    "Café",
    "naïve",
];

/// A deterministic corpus of varied chats: 1 to 4 exchanges, mixed English, CJK, emoji, code
/// and whitespace, with and without a system prompt.
pub fn synthetic_chats(n: usize, seed: u64) -> Vec<Chat> {
    let mut rng = SplitMix64::for_epoch(seed, 0);
    (0..n)
        .map(|_| {
            let mut messages = Vec::new();
            if rng.below(2) == 0 {
                messages.push(Message::system(sentence(&mut rng, 5, 20)));
            }
            for _ in 0..1 + rng.below(4) {
                messages.push(Message::user(sentence(&mut rng, 5, 60)));
                messages.push(Message::assistant(sentence(&mut rng, 10, 150)));
            }
            Chat::new(messages)
        })
        .collect()
}

fn sentence(rng: &mut SplitMix64, min: usize, max: usize) -> String {
    let n = min + rng.below(max - min + 1);
    let mut out = String::new();
    for i in 0..n {
        let (pool, spaced) = match rng.below(10) {
            0..=6 => (WORDS, true),
            7 | 8 => (CJK, false),
            _ => (EXTRAS, true),
        };
        if i > 0 && spaced {
            out.push(' ');
        }
        out.push_str(pool[rng.below(pool.len())]);
    }
    out
}
