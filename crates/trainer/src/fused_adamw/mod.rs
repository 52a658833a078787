//! AdamW's step as backend operations: the global gradient norm, and the update of a group of
//! parameters whose moments lie end to end in one flat buffer each.
//!
//! ```text
//! every gradient -> grad_norm -> norm [1]
//! per group: values, gradients, flat moments, norm -> adamw_group -> new values, new moments
//! ```
//!
//! The trait's default bodies are tensor ops, parameter by parameter: the reference. On CUDA
//! (`cuda.rs`, [`Kernel::Adamw`](qwen_model::Kernel::Adamw)) they are kernels of this module
//! (`adamw.cu`) that step up to 64 tensors per launch, reading each parameter, gradient and
//! moment once and writing each once: at 1.5b the tensor-op step, over gradients gathered into
//! flat buffers, took 28 ms of a step's 188 ms of GPU time in 810 launches
//! (docs/BENCHMARKS.md, session 16).
//!
//! The optimizer ([`crate::optim::Optimizer`]) takes this path for AdamW where the backend
//! has the kernels and every parameter is f32; elsewhere it keeps its flat tensor-op path.

#[cfg(feature = "cuda-unfused")]
mod cuda;
pub mod plan;

#[cfg(any(feature = "cubecl", feature = "fusion"))]
mod backends;

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// AdamW's settings for one step, torch's semantics (decoupled decay, bias-corrected moments,
/// the gradients clipped to a global norm first).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct AdamwStep {
    pub lr: f64,
    pub beta1: f64,
    pub beta2: f64,
    pub eps: f64,
    pub weight_decay: f64,
    /// The step's number, 1 for the first.
    pub step: u64,
    /// The global norm the gradients are clipped to; 0: no clipping.
    pub max_grad_norm: f64,
    /// Whether the kernels also write each new value's bf16 copy, kept by
    /// `qwen_gemm::copies` for the model's bf16 casts of the parameter (tensor ops write
    /// none: the casts then cast).
    pub bf16_copies: bool,
}

impl AdamwStep {
    /// `lr / (1 - beta1^t)`.
    pub fn step_size(&self) -> f64 {
        self.lr / (1.0 - self.beta1.powi(self.step as i32))
    }

    /// `sqrt(1 - beta2^t)`.
    pub fn bias2_sqrt(&self) -> f64 {
        (1.0 - self.beta2.powi(self.step as i32)).sqrt()
    }

    /// What a decaying parameter is multiplied by before the step: `1 - lr * weight_decay`.
    pub fn decay_factor(&self) -> f64 {
        1.0 - self.lr * self.weight_decay
    }
}

/// One group of parameters for [`OptimizerBackend::adamw_group`]: each parameter's value and
/// gradient (`[numel]` f32), whether it decays, and the group's moments, `[sum of numel]` f32
/// each, the parameters' ranges end to end in their order.
pub struct AdamwGroup<B: Backend> {
    pub values: Vec<FloatTensor<B>>,
    pub grads: Vec<FloatTensor<B>>,
    pub decays: Vec<bool>,
    pub first: FloatTensor<B>,
    pub second: FloatTensor<B>,
}

/// What [`OptimizerBackend::adamw_group`] returns: the new values (`[numel]` f32, in the
/// group's order) and moments.
pub struct AdamwGroupOut<B: Backend> {
    pub values: Vec<FloatTensor<B>>,
    pub first: FloatTensor<B>,
    pub second: FloatTensor<B>,
}

/// A backend's AdamW step. Every method has a tensor-op body; CUDA overrides them with kernels.
pub trait OptimizerBackend: Backend {
    /// Whether [`grad_norm`](Self::grad_norm) and [`adamw_group`](Self::adamw_group) run
    /// kernels here now (CUDA, with [`Kernel::Adamw`](qwen_model::Kernel::Adamw) on).
    fn has_adamw_kernels() -> bool {
        false
    }

    /// The L2 norm of all the values of `grads` (`[numel]` f32 each), as `[1]` f32.
    fn grad_norm(grads: Vec<FloatTensor<Self>>) -> FloatTensor<Self> {
        tensor_ops::grad_norm::<Self>(grads)
    }

    /// One AdamW step of `group`, its gradients clipped to `step.max_grad_norm` by the global
    /// `norm` (`[1]` f32, [`grad_norm`](Self::grad_norm)'s).
    fn adamw_group(
        group: AdamwGroup<Self>,
        norm: FloatTensor<Self>,
        step: AdamwStep,
    ) -> AdamwGroupOut<Self> {
        tensor_ops::adamw_group::<Self>(group, norm, step)
    }
}

#[cfg(feature = "cpu")]
impl OptimizerBackend for burn::backend::Flex {}

fn tensor<B: Backend>(t: FloatTensor<B>) -> Tensor<B, 1> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

fn primitive<B: Backend>(t: Tensor<B, 1>) -> FloatTensor<B> {
    t.into_primitive().tensor()
}

/// The reference bodies, in tensor ops, parameter by parameter.
pub mod tensor_ops {
    use super::*;

    /// [`OptimizerBackend::grad_norm`] in tensor ops.
    pub fn grad_norm<B: Backend>(grads: Vec<FloatTensor<B>>) -> FloatTensor<B> {
        let squares: Vec<_> = grads
            .into_iter()
            .map(|g| qwen_model::reduce::sum_all(tensor::<B>(g).square()))
            .collect();
        primitive(Tensor::cat(squares, 0).sum().sqrt())
    }

    /// AdamW's rule in tensor ops over a (clipped) gradient and its moments, all of one shape:
    /// what to subtract from the parameters (before the decoupled decay, which the caller
    /// applies), and the new first and second moments. torch's order of operations.
    pub fn adamw_rule<B: Backend, const D: usize>(
        grad: Tensor<B, D>,
        first: Tensor<B, D>,
        second: Tensor<B, D>,
        step: &AdamwStep,
    ) -> (Tensor<B, D>, Tensor<B, D>, Tensor<B, D>) {
        let m = first.mul_scalar(step.beta1) + grad.clone().mul_scalar(1.0 - step.beta1);
        let v = second.mul_scalar(step.beta2) + grad.square().mul_scalar(1.0 - step.beta2);
        let denom = v
            .clone()
            .sqrt()
            .div_scalar(step.bias2_sqrt())
            .add_scalar(step.eps);
        let update = m.clone().div(denom).mul_scalar(step.step_size());
        (update, m, v)
    }

    /// [`OptimizerBackend::adamw_group`] in tensor ops.
    pub fn adamw_group<B: Backend>(
        group: AdamwGroup<B>,
        norm: FloatTensor<B>,
        step: AdamwStep,
    ) -> AdamwGroupOut<B> {
        let AdamwGroup {
            values,
            grads,
            decays,
            first,
            second,
        } = group;
        let clip = crate::optim::clip_scale(tensor::<B>(norm), step.max_grad_norm);
        let (first, second) = (tensor::<B>(first), tensor::<B>(second));
        let mut offset = 0;
        let mut new_values = Vec::with_capacity(values.len());
        let (mut firsts, mut seconds) = (Vec::new(), Vec::new());
        for ((value, grad), decays) in values.into_iter().zip(grads).zip(decays) {
            let (value, grad) = (tensor::<B>(value), tensor::<B>(grad));
            let [numel] = value.dims();
            let range = offset..offset + numel;
            offset += numel;
            let grad = match &clip {
                Some(clip) => grad * clip.clone(), // [numel] * [1]
                None => grad,
            };
            let (first, second) = (
                first.clone().slice(range.clone()),
                second.clone().slice(range),
            );
            let (update, m, v) = adamw_rule(grad, first, second, &step);
            let value = match decays {
                true => value.mul_scalar(step.decay_factor()),
                false => value,
            };
            new_values.push(primitive(value - update));
            firsts.push(m);
            seconds.push(v);
        }
        AdamwGroupOut {
            values: new_values,
            first: primitive(Tensor::cat(firsts, 0)),
            second: primitive(Tensor::cat(seconds, 0)),
        }
    }
}
