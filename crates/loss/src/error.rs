//! The crate's error type.

use thiserror::Error;

/// Why a loss could not be computed.
///
/// Shape mismatches between arguments are programming errors and panic with a message instead;
/// these variants cover what can come from data or configuration.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum LossError {
    /// A target that is neither in `[0, vocab)` nor the ignore index.
    #[error(
        "target {label} at position {position} is outside [0, {vocab}) and is not the ignore index -100"
    )]
    LabelOutOfRange {
        /// Flat position of the target in the `[N]` targets tensor.
        position: usize,
        /// The offending value.
        label: i64,
        /// The vocabulary size the targets were checked against.
        vocab: usize,
    },
    /// `label_smoothing` must be finite and in `[0, 1]`, as in PyTorch.
    #[error("label_smoothing must be in [0, 1], got {0}")]
    InvalidLabelSmoothing(f64),
    /// `z_loss_weight` must be finite and non-negative.
    #[error("z_loss_weight must be finite and >= 0, got {0}")]
    InvalidZLossWeight(f64),
}
