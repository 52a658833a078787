//! Options and output shared by the plain and the chunked path.

use burn::tensor::{DType, Tensor, backend::Backend};
use serde::{Deserialize, Serialize};

use crate::LossError;

/// How the per-token losses are reduced into [`LossOutput::loss`].
///
/// Whatever the reduction, [`LossOutput::sum`] and [`LossOutput::n_tokens`] are always filled:
/// a trainer that accumulates gradients should use those (see the crate docs).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Reduction {
    /// Sum over supervised tokens, shape `[1]`.
    Sum,
    /// Sum divided by the number of supervised tokens, shape `[1]`; defined as 0 when there are
    /// none (PyTorch gives NaN there).
    #[default]
    Mean,
    /// One loss per position, shape `[N]`, with 0 at ignored positions.
    None,
}

/// Options of [`masked_cross_entropy`](crate::masked_cross_entropy) and
/// [`chunked_lm_head_cross_entropy`](crate::chunked_lm_head_cross_entropy).
///
/// Per supervised token with logits `x`, target `t` and `lse = logsumexp(x)`:
///
/// ```text
/// loss = (1 - ε) (lse - x[t]) + ε (lse - mean(x)) + λ lse²
/// ```
///
/// where `ε = label_smoothing` (PyTorch's definition: the target distribution is
/// `(1 - ε) one_hot(t) + ε / vocab`) and `λ = z_loss_weight` (PaLM's auxiliary z-loss, which
/// pushes `lse` towards 0). With both at 0 this is `F.cross_entropy(x, t, ignore_index=-100)`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct CrossEntropyOptions {
    /// How [`LossOutput::loss`] is reduced. Default: [`Reduction::Mean`], as in PyTorch.
    pub reduction: Reduction,
    /// Label smoothing `ε` in `[0, 1]`. Default: 0.
    pub label_smoothing: f64,
    /// z-loss weight `λ >= 0` (PaLM uses 1e-4). Default: 0.
    pub z_loss_weight: f64,
    /// Chunked path only: the bytes that one chunk's f32 logits and their temporaries may take.
    /// The chunk shape is derived from it (see [`ChunkPlan`](crate::ChunkPlan)). It scales the
    /// working set; the weight gradient (`[vocab, hidden]`) comes on top. Default: 256 MiB.
    ///
    /// Measured on an H200 with `Autodiff<Cuda>` (fusion, autotune) at 16,384 tokens, half
    /// supervised, hidden 896 and vocabulary 151,936: the default took 1.36 GiB of device memory
    /// beyond the inputs, weight gradient included, so the live working set is about three times
    /// the budget there; 128 MiB saved nothing and ran 30% slower, 1 GiB ran 14% faster for
    /// 2.6 GiB more.
    pub chunk_memory_bytes: usize,
}

impl Default for CrossEntropyOptions {
    fn default() -> Self {
        Self {
            reduction: Reduction::Mean,
            label_smoothing: 0.0,
            z_loss_weight: 0.0,
            chunk_memory_bytes: 256 << 20,
        }
    }
}

impl CrossEntropyOptions {
    /// Returns the options with `reduction` set.
    pub fn with_reduction(mut self, reduction: Reduction) -> Self {
        self.reduction = reduction;
        self
    }

    /// Returns the options with `label_smoothing` set.
    pub fn with_label_smoothing(mut self, label_smoothing: f64) -> Self {
        self.label_smoothing = label_smoothing;
        self
    }

    /// Returns the options with `z_loss_weight` set.
    pub fn with_z_loss_weight(mut self, z_loss_weight: f64) -> Self {
        self.z_loss_weight = z_loss_weight;
        self
    }

    /// Returns the options with `chunk_memory_bytes` set.
    pub fn with_chunk_memory_bytes(mut self, chunk_memory_bytes: usize) -> Self {
        self.chunk_memory_bytes = chunk_memory_bytes;
        self
    }

    /// Checks the values that can come from a config file.
    pub fn validate(&self) -> Result<(), LossError> {
        let eps = self.label_smoothing;
        if !(eps.is_finite() && (0.0..=1.0).contains(&eps)) {
            return Err(LossError::InvalidLabelSmoothing(eps));
        }
        let z = self.z_loss_weight;
        if !(z.is_finite() && z >= 0.0) {
            return Err(LossError::InvalidZLossWeight(z));
        }
        Ok(())
    }
}

/// What both loss paths return.
///
/// All tensors are f32, whatever the dtype of the logits or hidden states.
#[derive(Debug, Clone)]
pub struct LossOutput<B: Backend> {
    /// The loss reduced as [`CrossEntropyOptions::reduction`] asks: `[1]` for `Sum` and `Mean`,
    /// `[N]` for `None` (0 at ignored positions).
    pub loss: Tensor<B, 1>,
    /// The summed loss over supervised tokens, `[1]`; 0 when there are none.
    pub sum: Tensor<B, 1>,
    /// The number of supervised targets (those that are not -100), counted on the host.
    pub n_tokens: usize,
}

impl<B: Backend> LossOutput<B> {
    /// `sum / total_tokens`: the loss to backpropagate for one micro-batch when a gradient
    /// accumulation step holds `total_tokens` supervised tokens over all its micro-batches.
    /// `total_tokens == 0` gives 0 (the sum is then 0 too).
    pub fn normalized_by(&self, total_tokens: usize) -> Tensor<B, 1> {
        self.sum.clone().div_scalar(total_tokens.max(1) as f32)
    }
}

/// The dtype every loss is computed in.
pub(crate) const LOSS_DTYPE: DType = DType::F32;
