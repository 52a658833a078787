//! The chunked path equals the plain path (loss and both gradients) within 1e-5 relative in
//! f32, whatever the tiling.

mod common;

use burn::tensor::{Distribution, Int, Tensor, TensorData};
use common::{Ad, Cpu, assert_close_f32, device, to_f32};
use qwen_loss::{
    ChunkPlan, CrossEntropyOptions, IGNORE_INDEX, LossOutput, Reduction,
    chunked_lm_head_cross_entropy, masked_cross_entropy,
};

/// Relative tolerance of the issue; the absolute floor is the same fraction of the largest
/// reference value, so entries that cancel to near zero are judged on the tensor's scale.
const REL: f64 = 1e-5;

struct Problem {
    hidden: Vec<f32>,
    weight: Vec<f32>,
    targets: Vec<i64>,
    n: usize,
    dim: usize,
    vocab: usize,
}

fn problem(n: usize, dim: usize, vocab: usize, seed: u64) -> Problem {
    // A small LCG keeps the inputs identical across runs and platforms.
    let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15).wrapping_add(1);
    let mut next = move || {
        state = state
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        (state >> 11) as f64 / (1u64 << 53) as f64
    };
    let hidden = (0..n * dim)
        .map(|_| (next() * 2.0 - 1.0) as f32 * 2.0)
        .collect();
    let weight = (0..vocab * dim)
        .map(|_| (next() * 2.0 - 1.0) as f32 * 0.5)
        .collect();
    let targets = (0..n)
        .map(|_| {
            if next() < 0.5 {
                IGNORE_INDEX
            } else {
                (next() * vocab as f64) as i64
            }
        })
        .collect();
    Problem {
        hidden,
        weight,
        targets,
        n,
        dim,
        vocab,
    }
}

struct Run {
    loss: Vec<f32>,
    sum: f32,
    n_tokens: usize,
    grad_hidden: Vec<f32>,
    grad_weight: Vec<f32>,
}

fn run(p: &Problem, opts: &CrossEntropyOptions, chunked: bool) -> Run {
    let device = device();
    let hidden =
        Tensor::<Ad, 2>::from_data(TensorData::new(p.hidden.clone(), [p.n, p.dim]), &device)
            .require_grad();
    let weight =
        Tensor::<Ad, 2>::from_data(TensorData::new(p.weight.clone(), [p.vocab, p.dim]), &device)
            .require_grad();
    let targets =
        Tensor::<Ad, 1, Int>::from_data(TensorData::new(p.targets.clone(), [p.n]), &device);
    let out: LossOutput<Ad> = if chunked {
        chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), targets, opts).unwrap()
    } else {
        let logits = hidden.clone().matmul(weight.clone().transpose()); // [n, vocab]
        masked_cross_entropy(logits, targets, opts).unwrap()
    };
    let grads = out.loss.clone().sum().backward();
    Run {
        loss: to_f32(out.loss),
        sum: to_f32(out.sum)[0],
        n_tokens: out.n_tokens,
        grad_hidden: to_f32(hidden.grad(&grads).expect("hidden gradient")),
        grad_weight: to_f32(weight.grad(&grads).expect("weight gradient")),
    }
}

fn compare(tag: &str, p: &Problem, opts: &CrossEntropyOptions) {
    let plain = run(p, opts, false);
    let fused = run(p, opts, true);
    assert_eq!(plain.n_tokens, fused.n_tokens);
    let close = |what: &str, a: &[f32], b: &[f32]| {
        let scale = b.iter().fold(0.0f32, |m, x| m.max(x.abs())) as f64;
        assert_close_f32(&format!("{tag} {what}"), a, b, REL, REL * scale.max(1e-30));
    };
    close("loss", &fused.loss, &plain.loss);
    close("sum", &[fused.sum], &[plain.sum]);
    close("grad_hidden", &fused.grad_hidden, &plain.grad_hidden);
    close("grad_weight", &fused.grad_weight, &plain.grad_weight);
}

#[test]
fn chunked_equals_plain_for_every_tiling_and_option() {
    let p = problem(64, 32, 300, 7);
    let options = [
        CrossEntropyOptions::default().with_reduction(Reduction::Sum),
        CrossEntropyOptions::default(),
        CrossEntropyOptions::default().with_reduction(Reduction::None),
        CrossEntropyOptions::default()
            .with_label_smoothing(0.1)
            .with_z_loss_weight(1e-3),
    ];
    // One tile; tiles of several rows and 128 columns; one row at a time.
    for budget in [1 << 30, 16 << 10, 1] {
        let plan = ChunkPlan::new(
            p.targets.iter().filter(|&&t| t != IGNORE_INDEX).count(),
            p.vocab,
            budget,
        );
        for (i, opts) in options.iter().enumerate() {
            let opts = opts.clone().with_chunk_memory_bytes(budget);
            compare(&format!("budget {budget} {plan:?} options #{i}"), &p, &opts);
        }
    }
}

#[test]
fn chunked_equals_plain_when_rows_reduce_in_two_stages() {
    // 4160 = 65 * 64 columns: long enough for the two-stage row reduction (the plain path's
    // autodiff runs through it, the fused path's forward uses it for the log-sum-exp).
    let p = problem(12, 8, 4160, 11);
    let opts = CrossEntropyOptions::default()
        .with_label_smoothing(0.1)
        .with_z_loss_weight(1e-3);
    for budget in [1 << 30, 64 << 10] {
        let opts = opts.clone().with_chunk_memory_bytes(budget);
        compare(&format!("vocab 4160, budget {budget}"), &p, &opts);
    }
}

#[test]
fn chunk_plan_respects_the_budget_and_its_floors() {
    // The size: 8192 supervised rows, vocabulary 151936, the default 256 MiB budget.
    let plan = ChunkPlan::new(8192, 151_936, 256 << 20);
    let tile_bytes = |rows: usize, cols: usize| rows * cols * 4 * qwen_loss::LIVE_TILE_BUFFERS;
    assert!(
        tile_bytes(plan.forward_rows, 151_936) <= 256 << 20,
        "{plan:?}"
    );
    assert!(
        tile_bytes(plan.backward_rows, plan.backward_cols) <= 256 << 20,
        "{plan:?}"
    );
    assert_eq!(plan.backward_rows, 8192, "{plan:?}");
    // Aligned slabs: each tile's bf16 rows start on 16-byte boundaries.
    assert_eq!(
        plan.backward_cols % qwen_loss::TILE_COL_MULTIPLE,
        0,
        "{plan:?}"
    );
    let odd = ChunkPlan::new(8013, 151_936, 1 << 30);
    assert_eq!(
        odd.backward_cols % qwen_loss::TILE_COL_MULTIPLE,
        0,
        "{odd:?}"
    );
    assert!(odd.backward_cols > 8000, "{odd:?}");
    // A budget too small for anything still gives a plan that runs.
    let tiny = ChunkPlan::new(10, 1000, 0);
    assert_eq!(tiny.forward_rows, 1);
    assert_eq!(tiny.backward_rows, 1);
    assert_eq!(tiny.backward_cols, qwen_loss::MIN_TILE_COLS);
}

#[test]
fn chunked_with_no_autodiff_equals_plain() {
    let p = problem(40, 16, 200, 3);
    let device = device();
    let opts = CrossEntropyOptions::default()
        .with_label_smoothing(0.05)
        .with_chunk_memory_bytes(8 << 10);
    let hidden =
        Tensor::<Cpu, 2>::from_data(TensorData::new(p.hidden.clone(), [p.n, p.dim]), &device);
    let weight =
        Tensor::<Cpu, 2>::from_data(TensorData::new(p.weight.clone(), [p.vocab, p.dim]), &device);
    let targets =
        Tensor::<Cpu, 1, Int>::from_data(TensorData::new(p.targets.clone(), [p.n]), &device);
    let fused =
        chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), targets.clone(), &opts)
            .unwrap();
    let plain = masked_cross_entropy(hidden.matmul(weight.transpose()), targets, &opts).unwrap();
    assert_close_f32(
        "eval mean",
        &to_f32(fused.loss),
        &to_f32(plain.loss),
        REL,
        0.0,
    );
}

/// bf16 hidden states and weight: the loss comes out in f32 and close to the f32 computation,
/// and the gradients come back in bf16.
#[test]
fn half_precision_inputs_are_upcast() {
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, FloatDType};
    let device = device();
    Ad::seed(&device, 7);
    let hidden = Tensor::<Ad, 2>::random([24, 16], Distribution::Normal(0.0, 1.0), &device);
    let weight = Tensor::<Ad, 2>::random([50, 16], Distribution::Normal(0.0, 0.3), &device);
    let labels: Vec<i64> = (0..24)
        .map(|i| {
            if i % 3 == 0 {
                IGNORE_INDEX
            } else {
                (i * 7) % 50
            }
        })
        .collect();
    let targets = Tensor::<Ad, 1, Int>::from_data(TensorData::new(labels, [24]), &device);
    let opts = CrossEntropyOptions::default().with_chunk_memory_bytes(4 << 10);

    let reference =
        chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), targets.clone(), &opts)
            .unwrap();
    let hidden_bf16 = hidden.cast(FloatDType::BF16).detach().require_grad();
    let weight_bf16 = weight.cast(FloatDType::BF16).detach().require_grad();
    let fused = chunked_lm_head_cross_entropy(
        hidden_bf16.clone(),
        weight_bf16.clone(),
        targets.clone(),
        &opts,
    )
    .unwrap();
    let plain = masked_cross_entropy(
        hidden_bf16.clone().matmul(weight_bf16.clone().transpose()),
        targets,
        &opts,
    )
    .unwrap();
    assert_eq!(fused.loss.dtype(), DType::F32);
    assert_eq!(plain.loss.dtype(), DType::F32);
    let reference = to_f32(reference.loss);
    assert_close_f32(
        "bf16 fused vs f32",
        &to_f32(fused.loss.clone()),
        &reference,
        2e-2,
        0.0,
    );
    assert_close_f32(
        "bf16 plain vs f32",
        &to_f32(plain.loss),
        &reference,
        2e-2,
        0.0,
    );

    let grads = fused.loss.backward();
    let grad_hidden = hidden_bf16.grad(&grads).expect("hidden gradient");
    let grad_weight = weight_bf16.grad(&grads).expect("weight gradient");
    assert_eq!(grad_hidden.dtype(), DType::BF16);
    assert_eq!(grad_weight.dtype(), DType::BF16);
    assert!(
        to_f32(grad_hidden.cast(FloatDType::F32))
            .iter()
            .all(|g| g.is_finite())
    );
}

/// An f32 master weight with bf16 hidden states: the products read the weight cast on use, so
/// the loss equals that of the weight cast beforehand, and the weight's gradient comes back in
/// f32, close to the cast's (which rounds it to bf16 on the way), over several tiles.
#[test]
fn an_f32_master_weight_is_cast_on_use() {
    use burn::tensor::backend::Backend;
    use burn::tensor::{DType, FloatDType};
    let device = device();
    Ad::seed(&device, 9);
    let hidden = Tensor::<Ad, 2>::random([24, 16], Distribution::Normal(0.0, 1.0), &device)
        .cast(FloatDType::BF16)
        .detach();
    let weight = Tensor::<Ad, 2>::random([50, 16], Distribution::Normal(0.0, 0.3), &device);
    let labels: Vec<i64> = (0..24)
        .map(|i| {
            if i % 4 == 0 {
                IGNORE_INDEX
            } else {
                (i * 11) % 50
            }
        })
        .collect();
    let targets = Tensor::<Ad, 1, Int>::from_data(TensorData::new(labels, [24]), &device);
    // Small tiles: several vocabulary slabs and row chunks, so that sums take several products.
    let opts = CrossEntropyOptions::default().with_chunk_memory_bytes(2 << 10);
    let run = |cast_first: bool| {
        let (hidden, weight) = (hidden.clone().require_grad(), weight.clone().require_grad());
        let used = if cast_first {
            weight.clone().cast(FloatDType::BF16)
        } else {
            weight.clone()
        };
        let out =
            chunked_lm_head_cross_entropy(hidden.clone(), used, targets.clone(), &opts).unwrap();
        let grads = out.loss.clone().backward();
        (
            to_f32(out.loss),
            hidden.grad(&grads).expect("hidden gradient"),
            weight.grad(&grads).expect("weight gradient"),
        )
    };
    let (loss, grad_hidden, grad_weight) = run(false);
    let (loss_ref, grad_hidden_ref, grad_weight_ref) = run(true);
    assert_eq!(loss, loss_ref);
    assert_eq!(grad_weight.dtype(), DType::F32);
    assert_eq!(grad_hidden.dtype(), DType::BF16);
    let f32s = |t: Tensor<Cpu, 2>| to_f32(t.cast(FloatDType::F32));
    assert_close_f32(
        "hidden",
        &f32s(grad_hidden),
        &f32s(grad_hidden_ref),
        0.0,
        0.0,
    );
    assert_close_f32(
        "weight",
        &f32s(grad_weight),
        &f32s(grad_weight_ref),
        1e-2,
        1e-3,
    );
}
