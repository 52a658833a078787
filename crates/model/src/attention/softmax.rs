//! The softmax of one block of the chunked attention, between its products: the two
//! [`AttentionBackend`](super::AttentionBackend) methods `attention_softmax` and
//! `attention_softmax_backward`, and their tensor-op bodies (the switch that picks a body for
//! every kernel of the crate is [`crate::kernels`]).
//!
//! ```text
//! forward:  x = q k^T (raw)  ->  s = mask(scale x)  ->  p = softmax(s), lse = logsumexp(s)
//! backward: x again, lse     ->  p = exp(s - lse),  dS = scale p (dP - D)
//! ```

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{FloatDType, Int, Tensor, TensorMetadata};

use super::forbidden_block;
use super::kernel::{float, primitive};

/// The value of a forbidden score: finite, so that a row with no allowed key gives no NaN, and
/// far below any real score, so that `exp` of it is 0.
const FORBIDDEN_SCORE: f32 = f32::MIN;

/// Where one block of scores sits in its attention call, and how it is masked.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScoreBlock {
    pub batch: usize,
    pub kv_heads: usize,
    /// Query heads per kv head.
    pub n_rep: usize,
    /// The block's first query row among the call's queries, and its row count.
    pub q_start: usize,
    pub rows: usize,
    /// The block's first key, and how many keys it sees.
    pub k_start: usize,
    pub keys: usize,
    /// Absolute position of the call's first query among the keys.
    pub query_offset: usize,
    pub window: Option<usize>,
    /// `1 / sqrt(head_dim)`.
    pub scale: f32,
}

impl ScoreBlock {
    fn heads(&self) -> usize {
        self.kv_heads * self.n_rep
    }

    /// The scores' layout: `[batch, kv_heads, n_rep * rows, keys]`.
    fn grouped_shape(&self) -> [usize; 4] {
        [self.batch, self.kv_heads, self.n_rep * self.rows, self.keys]
    }

    /// The same, with the query heads of a kv head on their own axis.
    fn split_shape(&self) -> [usize; 5] {
        [self.batch, self.kv_heads, self.n_rep, self.rows, self.keys]
    }

    /// A per-row statistic, `[batch, heads, rows]`, as `[batch, kv_heads, n_rep, rows, 1]`.
    fn stat_shape(&self) -> [usize; 5] {
        [self.batch, self.kv_heads, self.n_rep, self.rows, 1]
    }
}

/// The segment ids of the whole call, and the positions of `attention::positions`,
/// from which each block's mask is built.
#[derive(Debug, Clone)]
pub struct CallSegments<B: Backend> {
    /// `[batch, q_len]`
    pub query_segments: IntTensor<B>,
    /// `[batch, k_len]`
    pub key_segments: IntTensor<B>,
    /// `0..max(query_offset + q_len, k_len)`
    pub positions: IntTensor<B>,
}

/// What [`attention_softmax`](super::AttentionBackend::attention_softmax) returns.
#[derive(Debug, Clone)]
pub struct SoftmaxForward<B: Backend> {
    /// `[batch, kv_heads, n_rep * rows, keys]` in the scores' dtype; 0 on every forbidden key,
    /// so on every key of a row that sees none.
    pub probs: FloatTensor<B>,
    /// `[batch, heads, rows]` f32; `+inf` for a row that sees no key.
    pub lse: FloatTensor<B>,
}

/// What [`attention_softmax_backward`](super::AttentionBackend::attention_softmax_backward)
/// returns, each `[batch, kv_heads, n_rep * rows, keys]` in the scores' dtype.
#[derive(Debug, Clone)]
pub struct SoftmaxBackward<B: Backend> {
    /// `exp(s - lse)`, as the forward pass had them.
    pub probs: FloatTensor<B>,
    /// `scale * p * (dP - D)`, the gradient of the raw scores, where asked for.
    pub grad_scores: Option<FloatTensor<B>>,
}

/// The masked, scaled f32 scores of one block, `[batch, kv_heads, n_rep, rows, keys]`; the
/// forward and backward bodies both call this, so the backward pass recomputes exactly the
/// forward's scores.
fn masked_scores<B: Backend>(
    scores: FloatTensor<B>,
    segments: &CallSegments<B>,
    block: &ScoreBlock,
) -> Tensor<B, 5> {
    let shape = block.split_shape();
    let scores = float::<B, 4>(scores)
        .cast(FloatDType::F32)
        .mul_scalar(block.scale)
        .reshape(shape);
    let int = |t: &IntTensor<B>| Tensor::<B, 2, Int>::from_primitive(t.clone());
    let positions = Tensor::<B, 1, Int>::from_primitive(segments.positions.clone());
    let forbidden = forbidden_block(
        int(&segments.query_segments).narrow(1, block.q_start, block.rows),
        int(&segments.key_segments).narrow(1, block.k_start, block.keys),
        &positions,
        block.query_offset + block.q_start,
        block.k_start,
        block.window,
    );
    // [batch, rows, keys] -> [batch, 1, 1, rows, keys], shared by every head
    let forbidden = forbidden
        .reshape([block.batch, 1, 1, block.rows, block.keys])
        .expand(shape);
    scores.mask_fill(forbidden, FORBIDDEN_SCORE)
}

/// The forward body in tensor ops.
///
/// # Shapes
/// - scores: `[batch, kv_heads, n_rep * rows, keys]`, the raw `q k^T` of the block
/// - output: see [`SoftmaxForward`]
pub fn forward_reference<B: Backend>(
    scores: FloatTensor<B>,
    segments: &CallSegments<B>,
    block: &ScoreBlock,
) -> SoftmaxForward<B> {
    let dtype = scores.dtype();
    let scores = masked_scores(scores, segments, block); // [b, kv, n_rep, rows, keys]
    let max = scores.clone().max_dim(4); // [b, kv, n_rep, rows, 1]
    // Only a row whose every key is forbidden has the fill value as its maximum.
    let empty = max.clone().equal_elem(FORBIDDEN_SCORE);
    let exp = (scores - max.clone()).exp();
    let sum = exp.clone().sum_dim(4);
    let probs = (exp / sum.clone())
        .mask_fill(empty.clone().expand(block.split_shape()), 0.0)
        .cast(dtype)
        .reshape(block.grouped_shape());
    let lse = (max + sum.log()).mask_fill(empty, f32::INFINITY).reshape([
        block.batch,
        block.heads(),
        block.rows,
    ]);
    SoftmaxForward {
        probs: primitive(probs),
        lse: primitive(lse),
    }
}

/// The backward body in tensor ops.
///
/// # Shapes
/// - scores: as for [`forward_reference`]
/// - lse: `[batch, heads, q_len]` f32, of the whole call
/// - grad: `dP` (like the scores) and `D = rowsum(dO * O)` (`[batch, heads, q_len]` f32, of
///   the whole call)
/// - output: see [`SoftmaxBackward`]
pub fn backward_reference<B: Backend>(
    scores: FloatTensor<B>,
    lse: FloatTensor<B>,
    grad: Option<(FloatTensor<B>, FloatTensor<B>)>,
    segments: &CallSegments<B>,
    block: &ScoreBlock,
) -> SoftmaxBackward<B> {
    let dtype = scores.dtype();
    let rows = |stat: FloatTensor<B>| {
        float::<B, 3>(stat)
            .narrow(2, block.q_start, block.rows)
            .reshape(block.stat_shape())
    };
    // 0 where forbidden, and on every key of a row that sees none (its lse is +inf).
    let probs = (masked_scores(scores, segments, block) - rows(lse)).exp();
    let grad_scores = grad.map(|(grad_probs, delta)| {
        let grad_probs = float::<B, 4>(grad_probs)
            .cast(FloatDType::F32)
            .reshape(block.split_shape());
        let grad_scores = (probs.clone() * (grad_probs - rows(delta)))
            .mul_scalar(block.scale)
            .cast(dtype)
            .reshape(block.grouped_shape());
        primitive(grad_scores)
    });
    SoftmaxBackward {
        probs: primitive(probs.cast(dtype).reshape(block.grouped_shape())),
        grad_scores,
    }
}
