//! `RowwiseBackend` for `Autodiff<B, C>`: one backward node per RMSNorm, per SwiGLU, per
//! rotary embedding and per embedding lookup.

use std::marker::PhantomData;

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, TensorMetadata};

use super::RowwiseBackend;

/// The backward step of RMSNorm; its parents are `[x, weight]`.
#[derive(Debug)]
struct RmsNormBackward<C>(PhantomData<C>);

impl<B: RowwiseBackend, C: CheckpointStrategy> Backward<B, 2> for RmsNormBackward<C> {
    /// The tracked `x` (its gradient so far is taken from it: the residual stream's, which
    /// the kernel adds to the norm's), the `[rows, 1]` f32 `rstd` and the inner backend's
    /// `weight` (a reference, not a copy).
    type State = (FloatTensor<Autodiff<B, C>>, FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [rows, hidden]
        let (tracked_x, rstd, weight) = ops.state;
        let x = tracked_x.primitive.clone();
        let request = [node_x.is_some(), node_weight.is_some()];
        let fits = |acc: &FloatTensor<B>| acc.dtype() == x.dtype() && acc.shape() == x.shape();
        let acc = node_x
            .as_ref()
            .and_then(|node| crate::grads::take::<B, C>(grads, &tracked_x, node.id, fits));
        let [dx, dw] = B::rms_norm_backward(x, rstd, weight, grad, request, acc);
        crate::grads::register::<B, 2>(
            grads,
            [(node_x.map(|n| n.id), dx), (node_weight.map(|n| n.id), dw)],
        );
    }
}

/// The backward step of SwiGLU; its parents are `[gate, up]`.
#[derive(Debug)]
struct SwigluBackward;

impl<B: RowwiseBackend> Backward<B, 2> for SwigluBackward {
    /// The inner backend's `gate` and `up` (references, not copies).
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_gate, node_up] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [rows, intermediate]
        let (gate, up) = ops.state;
        let request = [node_gate.is_some(), node_up.is_some()];
        let [dg, du] = B::swiglu_backward(gate, up, grad, request);
        crate::grads::register::<B, 2>(
            grads,
            [(node_gate.map(|n| n.id), dg), (node_up.map(|n| n.id), du)],
        );
    }
}

/// The backward step of the rotary embedding; its one parent is `x`.
#[derive(Debug)]
struct RotaryBackward;

impl<B: RowwiseBackend> Backward<B, 1> for RotaryBackward {
    /// The inner backend's cos and sin tables (references to the tables every layer shares).
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [batch, heads, seq, head_dim]
        let (cos, sin) = ops.state;
        if let Some(node) = node_x {
            grads.register::<B>(node.id, B::rotary_backward(grad, cos, sin));
        }
    }
}

/// The backward step of an embedding lookup; its one parent is the table.
#[derive(Debug)]
struct EmbeddingBackward<C>(PhantomData<C>);

impl<B: RowwiseBackend, C: CheckpointStrategy> Backward<B, 1> for EmbeddingBackward<C> {
    /// The ids, the tracked table (its gradient so far is taken from it: a tied lm_head's,
    /// which the rows are added into) and the table's row count and dtype.
    type State = (IntTensor<B>, FloatTensor<Autodiff<B, C>>, usize, DType);

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_weight] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [n, hidden]
        let (ids, table, vocab, dtype) = ops.state;
        if let Some(node) = node_weight {
            // Any dtype or layout: the backend adds what it cannot add into.
            let acc = crate::grads::take::<B, C>(grads, &table, node.id, |_| true);
            grads.register::<B>(
                node.id,
                B::token_embedding_backward(grad, ids, vocab, dtype, acc),
            );
        }
    }
}

// The nodes are marked compute-bound, as the attention's is: under a checkpointing strategy
// their small state is kept rather than the forward re-run.
impl<B: RowwiseBackend, C: CheckpointStrategy> RowwiseBackend for Autodiff<B, C> {
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        let prepared = RmsNormBackward::<C>(PhantomData)
            .prepare::<C>([x.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful();
        match prepared {
            OpsKind::Tracked(prep) => {
                let (y, rstd) =
                    B::rms_norm_forward(x.primitive.clone(), weight.primitive.clone(), eps);
                prep.finish((x, rstd, weight.primitive), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::rms_norm_forward(x.primitive, weight.primitive, eps).0)
            }
        }
    }

    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let prepared = SwigluBackward
            .prepare::<C>([gate.node.clone(), up.node.clone()])
            .compute_bound()
            .stateful();
        match prepared {
            OpsKind::Tracked(prep) => {
                let y = B::swiglu(gate.primitive.clone(), up.primitive.clone());
                prep.finish((gate.primitive, up.primitive), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::swiglu(gate.primitive, up.primitive)),
        }
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        // Only `x` is a parent: the tables are constants here (see the trait method).
        let prepared = RotaryBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful();
        match prepared {
            OpsKind::Tracked(prep) => {
                let y = B::rotary(x.primitive, cos.primitive.clone(), sin.primitive.clone());
                prep.finish((cos.primitive, sin.primitive), y)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::rotary(x.primitive, cos.primitive, sin.primitive))
            }
        }
    }

    fn token_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        let prepared = EmbeddingBackward::<C>(PhantomData)
            .prepare::<C>([weight.node.clone()])
            .compute_bound()
            .stateful();
        match prepared {
            OpsKind::Tracked(prep) => {
                let (vocab, dtype) = (weight.primitive.shape()[0], weight.primitive.dtype());
                let y = B::token_embedding(weight.primitive.clone(), ids.clone());
                prep.finish((ids, weight, vocab, dtype), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::token_embedding(weight.primitive, ids)),
        }
    }

    fn has_rowwise_kernels() -> bool {
        B::has_rowwise_kernels()
    }

    fn rowwise_kernel_runs(kernel: crate::Kernel) -> bool {
        B::rowwise_kernel_runs(kernel)
    }
}
