//! Memory-efficient causal attention: query chunks, grouped-query attention without repeating
//! keys and values, and a custom backward pass that recomputes the scores.
//!
//! ```text
//! q [b, heads, s, d], k/v [b, kv_heads, t, d], segment ids
//!   forward, per query chunk:  S = q_c k^T / sqrt(d) (f32, masked) -> o_c = softmax(S) v, lse_c
//!   backward, per query chunk: S again -> P = exp(S - lse) -> dV, dP, dS -> dQ, dK
//! ```
//!
//! # Algorithm
//!
//! The queries are processed `rows` at a time ([`AttentionPlan`]), each chunk against the keys
//! it can see: keys after the chunk's last query are skipped (causal), and with a window so are
//! keys before the first query's window. A chunk of `q` `[b, heads, rows, d]` is viewed as
//! `[b, kv_heads, n_rep * rows, d]` (head `g * n_rep + r` serves kv head `g`, as transformers'
//! `repeat_kv` orders them), so each kv head answers its `n_rep` query heads in one batched
//! matmul and K/V are never expanded. The scores are f32, scaled by `1 / sqrt(d)`, masked from the
//! segment ids and positions of the chunk (the `[b, rows, keys]` mask is built per chunk, never
//! the whole `[b, q, k]` one), and softmaxed with the row maximum subtracted.
//!
//! The backward pass, per chunk, recomputes `S` and `P = exp(S - lse)`, then
//!
//! ```text
//! dV += P^T dO        dP = dO V^T        D = rowsum(dO * O)
//! dS  = P (dP - D)    dQ = scale dS K    dK += scale dS^T Q
//! ```
//!
//! where the matmuls over the `n_rep * rows` axis sum `dK` and `dV` over the query heads of each
//! kv head. `dK` and `dV` accumulate in f32; the gradients come back in the inputs' dtype.
//!
//! A query row that may see no key (a padding row, segment 0) outputs zeros and has
//! `lse = +inf`, so it contributes no gradient. The reference body
//! ([`attention_reference`](crate::ops::attention_reference)) averages every value uniformly in
//! such a row instead. No loss reads a padding row and no other row attends to it, so the model's
//! outputs at real tokens and its gradients are the same either way.
//!
//! # What autodiff stores
//!
//! Under `Autodiff<B>` one node is registered per call ([`AttentionBackend::causal_attention`]); it
//! keeps, per layer:
//!
//! - `q` `[b, heads, s, d]`, `k` and `v` `[b, kv_heads, t, d]` in the activations' dtype (the
//!   node's inputs, shared with whatever produced them),
//! - the output `o` `[b, heads, s, d]` in the activations' dtype,
//! - the log-sum-exp `lse` `[b, heads, s]` in f32,
//!
//! that is O(seq) per layer. The reference body keeps O(seq^2): the shifted scores and their
//! exponent in f32, the probabilities in the activations' dtype, each `[b, heads, s, t]`, plus
//! `k` and `v` repeated to `heads`. `examples/attention_memory.rs` prints both for the 0.5b
//! shapes. The transient peak is one chunk's f32 score tiles, bounded by
//! [`AttentionParams::chunk_memory_bytes`].

mod autodiff;
mod backends;
#[cfg(feature = "cubecl")]
pub mod cube;
#[cfg(feature = "flash")]
pub mod flash;
pub mod flash_plan;
pub mod kernel;
mod mask;
pub mod softmax;

pub use mask::AttentionMask;
pub(crate) use mask::{forbidden_block, positions};
pub use softmax::{CallSegments, ScoreBlock, SoftmaxBackward, SoftmaxForward};

use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{Tensor, TensorPrimitive};

static FUSED_PASSES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many attention passes (a forward or a backward of one call) have run a fused kernel
/// ([`AttentionBackend::has_fused_attention`]) since the process started; a benchmark reports
/// the difference per step, which shows whether the fused path took the calls.
pub fn fused_attention_passes() -> u64 {
    FUSED_PASSES.load(std::sync::atomic::Ordering::Relaxed)
}

/// Counts one pass for [`fused_attention_passes`].
#[cfg_attr(not(feature = "flash"), allow(dead_code))]
pub(crate) fn count_fused_pass() {
    FUSED_PASSES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
}

/// How many `[batch, heads, rows, keys]` f32 buffers a chunk is assumed to keep alive at its
/// peak: in the backward pass the probabilities, `dP`, `dS`, and one for casts and temporaries.
/// Without kernel fusion each elementwise op materialises its result, so the true peak may
/// exceed the budget by a buffer or two; the budget is a target, not a hard limit.
pub const LIVE_SCORE_BUFFERS: usize = 4;

/// The default budget of one chunk's f32 score tiles: 1 GiB, about 292 query rows per chunk for
/// the 0.5b preset at batch 8 and 2048 keys (8 chunks per layer). Measured on the H200 (0.5b,
/// batch 8, docs/BENCHMARKS.md): fewer chunks mean fewer kernel launches, more chunks skip more
/// of the causal triangle; 1 GiB was fastest of 512 MiB, 1 GiB and 2 GiB, all three at the same
/// peak (it lies outside the attention), while 4 GiB added 8.6 GiB.
pub const DEFAULT_CHUNK_MEMORY_BYTES: usize = 1024 << 20;

/// Which body [`ops::attention`](crate::ops::attention) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AttentionImpl {
    /// [`chunked_attention`]: O(seq) stored per layer.
    #[default]
    Chunked,
    /// [`attention_reference`](crate::ops::attention_reference): the plain tensor-op body, kept
    /// to compare the fast path against.
    Reference,
}

impl std::str::FromStr for AttentionImpl {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "chunked" => Ok(Self::Chunked),
            "reference" => Ok(Self::Reference),
            other => Err(format!(
                "unknown attention `{other}`; use chunked or reference"
            )),
        }
    }
}

/// The scalar settings of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionParams {
    /// Absolute index of the first query among the keys (the cached length when decoding).
    pub query_offset: usize,
    /// For sliding layers: a query sees only the keys less than `window` positions back.
    pub window: Option<usize>,
    /// Bytes one chunk's f32 score tiles may take, see [`AttentionPlan`].
    pub chunk_memory_bytes: usize,
}

/// The query-chunk size of one attention call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionPlan {
    /// Query rows per chunk (each row across every batch row and head).
    pub query_rows: usize,
}

impl AttentionPlan {
    /// The plan for `q_len` queries against `k_len` keys under `budget_bytes`. The budget
    /// assumes every chunk sees all `k_len` keys; causal chunks see fewer. The count is at
    /// least 1, so a budget that is too small still runs, one row at a time.
    pub fn new(
        batch: usize,
        heads: usize,
        q_len: usize,
        k_len: usize,
        budget_bytes: usize,
    ) -> Self {
        let per_row = Self::bytes_per_query_row(batch, heads, k_len).max(1);
        Self {
            query_rows: (budget_bytes / per_row).clamp(1, q_len.max(1)),
        }
    }

    /// The bytes of the live f32 score tiles per query row.
    pub fn bytes_per_query_row(batch: usize, heads: usize, k_len: usize) -> usize {
        batch * heads * k_len * 4 * LIVE_SCORE_BUFFERS
    }
}

/// The inputs of one attention call, as backend primitives.
///
/// # Shapes
/// - `q`: `[batch, heads, q_len, head_dim]`
/// - `k`, `v`: `[batch, kv_heads, k_len, head_dim]`, `heads` a multiple of `kv_heads`
/// - `query_segments`: `[batch, q_len]`, `key_segments`: `[batch, k_len]`
#[derive(Debug, Clone)]
pub struct AttentionInputs<B: Backend> {
    pub q: FloatTensor<B>,
    pub k: FloatTensor<B>,
    pub v: FloatTensor<B>,
    pub query_segments: IntTensor<B>,
    pub key_segments: IntTensor<B>,
}

/// What [`AttentionBackend::causal_attention_forward`] returns.
#[derive(Debug, Clone)]
pub struct AttentionForward<B: Backend> {
    /// `[batch, heads, q_len, head_dim]`, in the inputs' dtype.
    pub output: FloatTensor<B>,
    /// `[batch, heads, q_len]`, f32: the log-sum-exp of each row's masked, scaled scores, `+inf`
    /// for a row that sees no key. The backward pass reuses it.
    pub lse: FloatTensor<B>,
}

/// Which gradients [`AttentionBackend::causal_attention_backward`] should compute.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AttentionGradRequest {
    pub q: bool,
    pub k: bool,
    pub v: bool,
}

impl AttentionGradRequest {
    pub const ALL: Self = Self {
        q: true,
        k: true,
        v: true,
    };
}

/// What [`AttentionBackend::causal_attention_backward`] returns, in the inputs' dtype, where requested.
#[derive(Debug, Clone)]
pub struct AttentionGrads<B: Backend> {
    /// `[batch, heads, q_len, head_dim]`
    pub q: Option<FloatTensor<B>>,
    /// `[batch, kv_heads, k_len, head_dim]`
    pub k: Option<FloatTensor<B>>,
    /// `[batch, kv_heads, k_len, head_dim]`
    pub v: Option<FloatTensor<B>>,
}

/// A backend that can run the memory-efficient causal attention.
///
/// - `causal_attention_forward` and `causal_attention_backward` are the two kernels. Their default bodies
///   ([`kernel::forward`], [`kernel::backward`]) are plain tensor ops over query chunks set by
///   [`AttentionPlan`]; a backend with a fused kernel overrides them.
/// - `attention` is the differentiable op. On a plain backend it is the forward kernel. On
///   `Autodiff<B>` it runs `B`'s forward kernel with no graph inside and registers one backward
///   node that calls `B`'s backward kernel, which recomputes each chunk's scores. So autodiff
///   stores only `q`, `k`, `v`, the output and the `[b, heads, q_len]` log-sum-exp.
///
/// Implemented for `Autodiff<B, C>` whenever `B` implements it, and, behind this crate's
/// features, for Flex (`flex`), NdArray (`ndarray`), every CubeCL backend (`cubecl`, e.g. CUDA,
/// WGPU) and the fusion decorator (`fusion`). Another backend needs a one-line empty impl in
/// `attention/backends.rs` (Rust's coherence rules forbid a blanket impl beside the one for
/// `Autodiff`).
///
/// It extends [`LinearBackend`](crate::LinearBackend) and
/// [`RowwiseBackend`](crate::RowwiseBackend), so that one bound gives the model every
/// replaceable kernel.
pub trait AttentionBackend: crate::LinearBackend + crate::RowwiseBackend {
    /// Output and log-sum-exp. Not differentiable, even on `Autodiff<B>`; use
    /// [`causal_attention`](Self::causal_attention) for that.
    fn causal_attention_forward(
        inputs: AttentionInputs<Self>,
        params: &AttentionParams,
    ) -> AttentionForward<Self> {
        kernel::forward::<Self>(inputs, params)
    }

    /// Gradients of `sum(grad_output * output)` with respect to `q`, `k` and `v`, given the
    /// forward's output and log-sum-exp.
    ///
    /// # Shapes
    /// - `grad_output`: `[batch, heads, q_len, head_dim]`, like the output
    fn causal_attention_backward(
        inputs: AttentionInputs<Self>,
        forward: AttentionForward<Self>,
        grad_output: FloatTensor<Self>,
        params: &AttentionParams,
        request: AttentionGradRequest,
    ) -> AttentionGrads<Self> {
        kernel::backward::<Self>(inputs, forward, grad_output, params, request)
    }

    /// The softmax of one block of [`kernel::forward`], between its two products.
    ///
    /// # Shapes
    /// - scores: `[batch, kv_heads, n_rep * rows, keys]`, the block's raw `q k^T`
    /// - output: see [`SoftmaxForward`]
    fn attention_softmax(
        scores: FloatTensor<Self>,
        segments: &CallSegments<Self>,
        block: &ScoreBlock,
    ) -> SoftmaxForward<Self> {
        softmax::forward_reference::<Self>(scores, segments, block)
    }

    /// The softmax part of one block of [`kernel::backward`]: the probabilities recomputed from
    /// the raw scores and the forward's `lse`, and, given `dP = dO V^T` and
    /// `D = rowsum(dO * O)`, the gradient of the raw scores.
    ///
    /// # Shapes
    /// - scores: as for [`attention_softmax`](Self::attention_softmax); `dP` the same
    /// - lse, `D`: `[batch, heads, q_len]` f32, of the whole call
    /// - output: see [`SoftmaxBackward`]
    fn attention_softmax_backward(
        scores: FloatTensor<Self>,
        lse: FloatTensor<Self>,
        grad: Option<(FloatTensor<Self>, FloatTensor<Self>)>,
        segments: &CallSegments<Self>,
        block: &ScoreBlock,
    ) -> SoftmaxBackward<Self> {
        softmax::backward_reference::<Self>(scores, lse, grad, segments, block)
    }

    /// Whether the two softmax methods run a kernel of their own rather than tensor ops (the
    /// fusion decorator hands them to its inner backend only then).
    fn has_softmax_kernel() -> bool {
        false
    }

    /// Whether [`causal_attention_forward`](Self::causal_attention_forward) and
    /// [`causal_attention_backward`](Self::causal_attention_backward) run a fused kernel of
    /// their own for a call of these sizes and settings (CUDA: `attention::flash`); the fusion
    /// decorator then hands each pass to its inner backend as one operation.
    ///
    /// # Shapes
    /// - q: `[batch, heads, q_len, head_dim]`, k: `[batch, kv_heads, k_len, head_dim]`
    fn has_fused_attention(
        _q: &burn::tensor::Shape,
        _k: &burn::tensor::Shape,
        _dtype: burn::tensor::DType,
        _params: &AttentionParams,
    ) -> bool {
        false
    }

    /// The differentiable output, `[batch, heads, q_len, head_dim]`.
    fn causal_attention(
        inputs: AttentionInputs<Self>,
        params: &AttentionParams,
    ) -> FloatTensor<Self> {
        Self::causal_attention_forward(inputs, params).output
    }
}

/// Causal grouped-query attention, `softmax(q k^T / sqrt(head_dim)) v` with the softmax in f32,
/// in query chunks and with a backward pass that recomputes them (see the module docs).
///
/// # Shapes
/// - q: `[batch, heads, q_len, head_dim]`
/// - k, v: `[batch, kv_heads, k_len, head_dim]`
/// - output: `[batch, heads, q_len, head_dim]`, in q's dtype
pub fn chunked_attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Tensor<B, 4> {
    let inputs = AttentionInputs {
        q: q.into_primitive().tensor(),
        k: k.into_primitive().tensor(),
        v: v.into_primitive().tensor(),
        query_segments: mask.query_segments.clone().into_primitive(),
        key_segments: mask.key_segments.clone().into_primitive(),
    };
    Tensor::from_primitive(TensorPrimitive::Float(B::causal_attention(
        inputs,
        &mask.params(),
    )))
}
