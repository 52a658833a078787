//! The hot operations of the model, each one function.
//!
//! The model calls attention, RMSNorm, RoPE, SwiGLU, the linear layers and the embedding only
//! through this module, so that a faster kernel for one backend can replace a body here without
//! touching the model. The bodies below are the reference: plain burn tensor ops, correct on
//! every backend and under autodiff.

use burn::tensor::activation::{silu, softmax};
use burn::tensor::backend::Backend;
use burn::tensor::{DType, FloatDType, Int, Tensor, TensorPrimitive};

pub use crate::attention::AttentionMask;
use crate::attention::{AttentionBackend, AttentionImpl, chunked_attention};
use crate::linear::LinearBackend;
use crate::rowwise::RowwiseBackend;

/// `x @ weight^T + bias`, with `weight` in Hugging Face layout `[out, in]`.
///
/// The weight is cast to the activations' dtype, so f32 master weights serve bf16 compute;
/// under autodiff the backward pass casts it again rather than keeping the copy
/// ([`LinearBackend::dense_cast`]). Weight and bias go through
/// [`GemmBackend::cast_param`](qwen_gemm::GemmBackend::cast_param), which hands out the
/// optimizer's copy of a parameter where it kept one.
///
/// # Shapes
/// - x: `[..., in]`
/// - weight: `[out, in]`, bias: `[out]`
/// - output: `[..., out]`
pub fn linear<B: LinearBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 2>,
    bias: Option<Tensor<B, 1>>,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let dims = x.dims();
    let [out_features, in_features] = weight.dims();
    let rows = dims[..D - 1].iter().product();
    // [rows, in] @ [out, in]^T -> [rows, out], on the backend's own kernel where it has one.
    // A 2-d `x` goes in as it is, with no reshape of its own: layers that read one `x` then
    // share its autodiff node, so that the backward adds their gradients as it multiplies
    // (`LinearBackend::dense`).
    let x = if D == 2 {
        x.into_primitive().tensor()
    } else {
        x.reshape([rows, in_features]).into_primitive().tensor()
    };
    let w = weight.into_primitive().tensor();
    let y = B::dense_cast(x, w);
    let y = match bias {
        Some(bias) => B::add_bias(y, B::cast_param(bias.into_primitive().tensor(), dtype)),
        None => y,
    };
    if D == 2 {
        return Tensor::from_primitive(TensorPrimitive::Float(y));
    }
    let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y));
    let mut out_dims = dims;
    out_dims[D - 1] = out_features;
    y.reshape(out_dims)
}

/// A parameter in `dtype` for compute (an f32 master weight for bf16 products):
/// [`GemmBackend::cast_param`](qwen_gemm::GemmBackend::cast_param), the copy the optimizer kept
/// for its value where there is one, else a cast; differentiable, as a cast.
pub fn cast_param<B: qwen_gemm::GemmBackend, const D: usize>(
    t: Tensor<B, D>,
    dtype: DType,
) -> Tensor<B, D> {
    let cast = B::cast_param(t.into_primitive().tensor(), dtype);
    Tensor::from_primitive(TensorPrimitive::Float(cast))
}

/// Token embedding lookup: under autodiff one node whose backward adds each position's
/// gradient into its token's row ([`RowwiseBackend::token_embedding_backward`]).
///
/// # Shapes
/// - weight: `[vocab, hidden]`, ids: `[batch, seq]`
/// - output: `[batch, seq, hidden]`
pub fn embedding<B: RowwiseBackend>(weight: Tensor<B, 2>, ids: Tensor<B, 2, Int>) -> Tensor<B, 3> {
    let [batch, seq] = ids.dims();
    let [_, hidden] = weight.dims();
    let ids = ids.reshape([batch * seq]).into_primitive();
    let rows = B::token_embedding(weight.into_primitive().tensor(), ids); // [batch * seq, hidden]
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(rows)).reshape([batch, seq, hidden])
}

/// RMSNorm as in transformers' `Qwen2RMSNorm`: normalised in f32, cast back to the input's
/// dtype, then scaled by `weight`.
///
/// The body is [`RowwiseBackend::rms_norm`]: the values of [`rms_norm_reference`], and under
/// autodiff one node that keeps `x`, the weight and a `[rows, 1]` f32 `rstd` (see
/// [`crate::rowwise`]).
///
/// # Shapes
/// - x: `[..., hidden]`, weight: `[hidden]`
pub fn rms_norm<B: RowwiseBackend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let dims = x.dims();
    let rows = dims[..D - 1].iter().product();
    // [..., hidden] -> [rows, hidden]; a 2-d `x` goes in as it is, with no reshape of its own,
    // so that the norm's node reads `x`'s (under autodiff the norm's backward then adds the
    // gradient that `x`'s other readers, a residual addition, gave it, see
    // `RowwiseBackend::rms_norm_backward`).
    let weight = B::cast_param(weight.into_primitive().tensor(), dtype);
    if D == 2 {
        let y = B::rms_norm(x.into_primitive().tensor(), weight, eps);
        return Tensor::from_primitive(TensorPrimitive::Float(y));
    }
    let x = x.reshape([rows, dims[D - 1]]).into_primitive().tensor();
    let y = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(B::rms_norm(x, weight, eps)));
    y.reshape(dims)
}

/// The reference body of [`rms_norm`] in plain tensor ops, whose autodiff keeps `x` in f32 and
/// the normalised rows. Kept for tests.
///
/// # Shapes
/// - x: `[..., hidden]`, weight: `[hidden]`
pub fn rms_norm_reference<B: Backend, const D: usize>(
    x: Tensor<B, D>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> Tensor<B, D> {
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    // [..., 1]
    let variance = x.clone().square().mean_dim(D - 1);
    let normed = x * (variance + eps).sqrt().recip();
    normed.cast(dtype) * weight.cast(dtype).unsqueeze::<D>()
}

/// `silu(gate) * up`, the SwiGLU gate of the MLP.
///
/// The body is [`RowwiseBackend::swiglu`]: under autodiff one node that keeps only `gate` and
/// `up` (see [`crate::rowwise`]).
///
/// # Shapes
/// - gate, up: `[..., intermediate]`
pub fn swiglu<B: RowwiseBackend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    let dims = gate.dims();
    let rows = dims[..D - 1].iter().product();
    // [..., intermediate] -> [rows, intermediate]
    let flat = |t: Tensor<B, D>| t.reshape([rows, dims[D - 1]]).into_primitive().tensor();
    let y = B::swiglu(flat(gate), flat(up));
    Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(y)).reshape(dims)
}

/// The reference body of [`swiglu`] in plain tensor ops, whose autodiff keeps `gate`,
/// `sigmoid(gate)`, `silu(gate)` and `up`. Kept for tests.
pub fn swiglu_reference<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    silu(gate) * up
}

/// The cosine and sine tables of rotary embeddings for the given positions.
///
/// Computed in f32 like transformers (`inv_freq = 1 / theta^(2i/d)`, the angles duplicated
/// across both halves), then cast to `dtype`.
///
/// # Shapes
/// - position_ids: `[batch, seq]`
/// - output: two tensors `[batch, 1, seq, head_dim]`
pub fn rotary_tables<B: Backend>(
    position_ids: Tensor<B, 2, Int>,
    head_dim: usize,
    theta: f64,
    dtype: DType,
) -> (Tensor<B, 4>, Tensor<B, 4>) {
    let device = position_ids.device();
    let [batch, seq] = position_ids.dims();
    let half = head_dim / 2;
    let inv_freq: Vec<f32> = (0..half)
        .map(|i| 1.0 / (theta as f32).powf((2 * i) as f32 / head_dim as f32))
        .collect();
    // [1, 1, half]
    let inv_freq = Tensor::<B, 1>::from_floats(inv_freq.as_slice(), &device)
        .cast(FloatDType::F32)
        .reshape([1, 1, half]);
    // [batch, seq, 1] * [1, 1, half] -> [batch, seq, half]
    let freqs = position_ids
        .float()
        .cast(FloatDType::F32)
        .reshape([batch, seq, 1])
        * inv_freq;
    // [batch, seq, head_dim] -> [batch, 1, seq, head_dim]
    let angles = Tensor::cat(vec![freqs.clone(), freqs], 2).unsqueeze_dim::<4>(1);
    (angles.clone().cos().cast(dtype), angles.sin().cast(dtype))
}

/// Rotary position embedding in the rotate_half convention used by Qwen (the two halves of
/// the head, not interleaved pairs as `burn::nn::RotaryEncoding` rotates).
///
/// The body is [`RowwiseBackend::rotary`]: the values of [`apply_rotary_reference`], and under
/// autodiff one node that keeps only the tables (see [`crate::rowwise`]). Tables that need a
/// gradient themselves take the reference ops.
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`
/// - cos, sin: `[batch, 1, seq, head_dim]`
pub fn apply_rotary<B: RowwiseBackend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    if cos.is_require_grad() || sin.is_require_grad() {
        return apply_rotary_reference(x, cos, sin);
    }
    let primitive = |t: Tensor<B, 4>| t.into_primitive().tensor();
    let y = B::rotary(primitive(x), primitive(cos), primitive(sin));
    Tensor::from_primitive(TensorPrimitive::Float(y))
}

/// The reference body of [`apply_rotary`] in plain tensor ops (the node's forward ops), which
/// autodiff differentiates op by op and in all three inputs. Kept for tests.
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`
/// - cos, sin: `[batch, 1, seq, head_dim]`
pub fn apply_rotary_reference<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    crate::rowwise::rotary_forward(x, cos, sin)
}

/// Causal grouped-query attention, `softmax(q k^T / sqrt(head_dim)) v`, with the softmax in f32
/// as transformers does.
///
/// The body is [`chunked_attention`] unless the mask asks for the reference
/// ([`AttentionImpl`]): query chunks under a
/// memory budget, keys and values never repeated, and under autodiff one backward node that
/// stores only `q`, `k`, `v`, the output and a `[batch, heads, q_len]` log-sum-exp per layer
/// (see [`crate::attention`]). It equals [`attention_reference`] except on rows that see no key
/// (padding), which give zeros here.
///
/// # Shapes
/// - q: `[batch, heads, q_len, head_dim]`
/// - k, v: `[batch, kv_heads, k_len, head_dim]`
/// - output: `[batch, heads, q_len, head_dim]`
pub fn attention<B: AttentionBackend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Tensor<B, 4> {
    match mask.implementation {
        AttentionImpl::Chunked => chunked_attention(q, k, v, mask),
        AttentionImpl::Reference => attention_reference(q, k, v, mask),
    }
}

/// The reference body of [`attention`]: plain tensor ops, with keys and values repeated to
/// `heads` and the whole `[batch, heads, q_len, k_len]` scores materialised (and, under
/// autodiff, stored for the backward pass). Kept for tests and comparison.
///
/// # Shapes
/// - q: `[batch, heads, q_len, head_dim]`
/// - k, v: `[batch, kv_heads, k_len, head_dim]`
/// - output: `[batch, heads, q_len, head_dim]`
pub fn attention_reference<B: Backend>(
    q: Tensor<B, 4>,
    k: Tensor<B, 4>,
    v: Tensor<B, 4>,
    mask: &AttentionMask<B>,
) -> Tensor<B, 4> {
    let dtype = q.dtype();
    let [batch, heads, q_len, head_dim] = q.dims();
    let [_, kv_heads, k_len, _] = k.dims();
    let k = repeat_kv(k, heads / kv_heads);
    let v = repeat_kv(v, heads / kv_heads);
    let scale = (head_dim as f64).powf(-0.5);
    // [batch, heads, q_len, k_len]
    let scores = q.matmul(k.swap_dims(2, 3)).mul_scalar(scale);
    let forbidden = mask.forbidden().expand([batch, heads, q_len, k_len]);
    // A fully forbidden row (a padding query) becomes uniform rather than NaN.
    let scores = scores.cast(FloatDType::F32).mask_fill(forbidden, f32::MIN);
    let probs = softmax(scores, 3).cast(dtype);
    probs.matmul(v)
}

/// `[batch, kv_heads, len, d]` -> `[batch, kv_heads * n_rep, len, d]`, each kv head repeated
/// for the `n_rep` query heads of its group.
fn repeat_kv<B: Backend>(x: Tensor<B, 4>, n_rep: usize) -> Tensor<B, 4> {
    if n_rep == 1 {
        return x;
    }
    let [batch, kv_heads, len, head_dim] = x.dims();
    x.unsqueeze_dim::<5>(2)
        .expand([batch, kv_heads, n_rep, len, head_dim])
        .reshape([batch, kv_heads * n_rep, len, head_dim])
}
