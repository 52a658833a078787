//! `ChunkedCeBackend` for `Autodiff<B, C>`: one backward node that recomputes the logits.

use burn::{
    backend::autodiff::{
        Autodiff,
        checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
        grads::Gradients,
        ops::{Backward, Ops, OpsKind},
    },
    tensor::ops::{FloatTensor, IntTensor},
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

impl<B: ChunkedCeBackend, C: CheckpointStrategy> ChunkedCeBackend for Autodiff<B, C> {
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
