//! What the crate's custom autodiff nodes share.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::{NodeId, grads::Gradients};
use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;

/// Registers each gradient whose parent is tracked (`Some` id) and that was computed.
pub(crate) fn register<B: Backend, const N: usize>(
    grads: &mut Gradients,
    pairs: [(Option<NodeId>, Option<FloatTensor<B>>); N],
) {
    for (id, grad) in pairs {
        if let (Some(id), Some(grad)) = (id, grad) {
            grads.register::<B>(id, grad);
        }
    }
}

/// Takes the gradient registered so far for the tracked tensor `of` out of `grads`, if any: a
/// node that adds its own share into it in one kernel (a product with `beta = 1`, say) then
/// registers the sum, where `Gradients::register` would add the two in a kernel of its own.
/// Whatever registers later adds to that sum as usual.
pub(crate) fn take<B: Backend, C: CheckpointStrategy>(
    grads: &mut Gradients,
    of: &FloatTensor<Autodiff<B, C>>,
) -> Option<FloatTensor<B>> {
    grads.remove::<B>(of)
}
