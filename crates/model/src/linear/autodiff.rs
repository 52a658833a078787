//! `LinearBackend` for `Autodiff<B, C>`: one backward node whose two products run on `B::gemm`,
//! keeping the uncast weight of the cast-on-use product.

use std::marker::PhantomData;

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::TensorMetadata;
use burn::tensor::ops::FloatTensor;

use super::LinearBackend;

/// The backward step of `x @ cast(w)^T` (of `x @ w^T` where `w` is already in `x`'s dtype, the
/// casts then being no-ops); its parents are `[x, w]`.
#[derive(Debug)]
struct LinearBackward<C>(PhantomData<C>);

impl<B: LinearBackend, C: CheckpointStrategy> Backward<B, 2> for LinearBackward<C> {
    /// The tracked `x` (its gradient so far is taken from it, see below) and the inner
    /// backend's uncast `w` (references, not copies).
    type State = (FloatTensor<Autodiff<B, C>>, FloatTensor<B>);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [rows, out], x's dtype
        let (tracked_x, w) = ops.state;
        let x = tracked_x.primitive.clone();
        let (compute, master) = (grad.dtype(), w.dtype());
        if let Some(node) = node_w {
            // [out, rows] @ [rows, in], in the weight's own dtype (a cast's backward casts; a
            // body that writes that dtype itself, cuBLASLt's, skips the cast kernel)
            let grad_w = B::gemm_to(grad.clone(), x, true, false, master);
            grads.register::<B>(node.id, grad_w);
        }
        if let Some(node) = node_x {
            // [rows, out] @ [out, in], added by the product itself to what x's other readers
            // gave it so far (q, k and v read one x; gate and up another)
            let w = B::cast_param(w, compute);
            let fits = |acc: &FloatTensor<B>| acc.dtype() == compute;
            let grad_x = match crate::grads::take::<B, C>(grads, &tracked_x, node.id, fits) {
                Some(acc) => B::gemm_add(grad, w, false, false, acc),
                None => B::gemm(grad, w, false, false),
            };
            grads.register::<B>(node.id, grad_x);
        }
    }
}

/// The backward step of `y + bias`; its parents are `[y, bias]`.
#[derive(Debug)]
struct AddBiasBackward;

impl<B: LinearBackend> Backward<B, 2> for AddBiasBackward {
    type State = ();

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_y, node_bias] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [rows, out]
        let grad_bias = node_bias.is_some().then(|| B::sum_rows(grad.clone()));
        crate::grads::register::<B, 2>(
            grads,
            [
                (node_y.map(|n| n.id), Some(grad)),
                (node_bias.map(|n| n.id), grad_bias),
            ],
        );
    }
}

/// `forward(x, w)` on the inner backend, with [`LinearBackward`] keeping `x` and `w`.
fn tracked<B: LinearBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
    forward: fn(FloatTensor<B>, FloatTensor<B>) -> FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    let prepared = LinearBackward::<C>(PhantomData)
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful();
    match prepared {
        OpsKind::Tracked(prep) => {
            let y = forward(x.primitive.clone(), w.primitive.clone());
            prep.finish((x, w.primitive), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(forward(x.primitive, w.primitive)),
    }
}

impl<B: LinearBackend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {
    fn dense(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked::<B, C>(x, w, B::dense)
    }

    fn dense_cast(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked::<B, C>(x, w, B::dense_cast)
    }

    fn add_bias(y: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        AddBiasBackward
            .prepare::<C>([y.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateless(B::add_bias(y.primitive, bias.primitive))
    }
}
