//! The plain-versus-chunked benchmark behind `cargo xtask bench-loss`.
//!
//! [`run_loss_bench`] builds random hidden states, an lm_head weight and targets with a given
//! share supervised, then times forward + backward of both paths and reports it as JSON-ready
//! data. Tests run it at a reduced size and never assert on time.

use std::time::Instant;

use burn::tensor::{
    Distribution, ElementConversion, Int, Tensor, TensorData,
    backend::{AutodiffBackend, Backend},
};
use serde::Serialize;

use crate::{
    ChunkPlan, ChunkedCeBackend, CrossEntropyOptions, IGNORE_INDEX, Reduction,
    chunked_lm_head_cross_entropy, masked_cross_entropy,
};

/// Which path a measurement is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum LossPath {
    /// `hidden @ weight^T`, then [`masked_cross_entropy`].
    Plain,
    /// [`chunked_lm_head_cross_entropy`].
    Chunked,
}

/// The problem and the schedule of one benchmark.
#[derive(Debug, Clone, Serialize)]
pub struct LossBenchConfig {
    /// Rows of hidden states (tokens).
    pub tokens: usize,
    /// Hidden size.
    pub hidden: usize,
    /// Vocabulary size.
    pub vocab: usize,
    /// How many of the tokens are supervised (every other one first, then the rest ignored).
    pub supervised: usize,
    /// Untimed iterations first.
    pub warmup: usize,
    /// Timed iterations.
    pub iterations: usize,
    /// Which paths to run, in order.
    pub paths: Vec<LossPath>,
    /// Loss options (the reduction is forced to `Sum`, normalised by the token count).
    pub options: CrossEntropyOptions,
}

impl LossBenchConfig {
    /// The size: Qwen2.5-0.5B's hidden 896 and vocabulary 151,936, 16,384 tokens with
    /// half of them supervised.
    pub fn qwen_0_5b() -> Self {
        Self {
            tokens: 16_384,
            hidden: 896,
            vocab: 151_936,
            supervised: 8_192,
            warmup: 1,
            iterations: 3,
            paths: vec![LossPath::Chunked, LossPath::Plain],
            options: CrossEntropyOptions::default(),
        }
    }
}

/// The measurements of one path.
#[derive(Debug, Clone, Serialize)]
pub struct PathReport {
    /// Which path.
    pub path: LossPath,
    /// Wall time of each timed forward + backward, in milliseconds, synced with the device.
    pub iteration_ms: Vec<f64>,
    /// The smallest of `iteration_ms`.
    pub best_ms: f64,
    /// The mean of `iteration_ms`.
    pub mean_ms: f64,
    /// The normalised loss of the last iteration.
    pub loss: f32,
    /// The probe's largest reading, minus its reading before the path ran, in bytes.
    pub peak_bytes_over_baseline: Option<u64>,
}

/// The whole report.
#[derive(Debug, Clone, Serialize)]
pub struct LossBenchReport {
    /// `Backend::name` of the device.
    pub backend: String,
    /// The configuration that ran.
    pub config: LossBenchConfig,
    /// The chunked path's tiling at this size.
    pub chunk_plan: ChunkPlan,
    /// One entry per path, in the configured order.
    pub paths: Vec<PathReport>,
}

/// Runs the benchmark on `device`.
///
/// `memory_probe` reads the device's memory in use (e.g. CubeCL's `memory_usage()`), if the
/// caller has a way to; it is read after each forward and each backward, so its peak misses
/// transients inside one op unless the probe itself reports a high-water mark (a pool's
/// reserved bytes do). Weight and hidden states are allocated before the baseline reading.
pub fn run_loss_bench<B>(
    config: &LossBenchConfig,
    device: &B::Device,
    memory_probe: Option<&dyn Fn() -> u64>,
) -> LossBenchReport
where
    B: AutodiffBackend + ChunkedCeBackend,
{
    assert!(
        config.supervised <= config.tokens,
        "run_loss_bench: {} supervised of {} tokens",
        config.supervised,
        config.tokens
    );
    B::seed(device, 0);
    let hidden = Tensor::<B, 2>::random(
        [config.tokens, config.hidden],
        Distribution::Normal(0.0, 1.0),
        device,
    )
    .require_grad();
    let weight = Tensor::<B, 2>::random(
        [config.vocab, config.hidden],
        Distribution::Normal(0.0, 0.02),
        device,
    )
    .require_grad();
    let targets = bench_targets::<B>(config, device);
    let options = config.options.clone().with_reduction(Reduction::Sum);
    B::sync(device).expect("device sync");

    let paths = config
        .paths
        .iter()
        .map(|&path| {
            let baseline = memory_probe.map(|probe| probe());
            let mut peak = baseline;
            let mut observe = || {
                if let Some(probe) = memory_probe {
                    B::sync(device).expect("device sync");
                    let now = probe();
                    peak = peak.max(Some(now));
                }
            };
            let mut iteration_ms = Vec::new();
            let mut loss = f32::NAN;
            for iteration in 0..config.warmup + config.iterations {
                let start = Instant::now();
                let out = match path {
                    LossPath::Plain => {
                        let logits = hidden.clone().matmul(weight.clone().transpose()); // [N, vocab]
                        masked_cross_entropy(logits, targets.clone(), &options)
                    }
                    LossPath::Chunked => chunked_lm_head_cross_entropy(
                        hidden.clone(),
                        weight.clone(),
                        targets.clone(),
                        &options,
                    ),
                }
                .expect("benchmark targets are in range");
                let normalized = out.normalized_by(out.n_tokens);
                observe();
                let grads = normalized.clone().backward();
                let grad_hidden = hidden.grad(&grads).expect("hidden gradient");
                let grad_weight = weight.grad(&grads).expect("weight gradient");
                B::sync(device).expect("device sync");
                let elapsed = start.elapsed().as_secs_f64() * 1e3;
                observe();
                drop((grads, grad_hidden, grad_weight));
                if iteration >= config.warmup {
                    iteration_ms.push(elapsed);
                    loss = normalized.into_scalar().elem::<f32>();
                }
            }
            let best_ms = iteration_ms.iter().copied().fold(f64::INFINITY, f64::min);
            let mean_ms = iteration_ms.iter().sum::<f64>() / iteration_ms.len().max(1) as f64;
            PathReport {
                path,
                iteration_ms,
                best_ms,
                mean_ms,
                loss,
                peak_bytes_over_baseline: peak
                    .zip(baseline)
                    .map(|(peak, base)| peak.saturating_sub(base)),
            }
        })
        .collect();

    LossBenchReport {
        backend: B::name(device),
        config: config.clone(),
        chunk_plan: ChunkPlan::new(
            config.supervised,
            config.vocab,
            config.options.chunk_memory_bytes,
        ),
        paths,
    }
}

/// Targets with `supervised` positions spread evenly over the tokens and the rest -100.
fn bench_targets<B: Backend>(config: &LossBenchConfig, device: &B::Device) -> Tensor<B, 1, Int> {
    let mut state = 0x9e37_79b9_7f4a_7c15_u64;
    let labels: Vec<i64> = (0..config.tokens)
        .map(|i| {
            // Supervise position i when the running share first reaches the next whole token.
            let supervised = (i + 1) * config.supervised / config.tokens.max(1)
                > i * config.supervised / config.tokens.max(1);
            state = state
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            if supervised {
                ((state >> 33) % config.vocab as u64) as i64
            } else {
                IGNORE_INDEX
            }
        })
        .collect();
    Tensor::from_data(TensorData::new(labels, [config.tokens]), device)
}
