//! The linear layers' matrix product behind a backend trait, so that CUDA can run it on
//! cuBLASLt while every other backend keeps burn's matmul.
//!
//! ```text
//! forward:  y  = x @ w^T          gemm(x,  w, no,  yes)
//! backward: dx = dy @ w           gemm(dy, w, no,  no)
//!           dw = dy^T @ x         gemm(dy, x, yes, no)
//! ```
//!
//! [`LinearBackend::gemm`] is the one kernel: `op(a) @ op(b)` on 2-D tensors. Its default body
//! is burn's matmul. [`LinearBackend::dense`] is the differentiable `x @ w^T`: on `Autodiff<B>`
//! it registers one backward node that calls `B::gemm` twice, so the fast kernel serves the
//! backward pass too. Autodiff keeps `x` and `w`, as burn's own matmul node does.
//!
//! With this crate's `cublaslt` feature, CUDA (`CubeBackend<CudaRuntime, ..>`, and `Fusion` of
//! it through a custom operation) can run `gemm` on cuBLASLt, see `cublaslt.rs`. Which body runs
//! is chosen at run time with [`set_gemm_body`], for the whole process;
//! [`LinearBackend::gemm_name`] says which one a backend uses, so that a benchmark can report it.

mod autodiff;
mod backends;
#[cfg(feature = "cublaslt")]
mod cublaslt;

use std::sync::atomic::{AtomicU8, Ordering};

use burn::tensor::backend::Backend;
use burn::tensor::ops::FloatTensor;
use burn::tensor::{Tensor, TensorPrimitive};

/// A backend whose linear layers can run on a kernel of its own.
///
/// Implemented for `Autodiff<B, C>` whenever `B` implements it, and, behind this crate's
/// features, for the same backend families as [`AttentionBackend`](crate::AttentionBackend),
/// which extends this trait.
pub trait LinearBackend: Backend {
    /// `op(a) @ op(b)`, `op` a transpose where asked, in the inputs' dtype. Not differentiable
    /// on `Autodiff<B>` beyond burn's own matmul; use [`dense`](Self::dense) for that.
    ///
    /// # Shapes
    /// - `a`: `[m, k]`, or `[k, m]` with `transpose_a`
    /// - `b`: `[k, n]`, or `[n, k]` with `transpose_b`
    /// - output: `[m, n]`
    fn gemm(
        a: FloatTensor<Self>,
        b: FloatTensor<Self>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> FloatTensor<Self> {
        gemm_reference::<Self>(a, b, transpose_a, transpose_b)
    }

    /// The differentiable `x @ w^T`.
    ///
    /// # Shapes
    /// - `x`: `[rows, in]`, `w`: `[out, in]` (Hugging Face layout), same dtype
    /// - output: `[rows, out]`
    fn dense(x: FloatTensor<Self>, w: FloatTensor<Self>) -> FloatTensor<Self> {
        Self::gemm(x, w, false, true)
    }

    /// The body that runs [`gemm`](Self::gemm) here: a [`GemmBody::name`].
    fn gemm_name() -> &'static str {
        "burn"
    }
}

/// Which kernel runs [`LinearBackend::gemm`] on a backend that offers more than burn's matmul
/// (CUDA with the `cublaslt` feature). Every other backend runs burn's matmul whatever is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum GemmBody {
    /// burn's matmul.
    Burn,
    /// cuBLASLt on its own stream, ordered with burn's by waiting on the host before and after
    /// each product.
    #[default]
    Cublaslt,
}

impl GemmBody {
    pub const ALL: [GemmBody; 2] = [Self::Burn, Self::Cublaslt];

    /// The name used on the command line and in benchmark reports.
    pub fn name(self) -> &'static str {
        match self {
            Self::Burn => "burn",
            Self::Cublaslt => "cublaslt",
        }
    }
}

impl std::str::FromStr for GemmBody {
    type Err = String;

    fn from_str(name: &str) -> Result<Self, String> {
        Self::ALL
            .into_iter()
            .find(|body| body.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.iter().map(|body| body.name()).collect();
                format!(
                    "unknown gemm body `{name}` (expected one of {})",
                    names.join(", ")
                )
            })
    }
}

static GEMM_BODY: AtomicU8 = AtomicU8::new(GemmBody::Cublaslt as u8);

/// Picks the body of [`LinearBackend::gemm`] for the rest of the process (default
/// [`GemmBody::Cublaslt`]).
pub fn set_gemm_body(body: GemmBody) {
    GEMM_BODY.store(body as u8, Ordering::Relaxed);
}

/// The body picked by [`set_gemm_body`].
pub fn gemm_body() -> GemmBody {
    match GEMM_BODY.load(Ordering::Relaxed) {
        0 => GemmBody::Burn,
        _ => GemmBody::Cublaslt,
    }
}

/// [`LinearBackend::gemm`] in burn tensor ops.
pub fn gemm_reference<B: Backend>(
    a: FloatTensor<B>,
    b: FloatTensor<B>,
    transpose_a: bool,
    transpose_b: bool,
) -> FloatTensor<B> {
    let a = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(a));
    let b = Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(b));
    let a = if transpose_a { a.transpose() } else { a };
    let b = if transpose_b { b.transpose() } else { b };
    a.matmul(b).into_primitive().tensor()
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{Distribution, Tolerance};

    use super::*;

    type B = Flex;
    type Ad = Autodiff<Flex>;

    fn linear<Bk: LinearBackend>(x: Tensor<Bk, 2>, w: Tensor<Bk, 2>) -> Tensor<Bk, 2> {
        Tensor::from_primitive(TensorPrimitive::Float(Bk::dense(
            x.into_primitive().tensor(),
            w.into_primitive().tensor(),
        )))
    }

    #[test]
    fn gemm_bodies_parse_from_their_names() {
        for body in GemmBody::ALL {
            assert_eq!(body.name().parse::<GemmBody>(), Ok(body));
        }
        let err = "cublas".parse::<GemmBody>().unwrap_err();
        assert!(
            err.contains("`cublas`") && err.contains("burn, cublaslt"),
            "{err}"
        );
    }

    #[test]
    fn gemm_transposes_each_operand_as_asked() {
        let device = Default::default();
        let a = Tensor::<B, 2>::random([5, 3], Distribution::Default, &device);
        let b = Tensor::<B, 2>::random([3, 4], Distribution::Default, &device);
        let expected = a.clone().matmul(b.clone()).into_data();
        for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
            let a = if ta { a.clone().transpose() } else { a.clone() };
            let b = if tb { b.clone().transpose() } else { b.clone() };
            let c = B::gemm(
                a.into_primitive().tensor(),
                b.into_primitive().tensor(),
                ta,
                tb,
            );
            Tensor::<B, 2>::from_primitive(TensorPrimitive::Float(c))
                .into_data()
                .assert_approx_eq::<f32>(&expected, Tolerance::default());
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
