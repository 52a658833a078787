//! The linear layers' differentiable product on top of qwen-gemm's [`GemmBackend`], so that
//! CUDA runs them on cuBLASLt while every other backend keeps burn's matmul.
//!
//! ```text
//! forward:  y  = x @ w^T          gemm(x,  w, no,  yes)
//! backward: dx = dy @ w           gemm(dy, w, no,  no)
//!           dw = dy^T @ x         gemm(dy, x, yes, no)
//! ```
//!
//! [`LinearBackend::dense`] is the differentiable `x @ w^T`: on `Autodiff<B>` it registers one
//! backward node that calls `B::gemm` twice, so the fast kernel serves the backward pass too.
//! Autodiff keeps `x` and `w`, as burn's own matmul node does. The body of `gemm` (burn's
//! matmul, or cuBLASLt on CUDA with the `cublaslt` feature) is qwen-gemm's business; its
//! switch is re-exported here.

mod autodiff;
mod backends;

use burn::tensor::ops::FloatTensor;
pub use qwen_gemm::{GemmBackend, GemmBody, gemm_body, gemm_reference, set_gemm_body};

/// A backend whose linear layers can run on a kernel of its own.
///
/// Implemented for `Autodiff<B, C>` whenever `B` implements it, and, behind this crate's
/// features, for the same backend families as [`AttentionBackend`](crate::AttentionBackend),
/// which extends this trait.
pub trait LinearBackend: GemmBackend {
    /// The differentiable `x @ w^T`.
    ///
    /// # Shapes
    /// - `x`: `[rows, in]`, `w`: `[out, in]` (Hugging Face layout), same dtype
    /// - output: `[rows, out]`
    fn dense(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gemm(x, w, false, true)
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tensor, TensorPrimitive, Tolerance};

    use super::*;

    type Ad = Autodiff<Flex>;

    fn linear<Bk: LinearBackend>(x: Tensor<Bk, 2>, w: Tensor<Bk, 2>) -> Tensor<Bk, 2> {
        Tensor::from_primitive(TensorPrimitive::Float(Bk::dense(
            x.into_primitive().tensor(),
            w.into_primitive().tensor(),
        )))
    }

    /// The custom backward node against burn's autodiff of the same product.
    #[test]
    fn linear_gradients_equal_burns_matmul() {
        let device = Default::default();
        let x = Tensor::<Ad, 2>::random([6, 5], Distribution::Default, &device).require_grad();
        let w = Tensor::<Ad, 2>::random([4, 5], Distribution::Default, &device).require_grad();
        let g = Tensor::<Ad, 2>::random([6, 4], Distribution::Default, &device);

        let ours = linear(x.clone(), w.clone());
        let grads = (ours.clone() * g.clone()).sum().backward();
        let (dx, dw) = (x.grad(&grads).unwrap(), w.grad(&grads).unwrap());

        let theirs = x.clone().matmul(w.clone().transpose());
        let grads = (theirs.clone() * g).sum().backward();
        let tol = Tolerance::<f32>::default();
        ours.into_data().assert_approx_eq(&theirs.into_data(), tol);
        dx.into_data()
            .assert_approx_eq(&x.grad(&grads).unwrap().into_data(), tol);
        dw.into_data()
            .assert_approx_eq(&w.grad(&grads).unwrap().into_data(), tol);
        assert_eq!(Ad::gemm_name(), "burn");
    }
}
