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
//! Autodiff keeps `x` and `w`, as burn's own matmul node does. Where `x` has other readers
//! whose gradients are registered already (q, k and v read one `x`), `dx` is added to theirs by
//! the product itself ([`GemmBackend::gemm_add`]), not by an addition of its own. The body of
//! `gemm` (burn's matmul, or cuBLASLt on CUDA with the `cublaslt` feature) is qwen-gemm's
//! business; its switch is re-exported here.

mod autodiff;
mod backends;

use burn::tensor::ops::FloatTensor;
use burn::tensor::{Shape, TensorMetadata};
pub use qwen_gemm::{GemmBackend, GemmBody, gemm_body, gemm_reference, set_gemm_body};

/// A backend whose linear layers can run on a kernel of its own.
///
/// Implemented for `Autodiff<B, C>` whenever `B` implements it, and, behind this crate's
/// features, for the same backend families as [`AttentionBackend`](crate::AttentionBackend),
/// which extends this trait.
pub trait LinearBackend: GemmBackend + crate::RowwiseBackend {
    /// The differentiable `x @ w^T`.
    ///
    /// # Shapes
    /// - `x`: `[rows, in]`, `w`: `[out, in]` (Hugging Face layout), same dtype
    /// - output: `[rows, out]`
    fn dense(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gemm(x, w, false, true)
    }

    /// The differentiable `x @ cast(w)^T`, `w` (an f32 master weight, say) cast to `x`'s dtype
    /// on use ([`GemmBackend::cast_param`]: the optimizer's kept copy where there is one). The
    /// same values as `dense(x, cast(w))`; on `Autodiff<B>` the backward node keeps `w` itself,
    /// which the model holds anyway, and casts it again, instead of keeping the cast copy of
    /// every layer's weight until the backward pass reaches it (0.67 GiB in bf16 for the 0.5b
    /// preset).
    ///
    /// # Shapes
    /// As [`dense`](Self::dense).
    fn dense_cast(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        let w = Self::cast_param(w, x.dtype());
        Self::dense(x, w)
    }

    /// `y + bias`, the bias broadcast over the rows. On `Autodiff<B>` one node whose bias
    /// gradient, a sum over every row, is [`RowwiseBackend::sum_rows`](
    /// crate::RowwiseBackend::sum_rows) in f32: autodiff of the broadcast add would sum in one
    /// stage, which CubeCL gives one thread per column (see [`crate::reduce`]).
    ///
    /// # Shapes
    /// - `y`: `[rows, out]`, `bias`: `[out]`, same dtype
    /// - output: `[rows, out]`
    fn add_bias(y: FloatTensor<Self>, bias: FloatTensor<Self>) -> FloatTensor<Self> {
        let out = bias.shape().num_elements();
        Self::float_add(y, Self::float_reshape(bias, Shape::new([1, out])))
    }
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Distribution, Tensor, TensorPrimitive, Tolerance};

    use super::*;

    type Ad = Autodiff<Flex>;

    fn linear<Bk: LinearBackend>(x: Tensor<Bk, 2>, w: Tensor<Bk, 2>) -> Tensor<Bk, 2> {
        Tensor::from_primitive(TensorPrimitive::Float(Bk::dense(
            x.into_primitive().tensor(),
            w.into_primitive().tensor(),
        )))
    }

    /// The cast-on-use node against autodiff of `cast` then `dense`: same output, same
    /// gradients (the weight's in its own dtype), for an f32 weight under f32 and bf16 inputs.
    #[test]
    fn dense_cast_equals_cast_then_dense() {
        let device = Default::default();
        for dtype in [DType::F32, DType::BF16] {
            let x = Tensor::<Ad, 2>::random([6, 5], Distribution::Default, &device)
                .cast(dtype)
                .detach()
                .require_grad();
            let w = Tensor::<Ad, 2>::random([4, 5], Distribution::Default, &device).require_grad();
            let g = Tensor::<Ad, 2>::random([6, 4], Distribution::Default, &device)
                .cast(dtype)
                .detach();
            let run = |lean: bool| {
                let (xp, wp) = (x.clone().into_primitive().tensor(), w.clone());
                let y = if lean {
                    Ad::dense_cast(xp, wp.into_primitive().tensor())
                } else {
                    Ad::dense(xp, wp.cast(dtype).into_primitive().tensor())
                };
                let y = Tensor::<Ad, 2>::from_primitive(TensorPrimitive::Float(y));
                let grads = (y.clone() * g.clone()).sum().backward();
                let (dx, dw) = (x.grad(&grads).unwrap(), w.grad(&grads).unwrap());
                (y.inner(), dx, dw)
            };
            let (y, dx, dw) = run(true);
            let (y_ref, dx_ref, dw_ref) = run(false);
            assert_eq!(
                (y.dtype(), dx.dtype(), dw.dtype()),
                (dtype, dtype, DType::F32)
            );
            let exact = Tolerance::<f32>::absolute(0.0);
            y.into_data().assert_approx_eq(&y_ref.into_data(), exact);
            dx.into_data().assert_approx_eq(&dx_ref.into_data(), exact);
            dw.into_data().assert_approx_eq(&dw_ref.into_data(), exact);
        }
    }

    /// The bias node against autodiff of the broadcast add, on enough rows that the bias
    /// gradient takes the two-stage sum, with the bias in f32 and in bf16 behind a cast.
    #[test]
    fn add_bias_gradients_equal_the_broadcast_add() {
        let device = Default::default();
        <Flex as burn::tensor::backend::Backend>::seed(&device, 3);
        for dtype in [DType::F32, DType::BF16] {
            let y = Tensor::<Ad, 2>::random([1024, 6], Distribution::Default, &device)
                .cast(dtype)
                .detach()
                .require_grad();
            let b = Tensor::<Ad, 1>::random([6], Distribution::Default, &device).require_grad();
            let g = Tensor::<Ad, 2>::random([1024, 6], Distribution::Default, &device)
                .cast(dtype)
                .detach();
            let run = |ours: bool| {
                let bias = b.clone().cast(dtype);
                let out = if ours {
                    Tensor::<Ad, 2>::from_primitive(TensorPrimitive::Float(Ad::add_bias(
                        y.clone().into_primitive().tensor(),
                        bias.into_primitive().tensor(),
                    )))
                } else {
                    y.clone() + bias.unsqueeze::<2>()
                };
                let grads = (out.clone() * g.clone()).sum().backward();
                (
                    out.inner(),
                    y.grad(&grads).unwrap(),
                    b.grad(&grads).unwrap(),
                )
            };
            let (out, dy, db) = run(true);
            let (out_ref, dy_ref, db_ref) = run(false);
            assert_eq!(db.dtype(), DType::F32);
            let exact = Tolerance::<f32>::absolute(0.0);
            out.into_data()
                .assert_approx_eq(&out_ref.into_data(), exact);
            dy.into_data().assert_approx_eq(&dy_ref.into_data(), exact);
            // The sums differ in the order of their additions (and, in bf16, in summing in f32).
            let tol = match dtype {
                DType::F32 => Tolerance::<f32>::rel_abs(1e-5, 1e-4),
                _ => Tolerance::<f32>::rel_abs(1e-2, 0.25),
            };
            db.into_data().assert_approx_eq(&db_ref.into_data(), tol);
        }
    }

    /// Three layers reading one `x` beside a residual path: the backward adds their input
    /// gradients as it multiplies (`gemm_add` into what was registered before), and gets the
    /// same gradients as burn's autodiff of the same products.
    #[test]
    fn layers_sharing_an_input_add_their_gradients() {
        let device = Default::default();
        let x = Tensor::<Ad, 2>::random([6, 5], Distribution::Default, &device).require_grad();
        let ws: Vec<_> = (0..3)
            .map(|_| Tensor::<Ad, 2>::random([5, 5], Distribution::Default, &device).require_grad())
            .collect();
        let g = Tensor::<Ad, 2>::random([6, 5], Distribution::Default, &device);
        let run = |ours: bool| {
            let product = |w: &Tensor<Ad, 2>| {
                if ours {
                    linear(x.clone(), w.clone())
                } else {
                    x.clone().matmul(w.clone().transpose())
                }
            };
            // The residual first, then the layers, each scaled so that a dropped or doubled
            // share shows.
            let y = x.clone()
                + product(&ws[0])
                + product(&ws[1]).mul_scalar(2.0)
                + product(&ws[2]).mul_scalar(-3.0);
            let grads = (y * g.clone()).sum().backward();
            let mut all = vec![x.grad(&grads).unwrap()];
            all.extend(ws.iter().map(|w| w.grad(&grads).unwrap()));
            all
        };
        let tol = Tolerance::<f32>::default();
        for (ours, theirs) in run(true).into_iter().zip(run(false)) {
            ours.into_data().assert_approx_eq(&theirs.into_data(), tol);
        }
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
