//! Masked cross-entropy for supervised fine-tuning, and a chunked lm_head + loss.
//!
//! ```text
//! labels [batch, seq] (-100 = not supervised, unshifted)
//!   -> next_token_targets -> targets [batch, seq] -> flatten [N]
//!   -> masked_cross_entropy(logits [N, vocab], targets)            (plain path)
//!    | chunked_lm_head_cross_entropy(hidden [N, h], W [vocab, h], targets)  (fused path)
//!   -> LossOutput { loss, sum, n_tokens }
//! ```
//!
//! # The shift
//!
//! Labels come from the data crate unshifted. [`next_token_targets`] moves them one to the left
//! and pads with -100, so that logits and hidden states keep their full length; nothing else in
//! the workspace shifts.
//!
//! # Normalisation under gradient accumulation
//!
//! Both paths return the *summed* loss over supervised tokens and the *count* of supervised
//! tokens, besides the reduction asked for. A gradient-accumulation step of `k` micro-batches
//! must divide each micro-batch's `sum` by the total count over all `k` micro-batches
//! ([`LossOutput::normalized_by`]), which is transformers' `num_items_in_batch` rule:
//!
//! ```text
//! total = sum_j n_tokens_j
//! for each micro-batch j: backward(sum_j / total)      // not backward(mean_j / k)
//! ```
//!
//! Averaging micro-batch means instead weights a token of a short micro-batch more than a token
//! of a long one, so the update depends on how the data were split. The count is a host
//! `usize`: both paths read the targets back once per call anyway, to check their range, so
//! the trainer can compute `total` before any backward pass (e.g. from the batches' labels).
//!
//! A batch with no supervised token has `sum = 0` and `n_tokens = 0`; the mean is defined as 0,
//! and the gradients are 0, never NaN.
//!
//! # Precision
//!
//! Everything after the logits is f32, whatever the input dtype (f64 inputs are computed in f32
//! as well), and the log-sum-exp subtracts the row maximum.
//!
//! The chunked path equals the plain one within 1e-5 relative (loss and both gradients) on a
//! backend whose f32 matmul is true f32, as the CPU tests check. On CUDA, burn 0.21's tensor-core
//! matmul rounds f32 operands to TF32 (`cubek-matmul`'s `adjust_dtypes`), so there both paths'
//! gradients are only TF32-accurate and differ by about 5e-4 of their largest entry; the
//! losses still agree to about 1e-6.
//!
//! # The fused path
//!
//! [`chunked_lm_head_cross_entropy`] never holds `[N, vocab]` logits: it gathers the supervised
//! rows, and computes logits and their gradient in tiles bounded by
//! [`CrossEntropyOptions::chunk_memory_bytes`]. Its backward pass is a custom autodiff node
//! that recomputes each tile (see [`ChunkedCeBackend`]).

mod chunked;
mod cross_entropy;
mod error;
mod options;
mod shift;
mod targets;

pub mod bench;

pub use chunked::{
    ChunkPlan, ChunkedCeBackend, GradRequest, GradTile, LIVE_TILE_BUFFERS, LmHeadCeForward,
    LmHeadCeGrads, LmHeadCeParams, LossKernels, MIN_TILE_COLS, TILE_COL_MULTIPLE,
    chunked_lm_head_cross_entropy, kernel, loss_kernels, set_loss_kernels,
};
pub use cross_entropy::masked_cross_entropy;
pub use error::LossError;
pub use options::{CrossEntropyOptions, LossOutput, Reduction};
pub use shift::{next_token_targets, next_token_targets_host};
pub use targets::Targets;

/// The target value that marks a position as not supervised (PyTorch's `ignore_index`).
pub const IGNORE_INDEX: i64 = -100;
