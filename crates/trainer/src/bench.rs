//! The training benchmark behind `qwen-sft bench` and `cargo xtask bench`.
//!
//! It runs the real loop of [`train`] (data loading, forward, masked
//! loss over real labels, backward, clipping, optimizer step) on a generated corpus whose rows
//! are packed to `seq_len` with about half of every row supervised, and times the steps after
//! a warm-up. Nothing a real run does is skipped.

use std::path::Path;
use std::time::Instant;

use burn::tensor::ElementConversion;
use burn::tensor::backend::AutodiffBackend;
use qwen_loss::ChunkedCeBackend;
use qwen_model::AttentionBackend;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::config::{Precision, TrainConfig};
use crate::error::TrainError;
use crate::fused_adamw::OptimizerBackend;
use crate::host_profile::HostProfile;
use crate::metrics::StepMetrics;
use crate::train::{Observer, train};

#[derive(Debug, Clone)]
pub struct BenchConfig {
    pub preset: String,
    pub seq_len: usize,
    pub batch_size: usize,
    /// Timed steps.
    pub steps: u64,
    /// Untimed steps first (kernel compilation, autotuning, allocator warm-up).
    pub warmup_steps: u64,
    pub precision: Precision,
    pub loss_chunk_mib: usize,
    pub attention_chunk_mib: usize,
    pub attention: qwen_model::AttentionImpl,
    /// Recorded in the run's config and the report; the caller picks the matching backend.
    pub checkpointing: crate::config::Checkpointing,
    /// Where to write samples of the host's time over the timed steps
    /// ([`crate::host_profile`]; the `host-profile` feature).
    pub host_profile: Option<std::path::PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct BenchReport {
    pub backend: String,
    pub preset: String,
    pub parameters: usize,
    pub seq_len: usize,
    pub batch_size: usize,
    pub precision: Precision,
    pub attention: qwen_model::AttentionImpl,
    pub checkpointing: crate::config::Checkpointing,
    /// The body of every matrix product: linear layers, attention, loss (`qwen_gemm::GemmBody::name`).
    pub linear: &'static str,
    /// The model's own kernels as they ran: `kernel` or `tensor-ops` (`--kernels`).
    pub kernels: String,
    /// Attention passes (forward or backward, per layer) per timed step that ran the fused
    /// kernels (`qwen_model::attention::flash`, CUDA); the rest ran the chunked attention.
    pub fused_attention_passes_per_step: f64,
    /// Products under this many GFLOP ran on burn's matmul (`--gemm-min-gflop`).
    pub gemm_min_gflop: f64,
    /// cuBLASLt products per timed step, and the host time per step spent waiting for burn's
    /// stream before them and running them (`qwen_gemm::GemmStats`); zero on other bodies.
    pub gemm_calls_per_step: f64,
    pub gemm_wait_seconds_per_step: f64,
    pub gemm_run_seconds_per_step: f64,
    /// Time per step that cubecl's device thread, which also launches burn's kernels, spent on
    /// the cuBLASLt products (`GemmStats::device_thread_seconds`).
    pub gemm_device_thread_seconds_per_step: f64,
    pub steps_timed: usize,
    /// Non-padding tokens per second over the timed steps.
    pub tokens_per_second: f64,
    pub supervised_tokens_per_second: f64,
    pub supervised_fraction: f64,
    pub step_seconds_median: f64,
    pub step_seconds_mean: f64,
    /// Mean host time per timed step until its forward and backward were queued
    /// (`StepMetrics::queued_seconds`): near `step_seconds_mean`, the host sets the pace.
    pub queued_seconds_mean: f64,
    pub first_loss: f64,
    pub last_loss: f64,
    /// Every step's loss, warm-up included: the curve that compares two runs.
    pub losses: Vec<f64>,
    /// Wall time from the start of the run to the first timed step (load, init, warm-up).
    pub setup_seconds: f64,
    /// The process's peak resident memory (`VmHWM`), which on the CPU backend is the training
    /// memory. Device memory on a GPU is sampled from outside by `xtask/peer/measure.py`, the
    /// same way for ours and the PyTorch peer.
    pub peak_host_memory_bytes: Option<u64>,
}

/// `VmHWM` of `/proc/self/status`, where there is one.
fn peak_resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// Common one-token English words, so a chat's token count is about its word count.
const WORDS: [&str; 32] = [
    "the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be", "by",
    "on", "not", "he", "this", "are", "or", "his", "from", "at", "which", "but", "have", "an",
    "had", "they", "you", "were", "their",
];

/// Writes `n` chats of about `tokens` tokens each, half of them in the assistant reply.
pub fn write_corpus(path: &Path, n: usize, tokens: usize, seed: u64) -> Result<(), TrainError> {
    let mut rng = StdRng::seed_from_u64(seed);
    let mut text = |count: usize| -> String {
        (0..count)
            .map(|_| WORDS[rng.random_range(0..WORDS.len())])
            .collect::<Vec<_>>()
            .join(" ")
    };
    // About 24 tokens of ChatML around the two texts, with a one-word system prompt.
    let half = tokens.saturating_sub(24) / 2;
    let mut out = String::new();
    for _ in 0..n {
        let record = serde_json::json!({"messages": [
            {"role": "system", "content": "Answer."},
            {"role": "user", "content": text(half)},
            {"role": "assistant", "content": text(half)},
        ]});
        out.push_str(&record.to_string());
        out.push('\n');
    }
    std::fs::write(path, out).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })
}

struct Timer {
    started: Instant,
    warmup: u64,
    /// The last step timed (and whose loss is kept): the run goes one step further, since a
    /// step's time runs from the previous step's read to its own, and a run's last step has no
    /// next step queued behind it (`train`'s loop reads each step's loss one step late).
    last_timed: u64,
    /// cuBLASLt's totals when the timed steps begin.
    gemm_at_warmup: qwen_gemm::GemmStats,
    fused_at_warmup: u64,
    setup_seconds: Option<f64>,
    timed: Vec<StepMetrics>,
    losses: Vec<f64>,
    /// Where to write the host profile of the timed steps, before they start.
    profile_to: Option<std::path::PathBuf>,
    profile: Option<HostProfile>,
    /// The first error of the profiler, reported once the run is over.
    profile_error: Option<TrainError>,
}

impl Observer for Timer {
    fn on_step(&mut self, m: &StepMetrics) {
        // Progress on stderr, so that a run cut short still shows how far it got.
        eprintln!(
            "bench step {}/{}: {:.3} s (queued in {:.3} s), loss {:.4}, {:.0} tokens/s, {:.1} s since start",
            m.step,
            m.total_steps,
            m.step_seconds,
            m.queued_seconds,
            m.loss,
            m.tokens_per_second,
            self.started.elapsed().as_secs_f64()
        );
        if m.step > self.last_timed {
            return;
        }
        self.losses.push(m.loss);
        if m.step == self.warmup {
            self.setup_seconds = Some(self.started.elapsed().as_secs_f64());
            self.gemm_at_warmup = qwen_gemm::gemm_stats();
            self.fused_at_warmup = qwen_model::fused_attention_passes();
            if let Some(path) = self.profile_to.take() {
                match HostProfile::start(&path) {
                    Ok(profile) => self.profile = Some(profile),
                    Err(err) => self.profile_error = Some(err),
                }
            }
        }
        if m.step > self.warmup {
            self.timed.push(m.clone());
        }
        if m.step == self.last_timed
            && let Some(profile) = self.profile.take()
            && let Err(err) = profile.finish()
        {
            self.profile_error = Some(err);
        }
    }
}

pub fn run<B>(
    bench: &BenchConfig,
    device: &B::Device,
    backend_name: &str,
    work_dir: &Path,
) -> Result<BenchReport, TrainError>
where
    B: AutodiffBackend + ChunkedCeBackend + AttentionBackend,
    B::InnerBackend: ChunkedCeBackend + AttentionBackend + OptimizerBackend,
{
    // Refused before any step runs, not after the timed ones.
    if let Some(path) = &bench.host_profile {
        HostProfile::check_available(path)?;
    }
    let steps = bench.warmup_steps + bench.steps;
    // Chats of a quarter row each, packed four to a row.
    let chat_tokens = bench.seq_len / 4;
    let rows_needed = (steps as usize + 1) * bench.batch_size;
    let corpus = work_dir.join("bench.jsonl");
    write_corpus(&corpus, rows_needed * 4 + 8, chat_tokens, 7)?;

    let mut config = TrainConfig::default();
    config.model.preset = bench.preset.clone();
    config.data.train = vec![corpus];
    config.data.max_len = bench.seq_len;
    config.data.packing = true;
    config.optim.lr = 1e-5;
    config.optim.schedule = crate::schedule::ScheduleKind::Constant;
    config.train.batch_size = bench.batch_size;
    // One step past the timed ones (see `Timer::last_timed`).
    config.train.max_steps = Some(steps + 1);
    config.train.precision = bench.precision;
    config.train.loss_chunk_mib = bench.loss_chunk_mib;
    config.train.attention_chunk_mib = bench.attention_chunk_mib;
    config.train.attention = bench.attention;
    config.train.checkpointing = bench.checkpointing;
    config.checkpoint.keep_last = 1;
    // The timed loop is the whole of a real run's step; the final export is not a step.
    config.checkpoint.save_final = false;
    config.output_dir = work_dir.join("run");

    let mut timer = Timer {
        started: Instant::now(),
        warmup: bench.warmup_steps,
        last_timed: steps,
        gemm_at_warmup: qwen_gemm::gemm_stats(),
        fused_at_warmup: qwen_model::fused_attention_passes(),
        setup_seconds: None,
        timed: Vec::new(),
        losses: Vec::new(),
        profile_to: bench.host_profile.clone(),
        profile: None,
        profile_error: None,
    };
    let parameters =
        qwen_model::Qwen2Config::preset(&bench.preset).map_or(0, |c| c.num_parameters());
    train::<B>(&config, device, backend_name, None, &mut timer)?;
    if let Some(err) = timer.profile_error {
        return Err(err);
    }

    let seconds: Vec<f64> = timer.timed.iter().map(|m| m.step_seconds).collect();
    let total: f64 = seconds.iter().sum();
    let tokens: usize = timer.timed.iter().map(|m| m.tokens).sum();
    let supervised: usize = timer.timed.iter().map(|m| m.supervised_tokens).sum();
    let mut sorted = seconds.clone();
    sorted.sort_by(f64::total_cmp);
    let timed_steps = seconds.len().max(1) as f64;
    let gemm = qwen_gemm::gemm_stats() - timer.gemm_at_warmup;
    Ok(BenchReport {
        backend: backend_name.to_string(),
        preset: bench.preset.clone(),
        parameters,
        seq_len: bench.seq_len,
        batch_size: bench.batch_size,
        precision: bench.precision,
        attention: bench.attention,
        checkpointing: bench.checkpointing,
        linear: B::gemm_name(),
        kernels: kernels_name::<B>(),
        fused_attention_passes_per_step: (qwen_model::fused_attention_passes()
            - timer.fused_at_warmup) as f64
            / timed_steps,
        gemm_min_gflop: qwen_gemm::gemm_min_flops() as f64 * 1e-9,
        gemm_calls_per_step: gemm.calls as f64 / timed_steps,
        gemm_wait_seconds_per_step: gemm.wait_seconds / timed_steps,
        gemm_run_seconds_per_step: gemm.run_seconds / timed_steps,
        gemm_device_thread_seconds_per_step: gemm.device_thread_seconds / timed_steps,
        steps_timed: seconds.len(),
        tokens_per_second: tokens as f64 / total,
        supervised_tokens_per_second: supervised as f64 / total,
        supervised_fraction: supervised as f64 / tokens.max(1) as f64,
        step_seconds_median: sorted.get(sorted.len() / 2).copied().unwrap_or(f64::NAN),
        step_seconds_mean: total / seconds.len().max(1) as f64,
        queued_seconds_mean: timer.timed.iter().map(|m| m.queued_seconds).sum::<f64>()
            / timed_steps,
        first_loss: timer.losses.first().copied().unwrap_or(f64::NAN),
        last_loss: timer.losses.last().copied().unwrap_or(f64::NAN),
        losses: timer.losses,
        setup_seconds: timer.setup_seconds.unwrap_or(0.0),
        peak_host_memory_bytes: peak_resident_bytes(),
    })
}

/// The forward pass of a preset on random tokens: the real-size check of the model crate.
#[derive(Debug, Clone, Serialize)]
pub struct ForwardReport {
    pub backend: String,
    pub preset: String,
    /// Counted from the initialised model's tensors.
    pub parameters: usize,
    pub batch_size: usize,
    pub seq_len: usize,
    pub precision: Precision,
    /// The body of every matrix product: linear layers, attention, loss (`qwen_gemm::GemmBody::name`).
    pub linear: &'static str,
    /// The model's own kernels as they ran: `kernel` or `tensor-ops` (`--kernels`).
    pub kernels: String,
    pub init_seconds: f64,
    /// The first forward (kernel compilation and autotuning included).
    pub first_forward_seconds: f64,
    pub forward_seconds_median: f64,
    pub logits_finite: bool,
}

pub fn forward<B: AttentionBackend>(
    preset: &str,
    batch_size: usize,
    seq_len: usize,
    precision: Precision,
    iterations: usize,
    device: &B::Device,
    backend_name: &str,
) -> Result<ForwardReport, TrainError> {
    use burn::tensor::{Int, Tensor, TensorData};

    let started = Instant::now();
    let loaded = crate::source::init_preset::<B>(preset, 0, device)?;
    let mut model = loaded.model;
    if precision == Precision::Bf16 {
        model = model.with_compute_dtype(burn::tensor::DType::BF16);
    }
    let parameters: usize = qwen_model::named_parameters(&model)
        .iter()
        .map(|(_, _, shape)| shape.iter().product::<usize>())
        .sum();
    B::sync(device).ok();
    let init_seconds = started.elapsed().as_secs_f64();

    let mut rng = StdRng::seed_from_u64(1);
    let ids: Vec<i64> = (0..batch_size * seq_len)
        .map(|_| rng.random_range(0..151_643))
        .collect();
    let ids = Tensor::<B, 2, Int>::from_data(
        TensorData::new(ids, [batch_size, seq_len]).convert::<B::IntElem>(),
        device,
    );
    let input = qwen_model::Qwen2Input::new(ids);
    let mut times = Vec::new();
    let mut finite = true;
    eprintln!("bench-forward: initialised {parameters} parameters in {init_seconds:.1} s");
    for i in 0..iterations.max(2) {
        let t = Instant::now();
        let logits = model.forward(&input);
        // Reading one value back waits for the whole forward.
        let probe = logits.narrow(1, seq_len - 1, 1).sum().into_scalar();
        times.push(t.elapsed().as_secs_f64());
        eprintln!("bench-forward: forward {i}: {:.3} s", times[i]);
        finite &= burn::tensor::ElementConversion::elem::<f64>(probe).is_finite();
    }
    let first = times.remove(0);
    times.sort_by(f64::total_cmp);
    Ok(ForwardReport {
        backend: backend_name.to_string(),
        preset: preset.to_string(),
        parameters,
        batch_size,
        seq_len,
        precision,
        linear: B::gemm_name(),
        kernels: kernels_name::<B>(),
        init_seconds,
        first_forward_seconds: first,
        forward_seconds_median: times[times.len() / 2],
        logits_finite: finite,
    })
}

/// One GEMM of a linear layer, timed on the backend's [`GemmBackend::gemm`](qwen_gemm::GemmBackend::gemm) body and on
/// burn's matmul, with the two results compared: `qwen-sft bench-linear`.
#[derive(Debug, Clone, Serialize)]
pub struct GemmReport {
    /// The layer and pass, e.g. `mlp.up_proj forward`.
    pub name: String,
    /// `op(a) [m, k] @ op(b) [k, n]`.
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub transpose_a: bool,
    pub transpose_b: bool,
    pub precision: Precision,
    /// The body under test (`qwen_gemm::GemmBody::name`).
    pub body: &'static str,
    /// `max |ours - burn| / max |burn|`.
    pub max_relative_diff: f64,
    pub seconds: f64,
    pub seconds_burn: f64,
    pub tflops: f64,
    pub tflops_burn: f64,
}

/// The GEMMs of one step of a preset's linear layers on `rows` tokens: for each layer shape
/// (`[out, in]` weights, Hugging Face layout) the forward `x w^T`, and the backward `dy w`
/// and `dy^T x`, as [`qwen_model::linear`] runs them.
pub fn linear_gemms(
    config: &qwen_model::Qwen2Config,
    rows: usize,
) -> Vec<(String, [usize; 3], [bool; 2])> {
    let (h, i, v) = (
        config.hidden_size,
        config.intermediate_size,
        config.vocab_size,
    );
    let kv = config.num_key_value_heads() * config.head_dim();
    let q = config.num_attention_heads * config.head_dim();
    let layers = [
        ("self_attn.q_proj", q, h),
        ("self_attn.k_proj", kv, h),
        ("self_attn.o_proj", h, q),
        ("mlp.up_proj", i, h),
        ("mlp.down_proj", h, i),
        ("lm_head", v, h),
    ];
    let mut gemms = Vec::new();
    for (layer, out, inp) in layers {
        gemms.push((format!("{layer} forward"), [rows, inp, out], [false, true]));
        gemms.push((
            format!("{layer} grad input"),
            [rows, out, inp],
            [false, false],
        ));
        gemms.push((
            format!("{layer} grad weight"),
            [out, rows, inp],
            [true, false],
        ));
    }
    gemms
}

pub fn linear<B: qwen_model::LinearBackend>(
    preset: &str,
    rows: usize,
    precision: Precision,
    iterations: usize,
    device: &B::Device,
) -> Result<Vec<GemmReport>, TrainError> {
    use burn::tensor::{Distribution, Tensor, TensorPrimitive};

    let config = crate::source::preset_config(preset)?;
    let dtype = match precision {
        Precision::F32 => burn::tensor::DType::F32,
        Precision::Bf16 => burn::tensor::DType::BF16,
    };
    let float = |t: burn::tensor::ops::FloatTensor<B>| {
        Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(t))
    };
    let mut reports = Vec::new();
    for (name, [m, k, n], [ta, tb]) in linear_gemms(&config, rows) {
        let a_shape = if ta { [k, m] } else { [m, k] };
        let b_shape = if tb { [n, k] } else { [k, n] };
        let a = Tensor::<B, 2>::random(a_shape, Distribution::Normal(0.0, 1.0), device).cast(dtype);
        let b = Tensor::<B, 2>::random(b_shape, Distribution::Normal(0.0, 1.0), device).cast(dtype);
        let prims = || {
            (
                a.clone().into_primitive().tensor(),
                b.clone().into_primitive().tensor(),
            )
        };
        let time = |f: &dyn Fn() -> Tensor<B, 2>| -> (Tensor<B, 2>, f64) {
            let mut out = f(); // the first call compiles
            B::sync(device).expect("the device failed");
            let started = Instant::now();
            for _ in 0..iterations.max(1) {
                out = f();
            }
            B::sync(device).expect("the device failed");
            (
                out,
                started.elapsed().as_secs_f64() / iterations.max(1) as f64,
            )
        };
        let (ours, seconds) = time(&|| {
            let (a, b) = prims();
            float(B::gemm(a, b, ta, tb))
        });
        let (burn, seconds_burn) = time(&|| {
            let (a, b) = prims();
            float(qwen_model::linear::gemm_reference::<B>(a, b, ta, tb))
        });
        let (ours, burn) = (
            ours.cast(burn::tensor::DType::F32),
            burn.cast(burn::tensor::DType::F32),
        );
        let scale: f64 = burn.clone().abs().max().into_scalar().elem::<f64>();
        let diff: f64 = (ours - burn).abs().max().into_scalar().elem::<f64>();
        let flops = 2.0 * (m * k * n) as f64;
        reports.push(GemmReport {
            name,
            m,
            k,
            n,
            transpose_a: ta,
            transpose_b: tb,
            precision,
            body: B::gemm_name(),
            max_relative_diff: diff / scale.max(f64::MIN_POSITIVE),
            seconds,
            seconds_burn,
            tflops: flops / seconds / 1e12,
            tflops_burn: flops / seconds_burn / 1e12,
        });
    }
    Ok(reports)
}

/// Sets where this workspace's own kernels run, for the whole process: the model's
/// ([`qwen_model::set_kernel_body`]) and the chunked loss's ([`qwen_loss::set_loss_kernels`]),
/// under one setting (`--kernels`).
pub fn set_kernel_bodies(body: qwen_model::KernelBody) {
    qwen_model::set_kernel_body(body);
    qwen_loss::set_loss_kernels(match body {
        qwen_model::KernelBody::Auto => qwen_loss::LossKernels::Auto,
        qwen_model::KernelBody::Kernel => qwen_loss::LossKernels::Kernel,
        qwen_model::KernelBody::TensorOps => qwen_loss::LossKernels::TensorOps,
    });
}

/// What the model's own kernels run on `B`: `kernel` or `tensor-ops` (one switch sets them
/// all, [`qwen_model::kernels`]), and the kernels turned off, as in `kernel (off: rotary)`.
pub fn kernels_name<B: AttentionBackend + qwen_model::RowwiseBackend>() -> String {
    if !B::has_rowwise_kernels() {
        return qwen_model::KernelBody::TensorOps.name().to_string();
    }
    let off: Vec<&str> = qwen_model::kernels_off().iter().map(|k| k.name()).collect();
    let kernel = qwen_model::KernelBody::Kernel.name();
    match off.is_empty() {
        true => kernel.to_string(),
        false => format!("{kernel} (off: {})", off.join(", ")),
    }
}
