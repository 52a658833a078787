//! The one-token shift from labels to next-token targets.

use burn::tensor::{Int, Tensor, backend::Backend};

use crate::IGNORE_INDEX;

/// Turns unshifted labels into next-token targets: `targets[b, i] = labels[b, i + 1]`, and the
/// last column is [`IGNORE_INDEX`].
///
/// Position `i` of the logits (or hidden states) predicts token `i + 1`, so after this shift the
/// logits keep their full length and line up with the targets position by position. Summing the
/// loss of `logits[:, i]` against `targets[:, i]` is the same as the classic
/// `logits[:, :-1]` against `labels[:, 1:]` (transformers' `shift_labels`): the extra last
/// column is ignored. This is the only place in the workspace that shifts labels.
///
/// # Shapes
/// - `labels`: `[batch, seq]`, -100 where not supervised
/// - output: `[batch, seq]`
pub fn next_token_targets<B: Backend>(labels: Tensor<B, 2, Int>) -> Tensor<B, 2, Int> {
    let [batch, seq] = labels.dims();
    let device = labels.device();
    let pad = Tensor::<B, 2, Int>::full([batch, 1], IGNORE_INDEX, (&device, labels.dtype()));
    if seq == 0 {
        return labels;
    }
    if seq == 1 {
        return pad;
    }
    // [batch, seq - 1] ++ [batch, 1] -> [batch, seq]
    Tensor::cat(vec![labels.narrow(1, 1, seq - 1), pad], 1)
}

/// [`next_token_targets`] of labels held on the host, `[batch, seq]` row-major: the same
/// values, without a device round trip (a trainer's batches start on the host).
///
/// # Panics
/// If `labels.len()` is not a multiple of `seq` (a zero `seq` needs empty labels).
pub fn next_token_targets_host(labels: &[i64], seq: usize) -> Vec<i64> {
    if seq == 0 {
        assert!(
            labels.is_empty(),
            "next_token_targets_host: seq 0 but {} labels",
            labels.len()
        );
        return Vec::new();
    }
    assert!(
        labels.len().is_multiple_of(seq),
        "next_token_targets_host: {} labels are not rows of {seq}",
        labels.len()
    );
    labels
        .chunks(seq)
        .flat_map(|row| row[1..].iter().copied().chain([IGNORE_INDEX]))
        .collect()
}
