//! `GemmBackend` for each backend family: burn's matmul everywhere, and on CUDA with the
//! `cublaslt` feature whichever [`GemmBody`](crate::GemmBody) is set.
//!
//! A blanket `impl<B: Backend>` would overlap the one for `Autodiff<B, C>`, so each family gets
//! its own impl behind a feature of this crate.

use burn::backend::Autodiff;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::tensor::ops::FloatTensor;
use burn::tensor::{DType, TensorMetadata};

use crate::{GemmBackend, cast_to};

#[cfg(feature = "flex")]
impl GemmBackend for burn::backend::Flex {}

#[cfg(feature = "ndarray")]
impl GemmBackend for burn::backend::NdArray {}

/// burn's differentiable matmul; the inner backend's body serves custom backward nodes that
/// call `B::gemm` themselves.
impl<B: GemmBackend, C: CheckpointStrategy> GemmBackend for Autodiff<B, C> {
    fn gemm_name() -> &'static str {
        B::gemm_name()
    }

    fn cast_param(t: FloatTensor<Self>, dtype: DType) -> FloatTensor<Self> {
        let from = t.primitive.dtype();
        if from == dtype {
            return t;
        }
        match CastParamBackward
            .prepare::<C>([t.node.clone()])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish(from, B::cast_param(t.primitive, dtype)),
            OpsKind::UnTracked(prep) => prep.finish(B::cast_param(t.primitive, dtype)),
        }
    }
}

/// The backward step of [`GemmBackend::cast_param`]: the gradient cast back to the
/// parameter's dtype (its state).
#[derive(Debug)]
struct CastParamBackward;

impl<B: GemmBackend> Backward<B, 1> for CastParamBackward {
    type State = DType;

    fn backward(
        self,
        ops: Ops<Self::State, 1>,
        grads: &mut Gradients,
        _checkpointer: &mut Checkpointer,
    ) {
        let [parent] = ops.parents;
        let grad = grads.consume::<B>(&ops.node);
        if let Some(parent) = parent {
            grads.register::<B>(parent.id, cast_to::<B>(grad, ops.state));
        }
    }
}

#[cfg(feature = "cubecl")]
impl<R, F, I, BT> GemmBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
    Self: burn::tensor::backend::Backend<FloatTensorPrimitive = burn_cubecl::tensor::CubeTensor<R>>,
{
    #[cfg(feature = "cublaslt")]
    fn gemm(
        a: burn_cubecl::tensor::CubeTensor<R>,
        b: burn_cubecl::tensor::CubeTensor<R>,
        transpose_a: bool,
        transpose_b: bool,
    ) -> burn_cubecl::tensor::CubeTensor<R> {
        let out = a.dtype;
        Self::gemm_to(a, b, transpose_a, transpose_b, out)
    }

    #[cfg(feature = "cublaslt")]
    fn gemm_to(
        a: burn_cubecl::tensor::CubeTensor<R>,
        b: burn_cubecl::tensor::CubeTensor<R>,
        transpose_a: bool,
        transpose_b: bool,
        out: burn::tensor::DType,
    ) -> burn_cubecl::tensor::CubeTensor<R> {
        let shape = crate::gemm_shape(a.meta.shape(), b.meta.shape(), transpose_a, transpose_b);
        let k = crate::inner_dim(a.meta.shape(), transpose_a);
        if crate::takes_picked_body(&shape, k) {
            // Written in `out` where cuBLASLt writes it, else in the inputs' dtype, then cast.
            let mut targets = vec![out];
            if a.dtype != out {
                targets.push(a.dtype);
            }
            for target in targets {
                let (body, shape) = (crate::gemm_body(), shape.clone());
                let c = crate::cublaslt::gemm(
                    body,
                    &a,
                    &b,
                    transpose_a,
                    transpose_b,
                    shape,
                    target,
                    None,
                );
                if let Some(c) = c {
                    return crate::cast_to::<Self>(c, out);
                }
            }
        }
        let product = crate::gemm_reference::<Self>(a, b, transpose_a, transpose_b);
        crate::cast_to::<Self>(product, out)
    }

    #[cfg(feature = "cublaslt")]
    fn gemm_add(
        a: burn_cubecl::tensor::CubeTensor<R>,
        b: burn_cubecl::tensor::CubeTensor<R>,
        transpose_a: bool,
        transpose_b: bool,
        acc: burn_cubecl::tensor::CubeTensor<R>,
    ) -> burn_cubecl::tensor::CubeTensor<R> {
        let shape = crate::gemm_shape(a.meta.shape(), b.meta.shape(), transpose_a, transpose_b);
        let k = crate::inner_dim(a.meta.shape(), transpose_a);
        if crate::takes_picked_body(&shape, k)
            && let Some(sum) = crate::cublaslt::gemm(
                crate::gemm_body(),
                &a,
                &b,
                transpose_a,
                transpose_b,
                shape,
                acc.dtype,
                Some(&acc),
            )
        {
            return sum;
        }
        crate::gemm_add_reference::<Self>(a, b, transpose_a, transpose_b, acc)
    }

    #[cfg(feature = "cublaslt")]
    fn gemm_name() -> &'static str {
        if crate::is_cuda::<R>() {
            crate::gemm_body().name()
        } else {
            crate::GemmBody::Burn.name()
        }
    }

    fn cast_param(t: burn_cubecl::tensor::CubeTensor<R>, dtype: DType) -> FloatTensor<Self> {
        if t.dtype != dtype
            && let Some(copy) = crate::copies::lookup(&t, dtype)
        {
            return copy;
        }
        cast_to::<Self>(t, dtype)
    }
}

/// Under fusion, a product whose inner backend has a body of its own runs as one custom
/// operation (fusion ends its pending fused kernels there, then calls the inner `gemm`); with
/// burn's matmul it stays an ordinary fusion matmul.
#[cfg(feature = "fusion")]
mod fusion {
    use std::marker::PhantomData;

    use burn::tensor::DType;
    use burn::tensor::ops::FloatTensor;
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    use crate::{
        GemmBackend, GemmBody, cast_to, gemm_reference, gemm_shape, inner_dim, takes_picked_body,
    };

    /// [`GemmBackend::cast_param`] as a custom operation: the inner backend's, which can hand
    /// out a kept copy (`crate::copies`) rather than cast.
    #[derive(Clone, Debug)]
    struct CastParam<B> {
        desc: CustomOpIr,
        dtype: DType,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + GemmBackend> Operation<B::FusionRuntime> for CastParam<B> {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ([t], [out]) = self.desc.as_fixed();
            let cast = B::cast_param(handles.get_float_tensor::<B>(t), self.dtype);
            handles.register_float_tensor::<B>(&out.id, cast);
        }
    }

    #[derive(Clone, Debug)]
    struct Gemm<B> {
        desc: CustomOpIr,
        transpose_a: bool,
        transpose_b: bool,
        /// The product's dtype: `gemm_to`'s `out`, else the inputs'.
        out: DType,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + GemmBackend> Operation<B::FusionRuntime> for Gemm<B> {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ([a, b], [c]) = self.desc.as_fixed();
            let product = B::gemm_to(
                handles.get_float_tensor::<B>(a),
                handles.get_float_tensor::<B>(b),
                self.transpose_a,
                self.transpose_b,
                self.out,
            );
            handles.register_float_tensor::<B>(&c.id, product);
        }
    }

    /// [`GemmBackend::gemm_add`] as a custom operation: the inner backend's.
    #[derive(Clone, Debug)]
    struct GemmAdd<B> {
        desc: CustomOpIr,
        transpose_a: bool,
        transpose_b: bool,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + GemmBackend> Operation<B::FusionRuntime> for GemmAdd<B> {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ([a, b, acc], [out]) = self.desc.as_fixed();
            let sum = B::gemm_add(
                handles.get_float_tensor::<B>(a),
                handles.get_float_tensor::<B>(b),
                self.transpose_a,
                self.transpose_b,
                handles.get_float_tensor::<B>(acc),
            );
            handles.register_float_tensor::<B>(&out.id, sum);
        }
    }

    impl<B: FusionBackend + GemmBackend> GemmBackend for Fusion<B> {
        fn gemm(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            transpose_a: bool,
            transpose_b: bool,
        ) -> FloatTensor<Self> {
            let out = a.dtype;
            Self::gemm_to(a, b, transpose_a, transpose_b, out)
        }

        fn gemm_to(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            transpose_a: bool,
            transpose_b: bool,
            out: DType,
        ) -> FloatTensor<Self> {
            let shape = gemm_shape(&a.shape, &b.shape, transpose_a, transpose_b);
            let k = inner_dim(&a.shape, transpose_a);
            if B::gemm_name() == GemmBody::Burn.name() || !takes_picked_body(&shape, k) {
                return cast_to::<Self>(
                    gemm_reference::<Self>(a, b, transpose_a, transpose_b),
                    out,
                );
            }
            let client = a.client.clone();
            let streams = OperationStreams::with_inputs([&a, &b]);
            let c = TensorIr::uninit(client.create_empty_handle(), shape, out);
            let desc = CustomOpIr::new("qwen_gemm::gemm", &[a.into_ir(), b.into_ir()], &[c]);
            let op = Gemm::<B> {
                desc: desc.clone(),
                transpose_a,
                transpose_b,
                out,
                _backend: PhantomData,
            };
            client
                .register(streams, OperationIr::Custom(desc), op)
                .output()
        }

        fn gemm_add(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            transpose_a: bool,
            transpose_b: bool,
            acc: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            let shape = gemm_shape(&a.shape, &b.shape, transpose_a, transpose_b);
            let k = inner_dim(&a.shape, transpose_a);
            if B::gemm_name() == GemmBody::Burn.name()
                || !takes_picked_body(&shape, k)
                || acc.shape != shape
            {
                return crate::gemm_add_reference::<Self>(a, b, transpose_a, transpose_b, acc);
            }
            let client = a.client.clone();
            let streams = OperationStreams::with_inputs([&a, &b, &acc]);
            let out = TensorIr::uninit(client.create_empty_handle(), shape, acc.dtype);
            let desc = CustomOpIr::new(
                "qwen_gemm::gemm_add",
                &[a.into_ir(), b.into_ir(), acc.into_ir()],
                &[out],
            );
            let op = GemmAdd::<B> {
                desc: desc.clone(),
                transpose_a,
                transpose_b,
                _backend: PhantomData,
            };
            client
                .register(streams, OperationIr::Custom(desc), op)
                .output()
        }

        fn gemm_name() -> &'static str {
            B::gemm_name()
        }

        /// A fusion cast while no copy is kept (it may fuse with its neighbours); once the
        /// optimizer keeps copies, a custom operation that can take one.
        fn cast_param(t: FloatTensor<Self>, dtype: DType) -> FloatTensor<Self> {
            if t.dtype == dtype || !crate::copies::any() {
                return cast_to::<Self>(t, dtype);
            }
            let client = t.client.clone();
            let streams = OperationStreams::with_inputs([&t]);
            let out = TensorIr::uninit(client.create_empty_handle(), t.shape.clone(), dtype);
            let desc = CustomOpIr::new("qwen_gemm::cast_param", &[t.into_ir()], &[out]);
            let op = CastParam::<B> {
                desc: desc.clone(),
                dtype,
                _backend: PhantomData,
            };
            client
                .register(streams, OperationIr::Custom(desc), op)
                .output()
        }
    }
}
