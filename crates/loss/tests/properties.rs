//! Property tests over random masks: all-masked rows, all-masked batches, a single supervised
//! token, out-of-range labels, the shift, and normalisation by total supervised tokens.

mod common;

use burn::tensor::{Int, Tensor, TensorData};
use common::{Ad, Cpu, device, to_f32, to_i64};
use proptest::prelude::*;
use qwen_loss::{
    CrossEntropyOptions, IGNORE_INDEX, LossError, Reduction, chunked_lm_head_cross_entropy,
    masked_cross_entropy, next_token_targets, next_token_targets_host,
};

/// How a row of labels is masked.
#[derive(Debug, Clone, Copy)]
enum RowMask {
    All,
    None,
    Random,
}

#[derive(Debug, Clone)]
struct Batch {
    batch: usize,
    seq: usize,
    dim: usize,
    vocab: usize,
    /// Unshifted, `[batch, seq]`.
    labels: Vec<i64>,
    hidden: Vec<f32>,
    weight: Vec<f32>,
}

fn batch_strategy() -> impl Strategy<Value = Batch> {
    (1usize..4, 1usize..9, 1usize..6, 2usize..30)
        .prop_flat_map(|(batch, seq, dim, vocab)| {
            let row_masks = prop::collection::vec(
                prop_oneof![
                    Just(RowMask::All),
                    Just(RowMask::None),
                    Just(RowMask::Random)
                ],
                batch,
            );
            let labels = prop::collection::vec((0..vocab as i64, any::<bool>()), batch * seq);
            let hidden = prop::collection::vec(-2.0f32..2.0, batch * seq * dim);
            let weight = prop::collection::vec(-1.0f32..1.0, vocab * dim);
            (
                Just((batch, seq, dim, vocab)),
                row_masks,
                labels,
                hidden,
                weight,
            )
        })
        .prop_map(
            |((batch, seq, dim, vocab), row_masks, labels, hidden, weight)| {
                let labels = labels
                    .iter()
                    .enumerate()
                    .map(|(i, &(label, keep))| match row_masks[i / seq] {
                        RowMask::All => IGNORE_INDEX,
                        RowMask::None => label,
                        RowMask::Random if keep => label,
                        RowMask::Random => IGNORE_INDEX,
                    })
                    .collect();
                Batch {
                    batch,
                    seq,
                    dim,
                    vocab,
                    labels,
                    hidden,
                    weight,
                }
            },
        )
}

/// The shifted, flattened targets computed on the host.
fn host_targets(b: &Batch) -> Vec<i64> {
    (0..b.batch * b.seq)
        .map(|i| {
            if (i + 1) % b.seq == 0 {
                IGNORE_INDEX
            } else {
                b.labels[i + 1]
            }
        })
        .collect()
}

/// Sum of the per-token loss, in f64 on the host, straight from the formula.
fn host_loss_sum(b: &Batch, targets: &[i64], eps: f64, z: f64) -> f64 {
    let mut total = 0.0;
    for (row, &t) in targets.iter().enumerate() {
        if t == IGNORE_INDEX {
            continue;
        }
        let logits: Vec<f64> = (0..b.vocab)
            .map(|v| {
                (0..b.dim)
                    .map(|k| b.hidden[row * b.dim + k] as f64 * b.weight[v * b.dim + k] as f64)
                    .sum()
            })
            .collect();
        let max = logits.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let lse = max + logits.iter().map(|x| (x - max).exp()).sum::<f64>().ln();
        let mean = logits.iter().sum::<f64>() / b.vocab as f64;
        total += (1.0 - eps) * (lse - logits[t as usize]) + eps * (lse - mean) + z * lse * lse;
    }
    total
}

struct Outcome {
    sum: f32,
    mean: f32,
    per_token: Vec<f32>,
    n_tokens: usize,
    grad_hidden: Vec<f32>,
    grad_weight: Vec<f32>,
}

/// Which loss computes an [`Outcome`].
#[derive(Debug, Clone, Copy, PartialEq)]
enum LossPath {
    Plain,
    /// The chunked path, its targets on the device (read back).
    Chunked,
    /// The chunked path, its targets shifted and passed on the host.
    ChunkedHostTargets,
}

fn evaluate(b: &Batch, opts: &CrossEntropyOptions, path: LossPath) -> Outcome {
    let device = device();
    let n = b.batch * b.seq;
    let hidden = Tensor::<Ad, 2>::from_data(TensorData::new(b.hidden.clone(), [n, b.dim]), &device)
        .require_grad();
    let weight =
        Tensor::<Ad, 2>::from_data(TensorData::new(b.weight.clone(), [b.vocab, b.dim]), &device)
            .require_grad();
    let labels = Tensor::<Ad, 2, Int>::from_data(
        TensorData::new(b.labels.clone(), [b.batch, b.seq]),
        &device,
    );
    let targets = next_token_targets(labels).reshape([n]);
    let opts = opts.clone().with_reduction(Reduction::None);
    let host = next_token_targets_host(&b.labels, b.seq);
    let out = match path {
        LossPath::Chunked => {
            chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), targets, &opts).unwrap()
        }
        LossPath::ChunkedHostTargets => {
            chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), host.as_slice(), &opts)
                .unwrap()
        }
        LossPath::Plain => masked_cross_entropy(
            hidden.clone().matmul(weight.clone().transpose()),
            targets,
            &opts,
        )
        .unwrap(),
    };
    let mean = out.sum.clone().div_scalar(out.n_tokens.max(1) as f32);
    let grads = mean.clone().backward();
    Outcome {
        sum: to_f32(out.sum)[0],
        mean: to_f32(mean)[0],
        per_token: to_f32(out.loss),
        n_tokens: out.n_tokens,
        grad_hidden: to_f32(hidden.grad(&grads).expect("hidden gradient")),
        grad_weight: to_f32(weight.grad(&grads).expect("weight gradient")),
    }
}

fn close(a: f32, b: f64, scale: f64) -> bool {
    ((a as f64) - b).abs() <= 1e-5 * (b.abs() + scale) + 1e-6
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Both paths agree with the host formula and with each other on random masks, including
    /// rows and batches with nothing supervised; ignored rows get zero hidden gradients and
    /// nothing is ever NaN.
    #[test]
    fn random_masks(
        b in batch_strategy(),
        eps in prop_oneof![Just(0.0), 0.0f64..0.5],
        z in prop_oneof![Just(0.0), 0.0f64..1e-2],
        budget in prop_oneof![Just(1usize), Just(1usize << 12), Just(1usize << 30)],
    ) {
        let targets = host_targets(&b);
        let supervised = targets.iter().filter(|&&t| t != IGNORE_INDEX).count();
        let expected = host_loss_sum(&b, &targets, eps, z);
        let opts = CrossEntropyOptions::default()
            .with_label_smoothing(eps)
            .with_z_loss_weight(z)
            .with_chunk_memory_bytes(budget);

        let plain = evaluate(&b, &opts, LossPath::Plain);
        let fused = evaluate(&b, &opts, LossPath::Chunked);
        // Targets from the host: the same computation, bit for bit.
        let from_host = evaluate(&b, &opts, LossPath::ChunkedHostTargets);
        prop_assert_eq!(from_host.n_tokens, fused.n_tokens);
        prop_assert_eq!(&from_host.per_token, &fused.per_token);
        prop_assert_eq!(&from_host.grad_hidden, &fused.grad_hidden);
        prop_assert_eq!(&from_host.grad_weight, &fused.grad_weight);
        for (name, out) in [("plain", &plain), ("fused", &fused)] {
            prop_assert_eq!(out.n_tokens, supervised, "{}", name);
            prop_assert!(close(out.sum, expected, expected.abs()), "{} sum {} vs {}", name, out.sum, expected);
            let values = out.per_token.iter().chain(&out.grad_hidden).chain(&out.grad_weight);
            prop_assert!(values.clone().all(|v| v.is_finite()), "{} has a non-finite value", name);
            for (row, &t) in targets.iter().enumerate() {
                if t == IGNORE_INDEX {
                    prop_assert_eq!(out.per_token[row], 0.0);
                    let g = &out.grad_hidden[row * b.dim..(row + 1) * b.dim];
                    prop_assert!(g.iter().all(|&v| v == 0.0), "{} ignored row {} has gradient {:?}", name, row, g);
                }
            }
            if supervised == 0 {
                prop_assert_eq!(out.sum, 0.0);
                prop_assert_eq!(out.mean, 0.0);
                prop_assert!(out.grad_weight.iter().all(|&v| v == 0.0));
            }
            if supervised == 1 {
                prop_assert_eq!(out.mean, out.sum);
            }
        }
        let scale = |v: &[f32]| v.iter().fold(0.0f64, |m, x| m.max(x.abs() as f64));
        let (sh, sw) = (scale(&plain.grad_hidden), scale(&plain.grad_weight));
        for (a, e) in fused.grad_hidden.iter().zip(&plain.grad_hidden) {
            prop_assert!(close(*a, *e as f64, sh), "grad_hidden {} vs {}", a, e);
        }
        for (a, e) in fused.grad_weight.iter().zip(&plain.grad_weight) {
            prop_assert!(close(*a, *e as f64, sw), "grad_weight {} vs {}", a, e);
        }
    }

    /// `next_token_targets` moves each row one to the left and ends it with -100.
    #[test]
    fn shift_moves_labels_left(b in batch_strategy()) {
        let device = device();
        let labels = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(b.labels.clone(), [b.batch, b.seq]), &device);
        let shifted = to_i64(next_token_targets(labels));
        prop_assert_eq!(&shifted, &host_targets(&b));
        prop_assert_eq!(next_token_targets_host(&b.labels, b.seq), shifted);
    }

    /// Splitting a batch into micro-batches and backpropagating `sum_j / total` gives the
    /// full batch's mean: the gradient-accumulation rule of the crate docs.
    #[test]
    fn micro_batch_sums_over_total_equal_the_batch_mean(b in batch_strategy(), split in 0usize..4) {
        let device = device();
        let n = b.batch * b.seq;
        let targets = host_targets(&b);
        let logits = Tensor::<Cpu, 2>::from_data(TensorData::new(b.hidden.clone(), [n, b.dim]), &device)
            .matmul(Tensor::<Cpu, 2>::from_data(TensorData::new(b.weight.clone(), [b.vocab, b.dim]), &device).transpose());
        let t = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(targets.clone(), [n]), &device);
        let opts = CrossEntropyOptions::default();
        let whole = masked_cross_entropy(logits.clone(), t.clone(), &opts).unwrap();

        let cut = split.min(n);
        let parts = [(0, cut), (cut, n - cut)];
        let outs: Vec<_> = parts
            .iter()
            .filter(|&&(_, len)| len > 0)
            .map(|&(start, len)| {
                masked_cross_entropy(logits.clone().narrow(0, start, len), t.clone().narrow(0, start, len), &opts).unwrap()
            })
            .collect();
        let total: usize = outs.iter().map(|o| o.n_tokens).sum();
        prop_assert_eq!(total, whole.n_tokens);
        let accumulated: f32 = outs.iter().map(|o| to_f32(o.normalized_by(total))[0]).sum();
        let mean = to_f32(whole.loss)[0];
        prop_assert!(close(accumulated, mean as f64, 0.0), "{} vs {}", accumulated, mean);
    }
}

#[test]
fn all_masked_batch_is_zero_with_zero_gradients() {
    let device = device();
    let hidden = Tensor::<Ad, 2>::from_data(
        TensorData::new(vec![1.0f32, -2.0, 3.0, 0.5], [2, 2]),
        &device,
    )
    .require_grad();
    let weight = Tensor::<Ad, 2>::from_data(
        TensorData::new(vec![0.1f32, 0.2, -0.3, 0.4, 0.5, -0.6], [3, 2]),
        &device,
    )
    .require_grad();
    let targets =
        Tensor::<Ad, 1, Int>::from_data(TensorData::new(vec![IGNORE_INDEX; 2], [2]), &device);
    for reduction in [Reduction::Sum, Reduction::Mean, Reduction::None] {
        let opts = CrossEntropyOptions::default().with_reduction(reduction);
        let logits = hidden.clone().matmul(weight.clone().transpose());
        let plain = masked_cross_entropy(logits.clone(), targets.clone(), &opts).unwrap();
        let fused =
            chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), targets.clone(), &opts)
                .unwrap();
        for out in [plain, fused] {
            assert_eq!(out.n_tokens, 0);
            assert!(to_f32(out.loss.clone()).iter().all(|&v| v == 0.0));
            assert_eq!(to_f32(out.sum.clone()), vec![0.0]);
            let grads = out.loss.sum().backward();
            let gh = to_f32(hidden.grad(&grads).expect("hidden gradient exists"));
            let gw = to_f32(weight.grad(&grads).expect("weight gradient exists"));
            assert!(gh.iter().chain(&gw).all(|&v| v == 0.0), "{gh:?} {gw:?}");
        }
    }
}

#[test]
fn out_of_range_labels_are_errors() {
    let device = device();
    let logits = Tensor::<Cpu, 2>::zeros([3, 5], &device);
    let hidden = Tensor::<Cpu, 2>::zeros([3, 2], &device);
    let weight = Tensor::<Cpu, 2>::zeros([5, 2], &device);
    for (bad, position) in [(5i64, 1usize), (-1, 2), (-101, 0), (i64::from(i32::MAX), 1)] {
        let mut labels = vec![0i64, 4, IGNORE_INDEX];
        labels[position] = bad;
        let targets =
            Tensor::<Cpu, 1, Int>::from_data(TensorData::new(labels.clone(), [3]), &device);
        let expected = LossError::LabelOutOfRange {
            position,
            label: bad,
            vocab: 5,
        };
        let opts = CrossEntropyOptions::default();
        assert_eq!(
            masked_cross_entropy(logits.clone(), targets.clone(), &opts).unwrap_err(),
            expected
        );
        assert_eq!(
            chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), targets, &opts)
                .unwrap_err(),
            expected
        );
        assert_eq!(
            chunked_lm_head_cross_entropy(hidden.clone(), weight.clone(), labels.as_slice(), &opts)
                .unwrap_err(),
            expected
        );
    }
}

#[test]
fn invalid_options_are_errors() {
    let device = device();
    let logits = Tensor::<Cpu, 2>::zeros([1, 3], &device);
    let targets = Tensor::<Cpu, 1, Int>::from_data(TensorData::new(vec![1i64], [1]), &device);
    for eps in [-0.1, 1.5, f64::NAN] {
        let opts = CrossEntropyOptions::default().with_label_smoothing(eps);
        assert!(matches!(
            masked_cross_entropy(logits.clone(), targets.clone(), &opts),
            Err(LossError::InvalidLabelSmoothing(_))
        ));
    }
    let opts = CrossEntropyOptions::default().with_z_loss_weight(-1.0);
    assert!(matches!(
        masked_cross_entropy(logits, targets, &opts),
        Err(LossError::InvalidZLossWeight(_))
    ));
}

#[test]
fn single_supervised_token_mean_equals_sum() {
    let device = device();
    let logits = Tensor::<Cpu, 2>::from_data(
        TensorData::new(vec![0.5f32, -1.0, 2.0, 0.0, 1.0, 3.0], [2, 3]),
        &device,
    );
    let targets =
        Tensor::<Cpu, 1, Int>::from_data(TensorData::new(vec![IGNORE_INDEX, 2], [2]), &device);
    let mean = masked_cross_entropy(
        logits.clone(),
        targets.clone(),
        &CrossEntropyOptions::default(),
    )
    .unwrap();
    assert_eq!(mean.n_tokens, 1);
    let expected = (1.0f64.exp() + 3.0f64.exp() + 1.0).ln() - 3.0;
    assert!((to_f32(mean.loss.clone())[0] as f64 - expected).abs() < 1e-6);
    assert_eq!(to_f32(mean.loss), to_f32(mean.sum));
}

#[test]
fn shift_of_short_sequences() {
    let device = device();
    let one = Tensor::<Cpu, 2, Int>::from_data(TensorData::new(vec![7i64, 8], [2, 1]), &device);
    assert_eq!(
        to_i64(next_token_targets(one)),
        vec![IGNORE_INDEX, IGNORE_INDEX]
    );
    assert_eq!(
        next_token_targets_host(&[7, 8], 1),
        vec![IGNORE_INDEX, IGNORE_INDEX]
    );
    assert!(next_token_targets_host(&[], 0).is_empty());
}
