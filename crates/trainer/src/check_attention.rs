//! `qwen-sft check-attention`: the attention alone at a real model's sizes, the fused kernels
//! (CUDA, `qwen_model::attention::flash`) against the chunked attention, forward and backward.
//!
//! ```text
//! random bf16 q, k, v, packed segments, a random output gradient G
//!   fused:   chunked_attention with the fused kernels   -> o, dq, dk, dv of sum(o * G)
//!   chunked: the same with `flash` off (block softmax)  -> o, dq, dk, dv
//!   f32:     the chunked attention on the same values in f32
//!   -> max |x - y| / max |y| of each, fused and chunked against each other and against f32
//! ```
//!
//! Both bf16 paths round the probabilities to bf16 before `P V` (PyTorch's flash kernels do the
//! same), but at different places, so they differ by about bf16's unit. The fused path passes
//! when each figure is within the tolerance of the chunked one, or no farther from the f32
//! path than the chunked path is (times [`crate::check::F32_SLACK`]). A check in which the
//! fused kernels did not run (another backend, or sizes they do not take) fails: the report
//! counts the passes that ran fused.
//!
//! With `iterations > 0` it also times each bf16 path, forward and backward together, as a
//! benchmark (JSON, never a test): `xtask/peer/attention_peer.py` times PyTorch's
//! `scaled_dot_product_attention` at the same sizes for the ratio (docs/BENCHMARKS.md).

use burn::tensor::backend::AutodiffBackend;
use burn::tensor::{DType, Distribution, Int, Tensor, TensorData};
use qwen_model::attention::{AttentionMask, chunked_attention};
use qwen_model::{AttentionBackend, Kernel, fused_attention_passes, kernels_off, set_kernels_off};
use serde::Serialize;

/// The sizes of one check.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct AttentionShape {
    pub batch: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub seq: usize,
    pub head_dim: usize,
}

/// The four tensors a path gives, as f32 on the device.
struct Outputs<B: AutodiffBackend> {
    out: Tensor<B::InnerBackend, 4>,
    grads: [Tensor<B::InnerBackend, 4>; 3],
}

/// Relative differences of the output and the three gradients.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub out: f64,
    pub dq: f64,
    pub dk: f64,
    pub dv: f64,
}

impl Figures {
    fn of<B: AutodiffBackend>(a: &Outputs<B>, b: &Outputs<B>) -> Self {
        let r = |x: &Tensor<B::InnerBackend, 4>, y: &Tensor<B::InnerBackend, 4>| {
            crate::check::relative(x.clone(), y.clone())
        };
        Self {
            out: r(&a.out, &b.out),
            dq: r(&a.grads[0], &b.grads[0]),
            dk: r(&a.grads[1], &b.grads[1]),
            dv: r(&a.grads[2], &b.grads[2]),
        }
    }

    fn all(&self) -> [f64; 4] {
        [self.out, self.dq, self.dk, self.dv]
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct AttentionCheckReport {
    pub backend: String,
    pub shape: AttentionShape,
    /// Passes (forward, backward) that ran the fused kernels in the fused run: 2 when they took it.
    pub fused_passes: u64,
    pub fused_vs_chunked: Figures,
    pub fused_vs_f32: Figures,
    pub chunked_vs_f32: Figures,
    pub tolerance: f64,
    pub pass: bool,
    /// Seconds per forward + backward of each bf16 path, over `iterations` runs after
    /// `WARMUP_RUNS` (absent when not timed).
    pub fused_seconds: Option<f64>,
    pub chunked_seconds: Option<f64>,
    pub iterations: usize,
}

/// Segment ids like a packed batch: row 0 one sequence ending in 7 padding positions, the other
/// rows two sequences (a third and the rest).
fn segments<B: AutodiffBackend>(batch: usize, seq: usize, device: &B::Device) -> Tensor<B, 2, Int> {
    let ids: Vec<i64> = (0..batch)
        .flat_map(|b| {
            (0..seq).map(move |s| match b {
                0 => i64::from(s + 7 < seq),
                _ => 1 + i64::from(s >= seq / 3),
            })
        })
        .collect();
    Tensor::from_data(TensorData::new(ids, [batch, seq]), device)
}

/// One path: `sum(o * G)` backward from leaves of `dtype` holding the given values.
fn run<B: AutodiffBackend + AttentionBackend>(
    inputs: &[Tensor<B::InnerBackend, 4>; 3],
    grad_out: &Tensor<B::InnerBackend, 4>,
    segments: &Tensor<B, 2, Int>,
    dtype: DType,
) -> Outputs<B> {
    let [q, k, v] = inputs
        .clone()
        .map(|x| Tensor::<B, 4>::from_inner(x.cast(dtype)).require_grad());
    let mask = AttentionMask::new(segments.clone(), segments.clone(), 0, None);
    let out = chunked_attention(q.clone(), k.clone(), v.clone(), &mask);
    let weighted = out.clone().cast(DType::F32) * Tensor::from_inner(grad_out.clone());
    // Backward from the unreduced product: burn seeds the root with ones, which gives the
    // gradients of sum(o * G) without a full reduction (on CubeCL one thread per output, the
    // whole tensor here: it dominated the first timings).
    let grads = weighted.backward();
    let grad = |x: &Tensor<B, 4>| {
        x.grad(&grads)
            .expect("every input has a gradient")
            .cast(DType::F32)
    };
    Outputs {
        out: out.inner().cast(DType::F32),
        grads: [grad(&q), grad(&k), grad(&v)],
    }
}

/// Runs before timing: on the H200 the first timed path of a process ran at half speed or less
/// after a single warm-up run (the clocks still rising; docs/BENCHMARKS.md, session 13).
const WARMUP_RUNS: usize = 3;

/// Seconds per run of `path`, over `iterations` after [`WARMUP_RUNS`]; `None` for 0 iterations.
fn time<B: AutodiffBackend>(
    iterations: usize,
    device: &B::Device,
    mut path: impl FnMut() -> Outputs<B>,
) -> Option<f64> {
    if iterations == 0 {
        return None;
    }
    for _ in 0..WARMUP_RUNS {
        drop(path());
    }
    B::sync(device).expect("the device failed");
    let started = std::time::Instant::now();
    for _ in 0..iterations {
        drop(path());
    }
    B::sync(device).expect("the device failed");
    Some(started.elapsed().as_secs_f64() / iterations as f64)
}

/// Runs the check (see the module docs), and times each bf16 path over `iterations` runs. Turns
/// the `flash` kernel off for the chunked runs and restores what was off before.
pub fn check_attention<B: AutodiffBackend + AttentionBackend>(
    shape: AttentionShape,
    tolerance: f64,
    iterations: usize,
    backend_name: &str,
    device: &B::Device,
) -> AttentionCheckReport {
    let AttentionShape {
        batch,
        heads,
        kv_heads,
        seq,
        head_dim,
    } = shape;
    let random = |dims: [usize; 4]| {
        // bf16 values, so that every path starts from the same numbers.
        Tensor::<B::InnerBackend, 4>::random(dims, Distribution::Normal(0.0, 1.0), device)
            .cast(DType::BF16)
            .cast(DType::F32)
    };
    let inputs = [
        random([batch, heads, seq, head_dim]),
        random([batch, kv_heads, seq, head_dim]),
        random([batch, kv_heads, seq, head_dim]),
    ];
    let grad_out = random([batch, heads, seq, head_dim]);
    let segments = segments::<B>(batch, seq, device);

    let before = fused_attention_passes();
    let fused = run::<B>(&inputs, &grad_out, &segments, DType::BF16);
    B::sync(device).expect("the device failed");
    let fused_passes = fused_attention_passes() - before;
    let bf16 = || run::<B>(&inputs, &grad_out, &segments, DType::BF16);
    let fused_seconds = time(iterations, device, bf16);
    let was_off = kernels_off();
    let mut off = was_off.clone();
    off.push(Kernel::Flash);
    set_kernels_off(&off);
    let chunked = bf16();
    let chunked_seconds = time(iterations, device, bf16);
    let full = run::<B>(&inputs, &grad_out, &segments, DType::F32);
    B::sync(device).expect("the device failed");
    set_kernels_off(&was_off);

    let fused_vs_chunked = Figures::of(&fused, &chunked);
    let fused_vs_f32 = Figures::of(&fused, &full);
    let chunked_vs_f32 = Figures::of(&chunked, &full);
    let close = fused_vs_chunked
        .all()
        .into_iter()
        .zip(fused_vs_f32.all().into_iter().zip(chunked_vs_f32.all()))
        .all(|(between, (fused, chunked))| {
            // fused <= slack * max(chunked, tolerance)
            let slack = crate::check::F32_SLACK;
            between <= tolerance
                || crate::check::farther_ratio(fused, chunked, slack, slack * tolerance) <= 1.0
        });
    AttentionCheckReport {
        backend: backend_name.to_string(),
        shape,
        fused_passes,
        fused_vs_chunked,
        fused_vs_f32,
        chunked_vs_f32,
        tolerance,
        pass: close && fused_passes == 2,
        fused_seconds,
        chunked_seconds,
        iterations,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type B = burn::backend::Autodiff<burn::backend::Flex>;

    /// On the CPU there are no fused kernels: the paths agree, and the check fails because the
    /// fused kernels did not run.
    #[test]
    fn without_fused_kernels_the_check_fails() {
        let shape = AttentionShape {
            batch: 2,
            heads: 4,
            kv_heads: 2,
            seq: 20,
            head_dim: 8,
        };
        let report = check_attention::<B>(shape, 3e-2, 1, "flex", &Default::default());
        assert_eq!(report.fused_passes, 0);
        assert!(report.fused_seconds.is_some_and(|s| s > 0.0) && report.chunked_seconds.is_some());
        assert!(!report.pass);
        assert!(
            report.fused_vs_chunked.all().iter().all(|&x| x == 0.0),
            "{report:?}"
        );
        let f32_figures = report.fused_vs_f32.all();
        assert!(
            f32_figures.iter().all(|&x| x > 0.0 && x < 5e-2),
            "{report:?}"
        );
    }
}
