//! The reference bodies of the chunked lm_head + loss, written with plain tensor ops.
//!
//! They run on whatever backend they are given; a backend with a faster kernel overrides
//! [`ChunkedCeBackend`](super::ChunkedCeBackend)'s methods instead of changing these.

use burn::tensor::{
    IndexingUpdateOp, Int, Tensor, TensorMetadata, TensorPrimitive,
    backend::Backend,
    ops::{FloatTensor, IntTensor},
};
use qwen_gemm::GemmBackend;

use super::{
    ChunkPlan, ChunkedCeBackend, GradRequest, GradTile, LmHeadCeForward, LmHeadCeGrads,
    LmHeadCeParams, plan::chunks,
};
use crate::cross_entropy::{losses_from_stats, row_stats};
use crate::options::LOSS_DTYPE;

fn float<B: Backend, const D: usize>(primitive: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(primitive))
}

fn primitive<B: Backend, const D: usize>(tensor: Tensor<B, D>) -> FloatTensor<B> {
    tensor.into_primitive().tensor()
}

/// `op(a) @ op(b)` on the backend's [`GemmBackend::gemm`] body (cuBLASLt on CUDA, which reads
/// a transposed operand in place).
fn gemm<B: GemmBackend>(a: Tensor<B, 2>, b: Tensor<B, 2>, ta: bool, tb: bool) -> Tensor<B, 2> {
    float(B::gemm(primitive(a), primitive(b), ta, tb))
}

/// [`gemm`] written in f32 ([`GemmBackend::gemm_to`]: cuBLASLt writes the f32 product of bf16
/// operands itself; elsewhere the product is cast), for the gradients summed in f32.
fn gemm_f32<B: GemmBackend>(a: Tensor<B, 2>, b: Tensor<B, 2>, ta: bool, tb: bool) -> Tensor<B, 2> {
    float(B::gemm_to(primitive(a), primitive(b), ta, tb, LOSS_DTYPE))
}

/// `acc + op(a) @ op(b)` in `acc`'s dtype ([`GemmBackend::gemm_add`]: cuBLASLt adds into the
/// accumulator itself), or the f32 product where there is no accumulator yet.
fn gemm_f32_add<B: GemmBackend>(
    a: Tensor<B, 2>,
    b: Tensor<B, 2>,
    ta: bool,
    tb: bool,
    acc: Option<Tensor<B, 2>>,
) -> Tensor<B, 2> {
    match acc {
        Some(acc) => float(B::gemm_add(
            primitive(a),
            primitive(b),
            ta,
            tb,
            primitive(acc),
        )),
        None => gemm_f32(a, b, ta, tb),
    }
}

/// The lm_head weight in the activations' dtype for the products
/// ([`GemmBackend::cast_param`]: the optimizer's kept copy of an f32 master weight, where
/// there is one).
fn compute_weight<B: GemmBackend>(weight: FloatTensor<B>, hidden: &Tensor<B, 2>) -> Tensor<B, 2> {
    float(B::cast_param(weight, hidden.dtype()))
}

/// Forward: per-row loss and log-sum-exp, one row chunk of full-vocabulary logits at a time.
///
/// # Shapes
/// - `hidden`: `[n, hidden]`, `weight`: `[vocab, hidden]`, `targets`: `[n]` all in range
/// - output: `loss` and `lse`, both `[n]` f32
pub fn forward<B: ChunkedCeBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    params: &LmHeadCeParams,
) -> LmHeadCeForward<B> {
    let hidden = float::<B, 2>(hidden);
    let weight = compute_weight::<B>(weight, &hidden); // [vocab, hidden]
    let targets = Tensor::<B, 1, Int>::from_primitive(targets);
    let [n, _] = hidden.dims();
    let [vocab, _] = weight.dims();
    let plan = ChunkPlan::new(n, vocab, params.chunk_memory_bytes);

    let mut losses = Vec::new();
    let mut lses = Vec::new();
    for (start, rows) in chunks(n, plan.forward_rows) {
        let hidden_rows = hidden.clone().narrow(0, start, rows);
        let logits = gemm(hidden_rows, weight.clone(), false, true); // [rows, vocab]
        let stats = float::<B, 2>(B::logit_row_stats(
            primitive(logits),
            targets.clone().narrow(0, start, rows).into_primitive(),
            params.label_smoothing > 0.0,
        )); // [rows, 3]
        let (loss, lse) = losses_from_stats(stats, params.label_smoothing, params.z_loss_weight); // [rows, 1] each
        losses.push(loss.reshape([rows]));
        lses.push(lse.reshape([rows]));
    }
    LmHeadCeForward {
        loss: primitive(Tensor::cat(losses, 0)),
        lse: primitive(Tensor::cat(lses, 0)),
    }
}

/// Backward: recomputes the logits tile by tile and accumulates both gradients.
///
/// With `p = softmax(x)` and upstream gradient `g` per row, the gradient of the row loss with
/// respect to its logits is
///
/// ```text
/// dx = g ((1 + 2 λ lse) p - (1 - ε) one_hot(t) - ε / vocab)
/// ```
///
/// so a tile needs only its logits, the saved `lse` and `g`. For each vocabulary slab
/// `W[c0..c1]`, `grad_hidden += dx @ W[c0..c1]` per row chunk, and
/// `grad_weight[c0..c1] = sum over row chunks of dx^T @ hidden`, written once per slab.
/// Both are summed in f32, each product after a sum's first adding itself in
/// ([`GemmBackend::gemm_add`]); `grad_hidden` is cast to the activations' dtype at the end,
/// `grad_weight` to the weight's (none for an f32 master weight, which the products read cast
/// on use).
///
/// # Shapes
/// - `hidden`: `[n, hidden]`, `weight`: `[vocab, hidden]`, `targets`, `lse`, `grad_loss`: `[n]`
/// - output: `[n, hidden]` and `[vocab, hidden]`, where requested
pub fn backward<B: ChunkedCeBackend>(
    hidden: FloatTensor<B>,
    weight: FloatTensor<B>,
    targets: IntTensor<B>,
    lse: FloatTensor<B>,
    grad_loss: FloatTensor<B>,
    params: &LmHeadCeParams,
    request: GradRequest,
) -> LmHeadCeGrads<B> {
    let hidden = float::<B, 2>(hidden);
    let weight_dtype = weight.dtype();
    let weight = compute_weight::<B>(weight, &hidden);
    let targets = Tensor::<B, 1, Int>::from_primitive(targets);
    let lse = float::<B, 1>(lse).cast(LOSS_DTYPE);
    let grad_loss = float::<B, 1>(grad_loss).cast(LOSS_DTYPE);
    let [n, _] = hidden.dims();
    let [vocab, _] = weight.dims();
    let compute_dtype = hidden.dtype();
    let plan = ChunkPlan::new(n, vocab, params.chunk_memory_bytes);
    let eps = params.label_smoothing;
    let z = params.z_loss_weight;

    let row_chunks: Vec<(usize, usize)> = chunks(n, plan.backward_rows).collect();
    // Per row chunk, once for every slab: the upstream gradient `g`, the multiplier of p,
    // `g (1 + 2 λ lse)`, the log-sum-exp and the targets, each `[rows]`.
    let row_state: Vec<[FloatTensor<B>; 3]> = row_chunks
        .iter()
        .map(|&(start, rows)| {
            let g = grad_loss.clone().narrow(0, start, rows);
            let lse = lse.clone().narrow(0, start, rows);
            let p_scale = if z > 0.0 {
                g.clone() * lse.clone().mul_scalar(2.0 * z).add_scalar(1.0)
            } else {
                g.clone()
            };
            [primitive(g), primitive(p_scale), primitive(lse)]
        })
        .collect();
    let row_targets: Vec<IntTensor<B>> = row_chunks
        .iter()
        .map(|&(start, rows)| targets.clone().narrow(0, start, rows).into_primitive())
        .collect();

    // Each sum in f32, started by its first product and added to by the others' products
    // themselves (`gemm_add`), with no zeros and no addition kernels.
    let mut grad_hidden: Vec<Option<Tensor<B, 2>>> = vec![None; row_chunks.len()];
    // Each slab's rows of the weight's gradient, in the weight's dtype, joined at the end.
    let mut grad_weight = Vec::new();

    for (col_start, cols) in chunks(vocab, plan.backward_cols) {
        let weight_slab = weight.clone().narrow(0, col_start, cols); // [cols, hidden]
        let mut grad_slab: Option<Tensor<B, 2>> = None;

        for (chunk, &(row_start, rows)) in row_chunks.iter().enumerate() {
            let [g, p_scale, lse_rows] = row_state[chunk].clone();
            let hidden_rows = hidden.clone().narrow(0, row_start, rows); // [rows, hidden]
            let logits = gemm(hidden_rows.clone(), weight_slab.clone(), false, true); // [rows, cols]
            let dlogits = float::<B, 2>(B::logits_grad(
                primitive(logits),
                lse_rows,
                p_scale,
                g,
                row_targets[chunk].clone(),
                GradTile {
                    col_start,
                    vocab,
                    label_smoothing: eps,
                },
            )); // [rows, cols], compute dtype

            if request.hidden {
                // [rows, hidden]
                let acc = grad_hidden[chunk].take();
                let sum = gemm_f32_add(dlogits.clone(), weight_slab.clone(), false, false, acc);
                grad_hidden[chunk] = Some(sum);
            }
            if request.weight {
                // [cols, hidden]
                grad_slab = Some(gemm_f32_add(dlogits, hidden_rows, true, false, grad_slab));
            }
        }
        grad_weight.extend(grad_slab.map(|slab| slab.cast(weight_dtype)));
    }

    let join = |parts: Vec<Tensor<B, 2>>| match parts.len() {
        1 => parts.into_iter().next().expect("one part"),
        _ => Tensor::cat(parts, 0),
    };
    LmHeadCeGrads {
        hidden: request.hidden.then(|| {
            let parts = grad_hidden.into_iter().flatten().collect();
            primitive(join(parts).cast(compute_dtype)) // [n, hidden]
        }),
        weight: request.weight.then(|| primitive(join(grad_weight))), // [vocab, hidden]
    }
}

/// The tensor-op body of [`ChunkedCeBackend::logit_row_stats`]: the tile cast to f32, then the
/// plain path's row statistics.
pub fn logit_row_stats<B: Backend>(
    logits: FloatTensor<B>,
    targets: IntTensor<B>,
    with_mean: bool,
) -> FloatTensor<B> {
    let x = float::<B, 2>(logits).cast(LOSS_DTYPE);
    primitive(row_stats(x, Tensor::from_primitive(targets), with_mean))
}

/// The tensor-op body of [`ChunkedCeBackend::logits_grad`]:
/// `dx = p_scale exp(x - lse) - g ε / V + [c = t] g (ε - 1)` in f32, cast to the logits' dtype.
pub fn logits_grad<B: Backend>(
    logits: FloatTensor<B>,
    lse: FloatTensor<B>,
    p_scale: FloatTensor<B>,
    g: FloatTensor<B>,
    targets: IntTensor<B>,
    tile: GradTile,
) -> FloatTensor<B> {
    let dtype = logits.dtype();
    let logits = float::<B, 2>(logits).cast(LOSS_DTYPE); // [rows, cols]
    let [rows, cols] = logits.dims();
    let column = |t: FloatTensor<B>| float::<B, 1>(t).cast(LOSS_DTYPE).unsqueeze_dim::<2>(1); // [rows, 1]
    let (lse, p_scale, g) = (column(lse), column(p_scale), column(g));
    let eps = tile.label_smoothing;
    let mut dlogits = (logits - lse).exp() * p_scale; // [rows, cols]
    if eps > 0.0 {
        dlogits = dlogits - g.clone().mul_scalar(eps / tile.vocab as f32);
    }

    // The one-hot term, for rows whose target falls in this tile.
    let (col_start, col_end) = (tile.col_start, tile.col_start + cols);
    let t = Tensor::<B, 1, Int>::from_primitive(targets); // [rows]
    debug_assert_eq!(t.dims(), [rows]);
    let outside = t
        .clone()
        .lower_elem(col_start as i64)
        .bool_or(t.clone().greater_equal_elem(col_end as i64))
        .unsqueeze_dim::<2>(1); // [rows, 1]
    let local = t
        .sub_scalar(col_start as i64)
        .clamp(0, cols as i64 - 1)
        .unsqueeze_dim::<2>(1); // [rows, 1]
    let one_hot = g.mul_scalar(eps - 1.0).mask_fill(outside, 0.0); // [rows, 1]
    primitive(
        dlogits
            .scatter(1, local, one_hot, IndexingUpdateOp::Add)
            .cast(dtype),
    )
}
