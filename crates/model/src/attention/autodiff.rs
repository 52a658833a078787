//! `AttentionBackend` for `Autodiff<B, C>`: one backward node that recomputes the scores.

use burn::backend::autodiff::{
    Autodiff,
    checkpoint::{base::Checkpointer, strategy::CheckpointStrategy},
    grads::Gradients,
    ops::{Backward, Ops, OpsKind},
};
use burn::tensor::ops::FloatTensor;

use super::{
    AttentionBackend, AttentionForward, AttentionGradRequest, AttentionInputs, AttentionParams,
};

/// The backward step of the chunked attention; its parents are `[q, k, v]`.
#[derive(Debug)]
struct AttentionBackward;

/// What the backward step keeps from the forward: the inner backend's `q`, `k`, `v` and segment
/// ids (references, not copies), the output and the `[b, heads, q_len]` log-sum-exp, and the
/// scalar settings. No scores.
type AttentionState<B> = (AttentionInputs<B>, AttentionForward<B>, AttentionParams);

impl<B: AttentionBackend> Backward<B, 3> for AttentionBackward {
    type State = AttentionState<B>;

    fn backward(
        self,
        ops: Ops<Self::State, 3>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [node_q, node_k, node_v] = ops.parents;
        let grad_output = grads.consume::<B>(&ops.node); // [batch, heads, q_len, head_dim]
        let (inputs, forward, params) = ops.state;
        let request = AttentionGradRequest {
            q: node_q.is_some(),
            k: node_k.is_some(),
            v: node_v.is_some(),
        };
        let out = B::causal_attention_backward(inputs, forward, grad_output, &params, request);
        crate::grads::register::<B, 3>(
            grads,
            [
                (node_q.map(|n| n.id), out.q),
                (node_k.map(|n| n.id), out.k),
                (node_v.map(|n| n.id), out.v),
            ],
        );
    }
}

impl<B: AttentionBackend, C: CheckpointStrategy> AttentionBackend for Autodiff<B, C> {
    /// The inner backend's: its forward and backward kernels run the block softmax.
    fn has_softmax_kernel() -> bool {
        B::has_softmax_kernel()
    }

    fn has_fused_attention(
        q: &burn::tensor::Shape,
        k: &burn::tensor::Shape,
        dtype: burn::tensor::DType,
        params: &AttentionParams,
    ) -> bool {
        B::has_fused_attention(q, k, dtype, params)
    }

    fn causal_attention(
        inputs: AttentionInputs<Self>,
        params: &AttentionParams,
    ) -> FloatTensor<Self> {
        let AttentionInputs {
            q,
            k,
            v,
            query_segments,
            key_segments,
        } = inputs;
        let prepared = AttentionBackward
            .prepare::<C>([q.node.clone(), k.node.clone(), v.node.clone()])
            // Compute-bound: under a checkpointing strategy the small state is kept rather
            // than the forward re-run.
            .compute_bound()
            .stateful();
        // Integer tensors are the inner backend's on `Autodiff<B>`, so the ids pass as they are.
        let inner = AttentionInputs::<B> {
            q: q.primitive,
            k: k.primitive,
            v: v.primitive,
            query_segments,
            key_segments,
        };
        match prepared {
            OpsKind::Tracked(prep) => {
                let forward = B::causal_attention_forward(inner.clone(), params);
                let output = forward.output.clone();
                prep.finish((inner, forward, *params), output)
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::causal_attention_forward(inner, params).output)
            }
        }
    }
}
