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

/// The next-token targets of a loss, `[N]`, from
/// [`next_token_targets`](crate::next_token_targets) (or
/// [`next_token_targets_host`](crate::next_token_targets_host)) flattened, where they are.
///
/// The loss needs them on the host (which rows are supervised, and a check of every value), so
/// a device tensor is read back, and the host waits for everything queued before it, the
/// model's whole forward pass included. A trainer builds its batches on the host and can pass
/// them as they are: nothing to wait for, and the device's queue stays full.
#[derive(Debug, Clone)]
pub enum Targets<'a, B: Backend> {
    /// On the device: read back to the host (one sync of the device's queue).
    Device(Tensor<B, 1, Int>),
    /// On the host already.
    Host(&'a [i64]),
}

impl<B: Backend> Targets<'_, B> {
    /// `N`.
    pub fn len(&self) -> usize {
        match self {
            Targets::Device(t) => t.dims()[0],
            Targets::Host(values) => values.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads the targets (a device tensor: one sync) and checks every value.
    pub(crate) fn check(&self, vocab: usize) -> Result<CheckedTargets, LossError> {
        match self {
            Targets::Device(t) => check_targets(t, vocab),
            Targets::Host(values) => check_values(values.iter().copied(), vocab),
        }
    }
}

impl<B: Backend> From<Tensor<B, 1, Int>> for Targets<'_, B> {
    fn from(targets: Tensor<B, 1, Int>) -> Self {
        Targets::Device(targets)
    }
}

impl<'a, B: Backend> From<&'a [i64]> for Targets<'a, B> {
    fn from(targets: &'a [i64]) -> Self {
        Targets::Host(targets)
    }
}

/// Reads `targets` to the host (one device sync per call) and checks every value.
///
/// An out-of-range target would otherwise reach a `gather` whose behaviour on out-of-bounds
/// indices is backend-specific (a panic on the CPU, garbage or a fault on a GPU).
pub(crate) fn check_targets<B: Backend>(
    targets: &Tensor<B, 1, Int>,
    vocab: usize,
) -> Result<CheckedTargets, LossError> {
    check_values(targets.to_data().iter::<i64>(), vocab)
}

/// Checks every target and splits them by supervision.
fn check_values(
    targets: impl Iterator<Item = i64>,
    vocab: usize,
) -> Result<CheckedTargets, LossError> {
    let mut rows = Vec::new();
    let mut labels = Vec::new();
    for (position, label) in targets.enumerate() {
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
