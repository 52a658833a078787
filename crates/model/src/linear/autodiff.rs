//! `LinearBackend` for `Autodiff<B, C>`: one backward node whose two products run on `B::gemm`,
//! keeping the weight as the forward product used it (cast to the compute dtype).

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};

use super::{LinearBackend, cast_to};

/// The backward step of `x @ cast(w)^T` (of `x @ w^T` where `w` is already in `x`'s dtype, the
/// cast then being a no-op); its parents are `[x, w]`.
#[derive(Debug)]
struct LinearBackward;

impl<B: LinearBackend> Backward<B, 2> for LinearBackward {
    /// The inner backend's `x`, the weight as the product used it (cast to `x`'s dtype), and
    /// the weight's own dtype, which its gradient takes.
    type State = (FloatTensor<B>, FloatTensor<B>, DType);

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x, node_w] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [rows, out], x's dtype
        let (x, w, master) = ops.state;
        if let Some(node) = node_w {
            // [out, rows] @ [rows, in], in the weight's own dtype (a cast's backward casts; a
            // body that writes that dtype itself, cuBLASLt's, skips the cast kernel)
            let grad_w = B::gemm_to(grad.clone(), x, true, false, master);
            grads.register::<B>(node.id, grad_w);
        }
        if let Some(node) = node_x {
            // [rows, out] @ [out, in]
            grads.register::<B>(node.id, B::gemm(grad, w, false, false));
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

/// `x @ w^T` on the inner backend, `w` cast to `x`'s dtype first, with [`LinearBackward`]
/// keeping `x` and the cast `w` (references, not copies).
fn tracked<B: LinearBackend, C: CheckpointStrategy>(
    x: FloatTensor<Autodiff<B, C>>,
    w: FloatTensor<Autodiff<B, C>>,
) -> FloatTensor<Autodiff<B, C>> {
    let prepared = LinearBackward
        .prepare::<C>([x.node.clone(), w.node.clone()])
        .compute_bound()
        .stateful();
    match prepared {
        OpsKind::Tracked(prep) => {
            let master = w.primitive.dtype();
            let w = cast_to::<B>(w.primitive, x.primitive.dtype());
            let y = B::dense(x.primitive.clone(), w.clone());
            prep.finish((x.primitive, w, master), y)
        }
        OpsKind::UnTracked(prep) => prep.finish(B::dense_cast(x.primitive, w.primitive)),
    }
}

impl<B: LinearBackend, C: CheckpointStrategy> LinearBackend for Autodiff<B, C> {
    fn dense(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        // The same node: `w` already has `x`'s dtype, so the cast is none.
        tracked::<B, C>(x, w)
    }

    fn dense_cast(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        tracked::<B, C>(x, w)
    }

    fn add_bias(y: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        AddBiasBackward
            .prepare::<C>([y.node.clone(), bias.node.clone()])
            .compute_bound()
            .stateless(B::add_bias(y.primitive, bias.primitive))
    }
}
