//! The plain path: cross-entropy over materialised `[N, vocab]` logits.

use burn::tensor::{Int, Tensor, backend::Backend};

use crate::{
    CrossEntropyOptions, IGNORE_INDEX, LossError, LossOutput, Reduction, options::LOSS_DTYPE,
    targets::check_targets,
};

/// Masked cross-entropy over logits, ignoring targets equal to [`IGNORE_INDEX`].
///
/// The logits are cast to f32 first, whatever their dtype, and the log-sum-exp subtracts the
/// row maximum, so bf16 logits and large values are safe. Targets are read back to the host
/// once to check their range (see [`LossError::LabelOutOfRange`]) and to count the supervised
/// tokens, which costs one device sync per call.
///
/// Works on any backend; under `Autodiff<B>`, `output.sum.backward()` (or the reduced
/// `output.loss`) gives the gradient of the logits.
///
/// # Shapes
/// - `logits`: `[N, vocab]` (flatten `[batch, seq, vocab]` first)
/// - `targets`: `[N]`, from [`next_token_targets`](crate::next_token_targets) flattened
pub fn masked_cross_entropy<B: Backend>(
    logits: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    opts: &CrossEntropyOptions,
) -> Result<LossOutput<B>, LossError> {
    let [n, vocab] = logits.dims();
    let [n_targets] = targets.dims();
    assert_eq!(
        n, n_targets,
        "masked_cross_entropy: logits have {n} rows but targets have {n_targets}"
    );
    opts.validate()?;
    let checked = check_targets(&targets, vocab)?;
    let n_tokens = checked.rows.len();
    let device = logits.device();
    if n == 0 {
        return Ok(constant_zero_output(0, opts.reduction, &device));
    }

    let ignored = targets.clone().equal_elem(IGNORE_INDEX); // [N]
    // Ignored rows gather column 0 and are masked out below.
    let safe_targets = targets.mask_fill(ignored.clone(), 0); // [N]

    let x = logits.cast(LOSS_DTYPE); // [N, vocab]
    let per_row = row_losses(x, safe_targets, opts); // [N, 1]
    let per_token = per_row.reshape([n]).mask_fill(ignored, 0.0); // [N]
    let sum = per_token.clone().sum(); // [1]
    let loss = match opts.reduction {
        Reduction::Sum => sum.clone(),
        Reduction::Mean => sum.clone().div_scalar(n_tokens.max(1) as f32),
        Reduction::None => per_token,
    };
    Ok(LossOutput {
        loss,
        sum,
        n_tokens,
    })
}

/// Per-row loss of f32 logits against in-range targets.
///
/// # Shapes
/// - `x`: `[rows, vocab]`, f32
/// - `targets`: `[rows]`
/// - output: `[rows, 1]`
pub(crate) fn row_losses<B: Backend>(
    x: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    opts: &CrossEntropyOptions,
) -> Tensor<B, 2> {
    let (loss, _lse) = row_losses_with_lse(
        x,
        targets,
        opts.label_smoothing as f32,
        opts.z_loss_weight as f32,
    );
    loss
}

/// Per-row loss and log-sum-exp; the formula is in [`CrossEntropyOptions`].
///
/// # Shapes
/// - `x`: `[rows, vocab]`, f32
/// - `targets`: `[rows]`
/// - output: (`[rows, 1]`, `[rows, 1]`)
pub(crate) fn row_losses_with_lse<B: Backend>(
    x: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    label_smoothing: f32,
    z_loss_weight: f32,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let stats = row_stats(x, targets, label_smoothing > 0.0);
    losses_from_stats(stats, label_smoothing, z_loss_weight)
}

/// What the loss needs of each row of logits, `[rows, 3]`: the log-sum-exp, the target's logit
/// and the mean logit (0 unless `with_mean`: only label smoothing reads it).
///
/// # Shapes
/// - `x`: `[rows, vocab]`, f32
/// - `targets`: `[rows]`
/// - output: `[rows, 3]`
pub(crate) fn row_stats<B: Backend>(
    x: Tensor<B, 2>,
    targets: Tensor<B, 1, Int>,
    with_mean: bool,
) -> Tensor<B, 2> {
    let [rows, vocab] = x.dims();
    let target_logit = x.clone().gather(1, targets.unsqueeze_dim(1)); // [rows, 1]
    let mean_logit = if with_mean {
        row_reduce(x.clone(), Tensor::sum_dim).div_scalar(vocab as f32)
    } else {
        Tensor::zeros([rows, 1], (&x.device(), x.dtype()))
    }; // [rows, 1]
    // The maximum only shifts the exponent; d lse / d max is exactly 0, so it needs no gradient.
    let max = row_reduce(x.clone(), Tensor::max_dim).detach(); // [rows, 1]
    let lse = row_reduce((x - max.clone()).exp(), Tensor::sum_dim).log() + max; // [rows, 1]
    Tensor::cat(vec![lse, target_logit, mean_logit], 1)
}

/// Per-row loss and log-sum-exp from [`row_stats`]' columns:
/// `lse - (1 - ε) x_t - ε mean(x) + λ lse²`.
///
/// # Shapes
/// - `stats`: `[rows, 3]`
/// - output: (`[rows, 1]`, `[rows, 1]`)
pub(crate) fn losses_from_stats<B: Backend>(
    stats: Tensor<B, 2>,
    label_smoothing: f32,
    z_loss_weight: f32,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let column = |i: usize| stats.clone().narrow(1, i, 1); // [rows, 1]
    let lse = column(0);
    let mut loss = lse.clone() - column(1).mul_scalar(1.0 - label_smoothing);
    if label_smoothing > 0.0 {
        loss = loss - column(2).mul_scalar(label_smoothing);
    }
    if z_loss_weight > 0.0 {
        loss = loss + lse.clone().powi_scalar(2).mul_scalar(z_loss_weight);
    }
    (loss, lse)
}

/// Rows at least this long are reduced in two stages by [`row_reduce`].
const SPLIT_MIN_LEN: usize = 4096;

/// How many parts [`row_reduce`] splits a row of `len` into: the largest power of two up to
/// 256 that divides `len`, or `None` (one stage) for short rows or fewer than 16 parts.
fn row_parts(len: usize) -> Option<usize> {
    if len < SPLIT_MIN_LEN {
        return None;
    }
    let parts = (1usize << len.trailing_zeros()).min(256);
    (parts >= 16).then_some(parts)
}

/// Reduces `[rows, len]` to `[rows, 1]` with `reduce` (`Tensor::sum_dim`, `Tensor::max_dim`),
/// in two stages when the row is long.
///
/// Without autotuning, CubeCL's reduction gives each output one thread: a loss tile of a few
/// hundred rows by 151,936 columns was reduced by a few hundred threads, 22 ms a tile on the
/// H200 (docs/BENCHMARKS.md). Viewed as `[rows, len / parts, parts]`, the first stage reduces
/// the middle axis with `rows * parts` threads reading adjacent addresses, and the second
/// reduces `parts` values per row. A max is the same either way; a sum differs only by the
/// order of its additions.
fn row_reduce<B: Backend>(
    x: Tensor<B, 2>,
    reduce: impl Fn(Tensor<B, 3>, usize) -> Tensor<B, 3>,
) -> Tensor<B, 2> {
    let [rows, len] = x.dims();
    let last_stage = match row_parts(len) {
        Some(parts) => reduce(x.reshape([rows, len / parts, parts]), 1), // [rows, 1, parts]
        None => x.reshape([rows, 1, len]),
    };
    reduce(last_stage, 2).reshape([rows, 1])
}

/// An output of exact zeros with no graph behind it, for inputs with no rows at all.
pub(crate) fn constant_zero_output<B: Backend>(
    n: usize,
    reduction: Reduction,
    device: &B::Device,
) -> LossOutput<B> {
    let sum = Tensor::<B, 1>::zeros([1], (device, LOSS_DTYPE));
    let loss = match reduction {
        Reduction::None => Tensor::zeros([n], (device, LOSS_DTYPE)),
        Reduction::Sum | Reduction::Mean => sum.clone(),
    };
    LossOutput {
        loss,
        sum,
        n_tokens: 0,
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::Flex;
    use burn::tensor::{Distribution, Tolerance};

    use super::*;

    type B = Flex;

    #[test]
    fn row_parts_splits_long_rows_only() {
        assert_eq!(row_parts(151_936), Some(128)); // 2^7 * 1187: Qwen's padded vocabulary
        assert_eq!(row_parts(1 << 20), Some(256));
        assert_eq!(row_parts(4095), None);
        assert_eq!(row_parts(4096 * 3), Some(256));
        assert_eq!(row_parts(8 * 1187), None); // too few parts to be worth a second stage
    }

    #[test]
    fn two_stage_reduction_equals_one_stage() {
        let device = Default::default();
        B::seed(&device, 0);
        for len in [151_936 / 8, 8 * 1187, 300] {
            let x = Tensor::<B, 2>::random([5, len], Distribution::Normal(0.0, 3.0), &device);
            let max = row_reduce(x.clone(), Tensor::max_dim);
            max.into_data()
                .assert_eq(&x.clone().max_dim(1).into_data(), true);
            // Positive terms, so that a relative tolerance means something; against the exact
            // sum in f64. An f32 sum of 19k terms is itself off by about sqrt(n) * 2^-24, a few
            // 1e-6, and a heavy-tailed draw has been seen at 1.6e-5: the tolerance is 1e-4, which
            // still catches a lost or doubled part (on the order of a hundredth of a row).
            let x = x.exp();
            let values = x.to_data().to_vec::<f32>().unwrap();
            let exact: Vec<f32> = values
                .chunks(len)
                .map(|row| row.iter().map(|&v| f64::from(v)).sum::<f64>() as f32)
                .collect();
            let sum = row_reduce(x, Tensor::sum_dim);
            sum.into_data().assert_approx_eq::<f32>(
                &burn::tensor::TensorData::new(exact, [5, 1]),
                Tolerance::relative(1e-4),
            );
        }
    }
}
