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
    let target_logit = x.clone().gather(1, targets.unsqueeze_dim(1)); // [rows, 1]
    let mean_logit = (label_smoothing > 0.0).then(|| x.clone().mean_dim(1)); // [rows, 1]
    // The maximum only shifts the exponent; d lse / d max is exactly 0, so it needs no gradient.
    let max = x.clone().max_dim(1).detach(); // [rows, 1]
    let lse = (x - max.clone()).exp().sum_dim(1).log() + max; // [rows, 1]

    let mut loss = lse.clone() - target_logit.mul_scalar(1.0 - label_smoothing);
    if let Some(mean_logit) = mean_logit {
        loss = loss - mean_logit.mul_scalar(label_smoothing);
    }
    if z_loss_weight > 0.0 {
        loss = loss + lse.clone().powi_scalar(2).mul_scalar(z_loss_weight);
    }
    (loss, lse)
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
