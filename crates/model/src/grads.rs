//! What the crate's custom autodiff nodes share.

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
