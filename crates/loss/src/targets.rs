//! Host-side checks of the targets.

use burn::tensor::{Int, Tensor, backend::Backend};

use crate::{IGNORE_INDEX, LossError};

/// The targets read back to the host, checked, and split by supervision.
pub(crate) struct CheckedTargets {
    /// Positions whose target is not [`IGNORE_INDEX`], in increasing order.
    pub(crate) rows: Vec<i64>,
    /// The targets at those positions, each in `[0, vocab)`.
    pub(crate) labels: Vec<i64>,
}

/// Reads `targets` to the host (one device sync per call) and checks every value.
///
/// An out-of-range target would otherwise reach a `gather` whose behaviour on out-of-bounds
/// indices is backend-specific (a panic on the CPU, garbage or a fault on a GPU).
pub(crate) fn check_targets<B: Backend>(
    targets: &Tensor<B, 1, Int>,
    vocab: usize,
) -> Result<CheckedTargets, LossError> {
    let data = targets.to_data();
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (position, label) in data.iter::<i64>().enumerate() {
        if label == IGNORE_INDEX {
            continue;
        }
        if label < 0 || label as u64 >= vocab as u64 {
            return Err(LossError::LabelOutOfRange {
                position,
                label,
                vocab,
            });
        }
        rows.push(position as i64);
        labels.push(label);
    }
    Ok(CheckedTargets { rows, labels })
}
