//! RMSNorm, SwiGLU and the rotary embedding behind a backend trait, each one autodiff node that
//! keeps only its inputs.
//!
//! ```text
//! rms_norm: x [rows, h], w [h] -> y = (x_f32 * rstd) as dtype * w,  rstd = 1 / sqrt(mean(x_f32^2) + eps)
//!           backward: n = x_f32 * rstd, g = (dy * w) as f32
//!                     dx = rstd * (g - n * mean(g * n)),  dw = sum_rows(dy * n as dtype)
//! swiglu:   gate, up [rows, i] -> y = silu(gate) * up,  s = sigmoid(gate)
//!           backward: du = dy * gate * s,  dgate = dy * up * s * (1 + gate * (1 - s))
//! rotary:   x [b, h, s, d], cos, sin [b, 1, s, d] -> y = x * cos + rotate_half(x) * sin,
//!           rotate_half([x1, x2]) = [-x2, x1] over the two halves of the last axis
//!           backward: dx = dy * cos - rotate_half(dy * sin)   (the tables get no gradient)
//! ```
//!
//! # What autodiff stores
//!
//! Written in plain tensor ops, burn's autodiff keeps every intermediate a backward step reads:
//! RMSNorm keeps `x` cast to f32 (twice the size of a bf16 `x`) and the normalised rows in the
//! activations' dtype; SwiGLU keeps `gate`, `sigmoid(gate)`, `silu(gate)` and `up`, four
//! `[rows, intermediate]` tensors. Under `Autodiff<B>` [`RowwiseBackend`] registers one node
//! per call instead, which keeps
//!
//! - RMSNorm: `x` in its own dtype, the `[rows, 1]` f32 `rstd` and the weight;
//! - SwiGLU: `gate` and `up`;
//! - the rotary embedding: nothing but the cos and sin tables, which every layer shares. Written
//!   in plain ops its backward also runs the two `narrow`s' and the `cat`'s backward steps
//!   (zero-filled tensors and slice assignments, per layer for q and k); the node's backward is
//!   the forward's few ops again;
//!
//! and recomputes the rest (element-wise work) in the backward pass. The forward values are
//! the plain ops' exactly; the gradients equal theirs up to float rounding (the tests below).

mod autodiff;
mod backends;
#[cfg(feature = "cubecl")]
mod cube;

use burn::tensor::activation::{sigmoid, silu};
use burn::tensor::backend::Backend;
use burn::tensor::ops::{FloatTensor, IntTensor};
use burn::tensor::{DType, FloatDType, Tensor, TensorPrimitive};

/// A backend whose RMSNorm, SwiGLU and rotary embedding are one autodiff node each.
///
/// Implemented for `Autodiff<B, C>` whenever `B` implements it (the lean node), and, behind
/// this crate's features, for the same backend families as
/// [`AttentionBackend`](crate::AttentionBackend), which extends this trait. The default bodies
/// are plain tensor ops; the CubeCL backends override RMSNorm's and the rotary embedding's
/// `_forward` and `_backward` methods with kernels (`rowwise/cube.rs`) when
/// [`crate::kernels`] says so. It extends [`GemmBackend`](qwen_gemm::GemmBackend) for
/// [`cast_param`](qwen_gemm::GemmBackend::cast_param), the norm weights' cast.
pub trait RowwiseBackend: qwen_gemm::GemmBackend {
    /// RMSNorm of each row in f32, cast back to `x`'s dtype, scaled by `weight`; also returns
    /// `rstd = 1 / sqrt(mean(x^2) + eps)` for the backward. Not differentiable on
    /// `Autodiff<B>`; use [`rms_norm`](Self::rms_norm) for that.
    ///
    /// # Shapes
    /// - x: `[rows, hidden]`, weight: `[hidden]` in `x`'s dtype
    /// - output: `[rows, hidden]` in `x`'s dtype, and rstd `[rows, 1]` in f32
    fn rms_norm_forward(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        eps: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        tensor_ops::rms_norm_forward::<Self>(x, weight, eps)
    }

    /// The gradients of [`rms_norm_forward`](Self::rms_norm_forward) with respect to `x` and
    /// `weight`, each computed only when asked for. Given `acc` (x's gradient from its other
    /// readers so far, shaped and typed as `x`), `x`'s comes back added to it: the residual
    /// stream's gradient joins the norm's in the kernel that writes it, not in an addition of
    /// its own.
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        request: [bool; 2],
        acc: Option<FloatTensor<Self>>,
    ) -> [Option<FloatTensor<Self>>; 2] {
        tensor_ops::rms_norm_backward::<Self>(x, rstd, weight, grad, request, acc)
    }

    /// The gradient of RMSNorm's weight alone (see [`rms_norm_backward`](
    /// Self::rms_norm_backward)): the products `grad * normed` in the activations' dtype,
    /// summed over rows in f32, as `[hidden]` in `x`'s dtype.
    fn rms_norm_weight_grad(
        x: FloatTensor<Self>,
        rstd: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tensor_ops::rms_norm_weight_grad::<Self>(x, rstd, grad)
    }

    /// The sum over the rows of `x` `[rows, n]`, in f32, as `[n]` in `x`'s dtype: the gradient
    /// of a bias broadcast over rows ([`LinearBackend::add_bias`](crate::LinearBackend::add_bias)).
    fn sum_rows(x: FloatTensor<Self>) -> FloatTensor<Self> {
        tensor_ops::sum_rows::<Self>(x)
    }

    /// The differentiable RMSNorm: on `Autodiff<B>` one node keeping `x`, `rstd` and `weight`.
    fn rms_norm(x: FloatTensor<Self>, weight: FloatTensor<Self>, eps: f64) -> FloatTensor<Self> {
        Self::rms_norm_forward(x, weight, eps).0
    }

    /// The gradients of `silu(gate) * up` with respect to `gate` and `up`, each computed only
    /// when asked for.
    fn swiglu_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        request: [bool; 2],
    ) -> [Option<FloatTensor<Self>>; 2] {
        tensor_ops::swiglu_backward::<Self>(gate, up, grad, request)
    }

    /// The differentiable `silu(gate) * up`: on `Autodiff<B>` one node keeping `gate` and `up`.
    fn swiglu(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        swiglu_forward::<Self, 2>(float(gate), float(up))
            .into_primitive()
            .tensor()
    }

    /// The rotary embedding `x * cos + rotate_half(x) * sin` (see the module docs). Not
    /// differentiable on `Autodiff<B>`; use [`rotary`](Self::rotary) for that.
    ///
    /// # Shapes
    /// - x: `[batch, heads, seq, head_dim]`; cos, sin: `[batch, 1, seq, head_dim]` in `x`'s dtype
    /// - output: as x
    fn rotary_forward(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tensor_ops::rotary_forward::<Self>(x, cos, sin)
    }

    /// The gradient of [`rotary_forward`](Self::rotary_forward) with respect to `x`.
    fn rotary_backward(
        grad: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        tensor_ops::rotary_backward::<Self>(grad, cos, sin)
    }

    /// Whether RMSNorm (its forward and the gradient of `x`) and the rotary embedding run
    /// kernels of their own rather than tensor ops (the CubeCL backends under
    /// [`crate::kernels`]' setting).
    fn has_rowwise_kernels() -> bool {
        false
    }

    /// Whether this one of the kernels ([`Kernel::Rotary`](crate::Kernel::Rotary) or
    /// [`Kernel::RmsNorm`](crate::Kernel::RmsNorm)) runs now: the body of
    /// [`has_rowwise_kernels`](Self::has_rowwise_kernels), less the kernels turned off
    /// ([`crate::kernels::set_kernels_off`]).
    fn rowwise_kernel_runs(_kernel: crate::Kernel) -> bool {
        false
    }

    /// The gradient of an embedding lookup with respect to its table: row `v` is the sum of
    /// the rows of `grad` whose id is `v`, summed in f32, in `dtype`. Given `acc` (the table's
    /// gradient so far: a tied lm_head's), the sum starts from it rather than from zeros; CUDA
    /// adds the rows into it in place where nothing else holds it.
    ///
    /// # Shapes
    /// - grad: `[n, hidden]`, ids: `[n]` in `0..vocab`, acc: `[vocab, hidden]`
    /// - output: `[vocab, hidden]`
    fn token_embedding_backward(
        grad: FloatTensor<Self>,
        ids: IntTensor<Self>,
        vocab: usize,
        dtype: DType,
        acc: Option<FloatTensor<Self>>,
    ) -> FloatTensor<Self> {
        tensor_ops::embedding_backward::<Self>(grad, ids, vocab, dtype, acc)
    }

    /// The differentiable embedding lookup (rows `ids` of `weight`): on `Autodiff<B>` one node
    /// keeping the ids, whose backward is [`token_embedding_backward`](Self::token_embedding_backward).
    ///
    /// # Shapes
    /// - weight: `[vocab, hidden]`, ids: `[n]`
    /// - output: `[n, hidden]`
    fn token_embedding(weight: FloatTensor<Self>, ids: IntTensor<Self>) -> FloatTensor<Self> {
        Self::float_select(weight, 0, ids)
    }

    /// The rotary embedding, differentiable in `x`: on `Autodiff<B>` one node keeping the
    /// tables. The tables are constants to it (they get no gradient); callers with tables that
    /// need one use the plain ops, as [`ops::apply_rotary`](crate::ops::apply_rotary) does.
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        Self::rotary_forward(x, cos, sin)
    }
}

fn float<B: Backend, const D: usize>(t: FloatTensor<B>) -> Tensor<B, D> {
    Tensor::from_primitive(TensorPrimitive::Float(t))
}

/// The tensor-op bodies of [`RowwiseBackend`]'s kernel methods on primitives: the trait's
/// defaults, and what a backend with kernels runs when [`crate::kernels`] says tensor ops.
pub(crate) mod tensor_ops {
    use burn::tensor::backend::Backend;
    use burn::tensor::ops::{FloatTensor, IntTensor};
    use burn::tensor::{DType, FloatDType, IndexingUpdateOp, Int, Tensor};

    use super::float;

    pub fn rms_norm_forward<B: Backend>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        eps: f64,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (y, rstd) = super::rms_norm_forward::<B>(float(x), float(weight), eps);
        (y.into_primitive().tensor(), rstd.into_primitive().tensor())
    }

    pub fn rms_norm_weight_grad<B: Backend>(
        x: FloatTensor<B>,
        rstd: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        super::rms_norm_weight_grad::<B>(float(x), float(rstd), float(grad))
            .into_primitive()
            .tensor()
    }

    pub fn sum_rows<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        let x = float::<B, 2>(x);
        let (dtype, [_, n]) = (x.dtype(), x.dims());
        crate::reduce::sum_rows(x.cast(FloatDType::F32))
            .reshape([n])
            .cast(dtype)
            .into_primitive()
            .tensor()
    }

    pub fn swiglu_backward<B: Backend>(
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        grad: FloatTensor<B>,
        request: [bool; 2],
    ) -> [Option<FloatTensor<B>>; 2] {
        let [dg, du] = super::swiglu_backward::<B>(float(gate), float(up), float(grad), request);
        [
            dg.map(|t| t.into_primitive().tensor()),
            du.map(|t| t.into_primitive().tensor()),
        ]
    }

    pub fn rms_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        rstd: FloatTensor<B>,
        weight: FloatTensor<B>,
        grad: FloatTensor<B>,
        request: [bool; 2],
        acc: Option<FloatTensor<B>>,
    ) -> [Option<FloatTensor<B>>; 2] {
        let (dx, dw) = super::rms_norm_backward::<B>(
            float(x),
            float(rstd),
            float(weight),
            float(grad),
            request,
        );
        [
            dx.map(|dx| add_to::<B>(acc, dx.into_primitive().tensor())),
            dw.map(|t| t.into_primitive().tensor()),
        ]
    }

    /// `acc + t`, or `t` where there is no `acc`.
    fn add_to<B: Backend>(acc: Option<FloatTensor<B>>, t: FloatTensor<B>) -> FloatTensor<B> {
        match acc {
            Some(acc) => B::float_add(acc, t),
            None => t,
        }
    }

    pub fn rotary_forward<B: Backend>(
        x: FloatTensor<B>,
        cos: FloatTensor<B>,
        sin: FloatTensor<B>,
    ) -> FloatTensor<B> {
        super::rotary_forward::<B>(float(x), float(cos), float(sin))
            .into_primitive()
            .tensor()
    }

    pub fn rotary_backward<B: Backend>(
        grad: FloatTensor<B>,
        cos: FloatTensor<B>,
        sin: FloatTensor<B>,
    ) -> FloatTensor<B> {
        super::rotary_backward::<B>(float(grad), float(cos), float(sin))
            .into_primitive()
            .tensor()
    }

    /// Zeros (or `acc`), then each row of `grad` added into its id's row (burn's
    /// `select_add`), in f32, cast to `dtype`.
    pub fn embedding_backward<B: Backend>(
        grad: FloatTensor<B>,
        ids: IntTensor<B>,
        vocab: usize,
        dtype: DType,
        acc: Option<FloatTensor<B>>,
    ) -> FloatTensor<B> {
        let grad = float::<B, 2>(grad).cast(FloatDType::F32);
        let [_, hidden] = grad.dims();
        let ids = Tensor::<B, 1, Int>::from_primitive(ids);
        let start = match acc {
            Some(acc) => float::<B, 2>(acc).cast(FloatDType::F32),
            None => Tensor::<B, 2>::zeros([vocab, hidden], (&grad.device(), DType::F32)),
        };
        start
            .select_assign(0, ids, grad, IndexingUpdateOp::Add)
            .cast(dtype)
            .into_primitive()
            .tensor()
    }

    /// RMSNorm's backward for a backend with a kernel for the gradient of `x`: `dx` from
    /// `dx_kernel(x, rstd, weight, grad)`, the weight's gradient from the backend's
    /// [`rms_norm_weight_grad`](super::RowwiseBackend::rms_norm_weight_grad).
    #[cfg(any(feature = "cubecl", feature = "fusion"))]
    pub fn rms_norm_backward_with_dx_kernel<B: super::RowwiseBackend>(
        x: FloatTensor<B>,
        rstd: FloatTensor<B>,
        weight: FloatTensor<B>,
        grad: FloatTensor<B>,
        [want_x, want_weight]: [bool; 2],
        acc: Option<FloatTensor<B>>,
        dx_kernel: impl FnOnce(
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            FloatTensor<B>,
            Option<FloatTensor<B>>,
        ) -> FloatTensor<B>,
    ) -> [Option<FloatTensor<B>>; 2] {
        let dw =
            want_weight.then(|| B::rms_norm_weight_grad(x.clone(), rstd.clone(), grad.clone()));
        let dx = want_x.then(|| dx_kernel(x, rstd, weight, grad, acc));
        [dx, dw]
    }
}

/// The body of [`RowwiseBackend::rms_norm_forward`], the same ops as
/// [`ops::rms_norm_reference`](crate::ops::rms_norm_reference).
pub fn rms_norm_forward<B: Backend>(
    x: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    eps: f64,
) -> (Tensor<B, 2>, Tensor<B, 2>) {
    let dtype = x.dtype();
    let x = x.cast(FloatDType::F32);
    // [rows, 1]
    let rstd = (x.clone().square().mean_dim(1) + eps).sqrt().recip();
    let normed = (x * rstd.clone()).cast(dtype);
    (normed * weight.unsqueeze::<2>(), rstd)
}

/// The body of [`RowwiseBackend::rms_norm_backward`].
pub fn rms_norm_backward<B: Backend>(
    x: Tensor<B, 2>,
    rstd: Tensor<B, 2>,
    weight: Tensor<B, 1>,
    grad: Tensor<B, 2>,
    [want_x, want_weight]: [bool; 2],
) -> (Option<Tensor<B, 2>>, Option<Tensor<B, 1>>) {
    let dtype = x.dtype();
    let [_, hidden] = x.dims();
    // [rows, hidden] in f32, recomputed
    let normed = x.cast(FloatDType::F32) * rstd.clone();
    let dw = want_weight.then(|| weight_grad(grad.clone(), normed.clone(), dtype));
    let dx = want_x.then(|| {
        let g = (grad * weight.unsqueeze::<2>()).cast(FloatDType::F32);
        // [rows, 1]
        let dot = (g.clone() * normed.clone()).mean_dim(1);
        ((g - normed * dot) * rstd).cast(dtype)
    });
    (dx, dw.map(|dw| dw.reshape([hidden])))
}

/// RMSNorm's weight gradient, `[1, hidden]` in `dtype`, from the f32 normalised rows: the
/// products in the activations' dtype, as autodiff of the plain ops has them, summed over rows
/// in f32 and in two stages (crate::reduce).
fn weight_grad<B: Backend>(grad: Tensor<B, 2>, normed: Tensor<B, 2>, dtype: DType) -> Tensor<B, 2> {
    crate::reduce::sum_rows((grad * normed.cast(dtype)).cast(FloatDType::F32)).cast(dtype)
}

/// The body of [`RowwiseBackend::rms_norm_weight_grad`]: [`rms_norm_backward`]'s weight
/// gradient alone.
pub fn rms_norm_weight_grad<B: Backend>(
    x: Tensor<B, 2>,
    rstd: Tensor<B, 2>,
    grad: Tensor<B, 2>,
) -> Tensor<B, 1> {
    let (dtype, [_, hidden]) = (x.dtype(), x.dims());
    weight_grad(grad, x.cast(FloatDType::F32) * rstd, dtype).reshape([hidden])
}

/// The body of [`RowwiseBackend::swiglu`], the same ops as
/// [`ops::swiglu_reference`](crate::ops::swiglu_reference).
pub fn swiglu_forward<B: Backend, const D: usize>(
    gate: Tensor<B, D>,
    up: Tensor<B, D>,
) -> Tensor<B, D> {
    silu(gate) * up
}

/// The body of [`RowwiseBackend::swiglu_backward`].
pub fn swiglu_backward<B: Backend>(
    gate: Tensor<B, 2>,
    up: Tensor<B, 2>,
    grad: Tensor<B, 2>,
    [want_gate, want_up]: [bool; 2],
) -> [Option<Tensor<B, 2>>; 2] {
    let s = sigmoid(gate.clone());
    let du = want_up.then(|| grad.clone() * gate.clone() * s.clone());
    let dg = want_gate.then(|| {
        // d silu / d gate = s + gate * s * (1 - s)
        let d_silu = grad * up;
        let one_minus = s.clone().neg().add_scalar(1.0);
        d_silu * s * (gate * one_minus).add_scalar(1.0)
    });
    [dg, du]
}

/// `[x1, x2] -> [-x2, x1]` over the two halves of the last axis.
fn rotate_half<B: Backend>(x: Tensor<B, 4>) -> Tensor<B, 4> {
    let half = x.dims()[3] / 2;
    let first = x.clone().narrow(3, 0, half);
    let second = x.narrow(3, half, half);
    Tensor::cat(vec![second.neg(), first], 3)
}

/// The body of [`RowwiseBackend::rotary_forward`], the same ops as
/// [`ops::apply_rotary_reference`](crate::ops::apply_rotary_reference).
pub fn rotary_forward<B: Backend>(
    x: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    x.clone() * cos + rotate_half(x) * sin
}

/// The body of [`RowwiseBackend::rotary_backward`]: `rotate_half` is a signed permutation `R`,
/// so the gradient of `R(x) * sin` is `R^T(dy * sin) = -R(dy * sin)`.
pub fn rotary_backward<B: Backend>(
    grad: Tensor<B, 4>,
    cos: Tensor<B, 4>,
    sin: Tensor<B, 4>,
) -> Tensor<B, 4> {
    grad.clone() * cos - rotate_half(grad * sin)
}

#[cfg(test)]
mod tests {
    use burn::backend::{Autodiff, Flex};
    use burn::tensor::{DType, Distribution, Tolerance};

    use super::*;
    use crate::ops;

    type Ad = Autodiff<Flex>;

    fn max_rel(a: Tensor<Flex, 2>, b: Tensor<Flex, 2>) -> f32 {
        let (a, b) = (a.cast(DType::F32), b.cast(DType::F32));
        let scale: f32 = b.clone().abs().max().into_scalar();
        let diff: f32 = (a - b).abs().max().into_scalar();
        diff / scale
    }

    /// `[rows, hidden]` with rows of different scales, so that `rstd` varies by row.
    fn input(rows: usize, hidden: usize, dtype: DType) -> Tensor<Ad, 2> {
        let device = Default::default();
        let x = Tensor::<Ad, 2>::random([rows, hidden], Distribution::Normal(0.0, 1.0), &device);
        let scale = Tensor::<Ad, 1, burn::tensor::Int>::arange(1..rows as i64 + 1, &device)
            .float()
            .reshape([rows, 1]);
        (x * scale).cast(dtype).detach().require_grad()
    }

    /// The lean RMSNorm node against autodiff of the plain ops: the same output, and the same
    /// gradients for `x` and the weight, in f32 and in bf16 (f32 master weight cast on use).
    /// `x` is also read by a later op (a residual path), whose gradient the node adds to its
    /// own (`rms_norm_backward`'s accumulator).
    #[test]
    fn rms_norm_node_equals_plain_ops() {
        let device = Default::default();
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let x = input(12, 48, dtype);
            let weight = Tensor::<Ad, 1>::random([48], Distribution::Uniform(0.5, 1.5), &device)
                .require_grad();
            let upstream = Tensor::<Ad, 2>::random([12, 48], Distribution::Default, &device)
                .cast(dtype)
                .detach();
            let residual = Tensor::<Ad, 2>::random([12, 48], Distribution::Default, &device)
                .cast(dtype)
                .detach();
            let run = |lean: bool| {
                let (x, weight) = (x.clone(), weight.clone());
                let y = if lean {
                    ops::rms_norm(x.clone(), weight.clone(), 1e-6)
                } else {
                    ops::rms_norm_reference(x.clone(), weight.clone(), 1e-6)
                };
                let loss =
                    (y.clone() * upstream.clone()).sum() + (x.clone() * residual.clone()).sum();
                let grads = loss.backward();
                let dx = x.grad(&grads).unwrap();
                let dw = weight.grad(&grads).unwrap().unsqueeze::<2>();
                (y.inner(), dx, dw)
            };
            let (y, dx, dw) = run(true);
            let (y_ref, dx_ref, dw_ref) = run(false);
            y.into_data()
                .assert_approx_eq::<f32>(&y_ref.into_data(), Tolerance::absolute(0.0));
            let (ex, ew) = (max_rel(dx, dx_ref), max_rel(dw, dw_ref));
            println!("{dtype:?}: dx {ex:e}, dw {ew:e}");
            assert!(
                ex < tolerance && ew < tolerance,
                "{dtype:?}: dx {ex}, dw {ew}"
            );
        }
    }

    /// The embedding node against autodiff of burn's `select`, with the table also read after
    /// the lookup (as a tied lm_head reads it): the lookup's rows are added into the gradient
    /// that reader gave the table.
    #[test]
    fn embedding_node_adds_into_a_tied_readers_gradient() {
        let device = Default::default();
        let table = Tensor::<Ad, 2>::random([10, 6], Distribution::Default, &device).require_grad();
        let ids = Tensor::<Ad, 2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(vec![3i64, 1, 3, 9, 0, 3], [2, 3]),
            &device,
        );
        let upstream = Tensor::<Ad, 3>::random([2, 3, 6], Distribution::Default, &device);
        let tied = Tensor::<Ad, 2>::random([10, 6], Distribution::Default, &device);
        let run = |ours: bool| {
            let y = if ours {
                ops::embedding(table.clone(), ids.clone())
            } else {
                table
                    .clone()
                    .select(0, ids.clone().reshape([6]))
                    .reshape([2, 3, 6])
            };
            let loss = (y * upstream.clone()).sum() + (table.clone() * tied.clone()).sum();
            table.grad(&loss.backward()).unwrap()
        };
        run(true)
            .into_data()
            .assert_approx_eq::<f32>(&run(false).into_data(), Tolerance::default());
    }

    /// The lean SwiGLU node against autodiff of `silu(gate) * up`.
    #[test]
    fn swiglu_node_equals_plain_ops() {
        let device = Default::default();
        for (dtype, tolerance) in [(DType::F32, 1e-5), (DType::BF16, 1e-2)] {
            let gate = input(10, 40, dtype);
            let up = input(10, 40, dtype);
            let upstream = Tensor::<Ad, 2>::random([10, 40], Distribution::Default, &device)
                .cast(dtype)
                .detach();
            let run = |lean: bool| {
                let (gate, up) = (gate.clone(), up.clone());
                let y = if lean {
                    ops::swiglu(gate.clone(), up.clone())
                } else {
                    ops::swiglu_reference(gate.clone(), up.clone())
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                (
                    y.inner(),
                    gate.grad(&grads).unwrap(),
                    up.grad(&grads).unwrap(),
                )
            };
            let (y, dg, du) = run(true);
            let (y_ref, dg_ref, du_ref) = run(false);
            y.into_data()
                .assert_approx_eq::<f32>(&y_ref.into_data(), Tolerance::absolute(0.0));
            let (eg, eu) = (max_rel(dg, dg_ref), max_rel(du, du_ref));
            println!("{dtype:?}: dgate {eg:e}, dup {eu:e}");
            assert!(
                eg < tolerance && eu < tolerance,
                "{dtype:?}: dgate {eg}, dup {eu}"
            );
        }
    }

    /// The rotary node against autodiff of the plain ops, with tables whose two halves differ
    /// (the backward may not assume the duplicated angles of `rotary_tables`), in f32 and bf16;
    /// tables that need a gradient take the plain ops and get it.
    #[test]
    fn rotary_node_equals_plain_ops() {
        let device = Default::default();
        let shape = [2, 3, 5, 8];
        let table = |seed: u64| {
            Ad::seed(&device, seed);
            Tensor::<Ad, 4>::random([2, 1, 5, 8], Distribution::Uniform(-1.0, 1.0), &device)
        };
        for (dtype, tolerance) in [(DType::F32, 1e-6), (DType::BF16, 1e-2)] {
            let (cos, sin) = (table(1).cast(dtype), table(2).cast(dtype));
            Ad::seed(&device, 3);
            let x = Tensor::<Ad, 4>::random(shape, Distribution::Normal(0.0, 1.0), &device)
                .cast(dtype)
                .detach()
                .require_grad();
            let upstream = Tensor::<Ad, 4>::random(shape, Distribution::Default, &device)
                .cast(dtype)
                .detach();
            let run = |lean: bool| {
                let x = x.clone();
                let y = if lean {
                    ops::apply_rotary(x.clone(), cos.clone(), sin.clone())
                } else {
                    ops::apply_rotary_reference(x.clone(), cos.clone(), sin.clone())
                };
                let grads = (y.clone() * upstream.clone()).sum().backward();
                let flat = |t: Tensor<Flex, 4>| t.reshape([30, 8]);
                (flat(y.inner()), flat(x.grad(&grads).unwrap()))
            };
            let (y, dx) = run(true);
            let (y_ref, dx_ref) = run(false);
            y.into_data()
                .assert_approx_eq::<f32>(&y_ref.into_data(), Tolerance::absolute(0.0));
            let error = max_rel(dx, dx_ref);
            println!("{dtype:?}: dx {error:e}");
            assert!(error < tolerance, "{dtype:?}: dx {error}");
        }

        // Tracked tables: the plain ops, so the tables' gradients exist.
        let x = Tensor::<Ad, 4>::ones(shape, &device).require_grad();
        let (cos, sin) = (table(4).require_grad(), table(5).require_grad());
        let grads = ops::apply_rotary(x.clone(), cos.clone(), sin.clone())
            .sum()
            .backward();
        assert!(x.grad(&grads).is_some() && cos.grad(&grads).is_some());
        assert!(sin.grad(&grads).is_some());
    }

    /// Only the asked-for gradient flows: a frozen weight, or an `up` that needs none.
    #[test]
    fn nodes_skip_gradients_not_asked_for() {
        let device = Default::default();
        let x = input(4, 8, DType::F32);
        let weight = Tensor::<Ad, 1>::ones([8], &device);
        let grads = ops::rms_norm(x.clone(), weight.clone(), 1e-6)
            .sum()
            .backward();
        assert!(x.grad(&grads).is_some());
        assert!(weight.grad(&grads).is_none());

        let gate = input(4, 8, DType::F32);
        let up = input(4, 8, DType::F32).set_require_grad(false);
        let grads = ops::swiglu(gate.clone(), up.clone()).sum().backward();
        assert!(gate.grad(&grads).is_some());
        assert!(up.grad(&grads).is_none());
    }
}
