//! `ChunkedCeBackend` for `Autodiff<B, C>`: one backward node that recomputes the logits, and
//! one for the gather of the supervised rows.

use burn::{
    backend::autodiff::{
        Autodiff,
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    },
    tensor::{
        Shape, TensorMetadata,
        ops::{FloatTensor, IntTensor},
    },
};

use super::{ChunkedCeBackend, GradRequest, LmHeadCeParams};

/// The backward step of the fused lm_head + loss; its parents are `[hidden, weight]`.
#[derive(Debug)]
struct LmHeadCeBackward;

/// What the backward step keeps from the forward: the inner backend's hidden rows, weight and
/// targets (references, not copies, on every backend here), the `[n]` log-sum-exp, and the
/// scalar settings. No logits.
type LmHeadCeState<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    IntTensor<B>,
    FloatTensor<B>,
    LmHeadCeParams,
);

impl<B: ChunkedCeBackend> Backward<B, 2> for LmHeadCeBackward {
    type State = LmHeadCeState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 2>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_hidden, node_weight] = ops.parents;
        let grad_loss = grads.consume::<B>(&ops.node); // [n]
        let (hidden, weight, targets, lse, params) = ops.state;
        let request = GradRequest {
            hidden: node_hidden.is_some(),
            weight: node_weight.is_some(),
        };
        let out = B::lm_head_ce_backward(hidden, weight, targets, lse, grad_loss, &params, request);
        if let (Some(node), Some(grad)) = (node_hidden, out.hidden) {
            grads.register::<B>(node.id, grad);
        }
        if let (Some(node), Some(grad)) = (node_weight, out.weight) {
            grads.register::<B>(node.id, grad);
        }
    }
}

/// The backward step of [`ChunkedCeBackend::select_unique_rows`]; its one parent is `x`.
#[derive(Debug)]
struct SelectRowsBackward;

impl<B: ChunkedCeBackend> Backward<B, 1> for SelectRowsBackward {
    /// The inverse map (`[n]`, each row's place among the selected, or `k` for none).
    type State = IntTensor<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_x] = ops.parents;
        let grad = grads.consume::<B>(&ops.node); // [k, hidden]
        if let Some(node) = node_x {
            // A zero row at index k for the rows not selected, then one gather: every row of
            // the result is read once, where a scatter into zeros would walk the k rows
            // serially (burn's `select_assign` on CubeCL: 2.5 ms a step on the H200).
            let [k, hidden] = grad.shape().dims();
            let zero = B::float_zeros(
                Shape::new([1, hidden]),
                &B::float_device(&grad),
                grad.dtype().into(),
            );
            let padded = B::float_cat(vec![grad, zero], 0); // [k + 1, hidden]
            debug_assert_eq!(k + 1, padded.shape()[0]);
            grads.register::<B>(node.id, B::float_select(padded, 0, ops.state));
        }
    }
}

impl<B: ChunkedCeBackend, C: CheckpointStrategy> ChunkedCeBackend for Autodiff<B, C> {
    fn select_unique_rows(
        x: FloatTensor<Self>,
        rows: IntTensor<Self>,
        inverse: IntTensor<Self>,
    ) -> FloatTensor<Self> {
        match SelectRowsBackward
            .prepare::<C>([x.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(inverse, B::float_select(x.primitive, 0, rows)),
            OpsKind::UnTracked(prep) => prep.finish(B::float_select(x.primitive, 0, rows)),
        }
    }

    fn lm_head_cross_entropy(
        hidden: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        targets: IntTensor<Self>,
        params: &LmHeadCeParams,
    ) -> FloatTensor<Self> {
        // The op is marked compute-bound: under a checkpointing strategy its state is kept
        // rather than its forward re-run, and that state is small anyway.
        match LmHeadCeBackward
            .prepare::<C>([hidden.node.clone(), weight.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let forward = B::lm_head_ce_forward(
                    hidden.primitive.clone(),
                    weight.primitive.clone(),
                    targets.clone(),
                    params,
                );
                let state = (
                    hidden.primitive,
                    weight.primitive,
                    targets,
                    forward.lse,
                    *params,
                );
                prep.finish(state, forward.loss)
            }
            OpsKind::UnTracked(prep) => {
                let forward =
                    B::lm_head_ce_forward(hidden.primitive, weight.primitive, targets, params);
                prep.finish(forward.loss)
            }
        }
    }
}
