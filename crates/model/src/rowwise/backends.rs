//! `RowwiseBackend` for the plain backends, each with the default (tensor-op) bodies except for
//! the rotary embedding on CubeCL backends (`rowwise::cube`). One impl per backend family, as
//! in `attention/backends.rs`.

#[cfg(feature = "flex")]
impl super::RowwiseBackend for burn::backend::Flex {}

#[cfg(feature = "ndarray")]
impl super::RowwiseBackend for burn::backend::NdArray {}

#[cfg(feature = "cubecl")]
mod cube {
    use burn::tensor::backend::Backend;
    use burn_cubecl::tensor::CubeTensor;
    use burn_cubecl::{BoolElement, CubeBackend, CubeRuntime, FloatElement, IntElement};

    use crate::rowwise::{RowwiseBackend, cube, float, rotary_backward, rotary_forward};

    impl<R, F, I, BT> RowwiseBackend for CubeBackend<R, F, I, BT>
    where
        R: CubeRuntime,
        F: FloatElement,
        I: IntElement,
        BT: BoolElement,
        Self: Backend<FloatTensorPrimitive = CubeTensor<R>>,
    {
        fn rotary_forward(
            x: CubeTensor<R>,
            cos: CubeTensor<R>,
            sin: CubeTensor<R>,
        ) -> CubeTensor<R> {
            if !Self::has_rotary_kernel() {
                let y = rotary_forward::<Self>(float(x), float(cos), float(sin));
                return y.into_primitive().tensor();
            }
            cube::rotary(x, cos, sin, false)
        }

        fn rotary_backward(
            grad: CubeTensor<R>,
            cos: CubeTensor<R>,
            sin: CubeTensor<R>,
        ) -> CubeTensor<R> {
            if !Self::has_rotary_kernel() {
                let dx = rotary_backward::<Self>(float(grad), float(cos), float(sin));
                return dx.into_primitive().tensor();
            }
            cube::rotary(grad, cos, sin, true)
        }

        fn has_rotary_kernel() -> bool {
            crate::kernels::kernel_body().runs_kernels(qwen_gemm::is_cuda::<R>())
        }
    }
}

/// Under fusion, a rotary embedding whose inner backend has a kernel runs as one custom
/// operation (fusion ends its pending fused kernels there, then calls the inner backend's
/// method); with tensor ops it stays ordinary fusion operations.
#[cfg(feature = "fusion")]
mod fusion {
    use std::marker::PhantomData;

    use burn::tensor::ops::FloatTensor;
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    use crate::rowwise::{RowwiseBackend, float, rotary_backward, rotary_forward};

    type Handles<B> =
        HandleContainer<<<B as FusionBackend>::FusionRuntime as FusionRuntime>::FusionHandle>;

    #[derive(Clone, Debug)]
    struct Rotary<B> {
        desc: CustomOpIr,
        backward: bool,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + RowwiseBackend> Operation<B::FusionRuntime> for Rotary<B> {
        fn execute(&self, handles: &mut Handles<B>) {
            let ([x, cos, sin], [out]) = self.desc.as_fixed::<3, 1>();
            let x = handles.get_float_tensor::<B>(x);
            let cos = handles.get_float_tensor::<B>(cos);
            let sin = handles.get_float_tensor::<B>(sin);
            let y = if self.backward {
                B::rotary_backward(x, cos, sin)
            } else {
                B::rotary_forward(x, cos, sin)
            };
            handles.register_float_tensor::<B>(&out.id, y);
        }
    }

    /// One custom operation running the inner backend's rotary method.
    fn register<B: FusionBackend + RowwiseBackend>(
        x: FloatTensor<Fusion<B>>,
        cos: FloatTensor<Fusion<B>>,
        sin: FloatTensor<Fusion<B>>,
        backward: bool,
    ) -> FloatTensor<Fusion<B>> {
        let client = x.client.clone();
        let streams = OperationStreams::with_inputs([&x, &cos, &sin]);
        let out = TensorIr::uninit(client.create_empty_handle(), x.shape.clone(), x.dtype);
        let name = if backward {
            "qwen_model::rotary_backward"
        } else {
            "qwen_model::rotary"
        };
        let desc = CustomOpIr::new(name, &[x.into_ir(), cos.into_ir(), sin.into_ir()], &[out]);
        let op = Rotary::<B> {
            desc: desc.clone(),
            backward,
            _backend: PhantomData,
        };
        let [out] = client
            .register(streams, OperationIr::Custom(desc), op)
            .outputs();
        out
    }

    impl<B: FusionBackend + RowwiseBackend> RowwiseBackend for Fusion<B> {
        fn rotary_forward(
            x: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            if !B::has_rotary_kernel() {
                let y = rotary_forward::<Self>(float(x), float(cos), float(sin));
                return y.into_primitive().tensor();
            }
            register::<B>(x, cos, sin, false)
        }

        fn rotary_backward(
            grad: FloatTensor<Self>,
            cos: FloatTensor<Self>,
            sin: FloatTensor<Self>,
        ) -> FloatTensor<Self> {
            if !B::has_rotary_kernel() {
                let dx = rotary_backward::<Self>(float(grad), float(cos), float(sin));
                return dx.into_primitive().tensor();
            }
            register::<B>(grad, cos, sin, true)
        }

        fn has_rotary_kernel() -> bool {
            B::has_rotary_kernel()
        }
    }
}
