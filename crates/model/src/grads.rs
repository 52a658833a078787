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

/// Takes the gradient registered so far for the tracked tensor `of` (node `id`) out of
/// `grads`, if any and if it `fits` the taker: a node that adds its own share into it in one
/// kernel (a product with `beta = 1`, say) then registers the sum, where
/// `Gradients::register` would add the two in a kernel of its own. One that does not fit stays
/// registered, to be added as usual; so does whatever registers later.
pub(crate) fn take<B: Backend, C: CheckpointStrategy>(
    grads: &mut Gradients,
    of: &FloatTensor<Autodiff<B, C>>,
    id: NodeId,
    fits: impl FnOnce(&FloatTensor<B>) -> bool,
) -> Option<FloatTensor<B>> {
    let acc = grads.remove::<B>(of)?;
    if fits(&acc) {
        return Some(acc);
    }
    grads.register::<B>(id, acc);
    None
}
