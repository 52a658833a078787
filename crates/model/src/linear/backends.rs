//! `LinearBackend` for the plain backends: burn's matmul everywhere, and on CUDA with the
//! `cublaslt` feature whichever [`GemmBody`](super::GemmBody) is set. One impl per backend
//! family, as in `attention/backends.rs`.

#[cfg(feature = "flex")]
impl super::LinearBackend for burn::backend::Flex {}

#[cfg(feature = "ndarray")]
impl super::LinearBackend for burn::backend::NdArray {}

#[cfg(feature = "cubecl")]
impl<R, F, I, BT> super::LinearBackend for burn_cubecl::CubeBackend<R, F, I, BT>
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
        let product = match super::gemm_body() {
            super::GemmBody::Burn => None,
            super::GemmBody::Cublaslt => super::cublaslt::gemm(&a, &b, transpose_a, transpose_b),
        };
        product.unwrap_or_else(|| super::gemm_reference::<Self>(a, b, transpose_a, transpose_b))
    }

    #[cfg(feature = "cublaslt")]
    fn gemm_name() -> &'static str {
        if super::cublaslt::is_cuda::<R>() {
            super::gemm_body().name()
        } else {
            "burn"
        }
    }
}

/// Under fusion, a product whose inner backend has a body of its own runs as one custom
/// operation (fusion ends its pending fused kernels there, then calls the inner `gemm`); with
/// burn's matmul it stays an ordinary fusion matmul.
#[cfg(feature = "fusion")]
mod fusion {
    use std::marker::PhantomData;

    use burn::tensor::Shape;
    use burn::tensor::ops::FloatTensor;
    use burn_fusion::stream::{Operation, OperationStreams};
    use burn_fusion::{Fusion, FusionBackend, FusionRuntime};
    use burn_ir::{CustomOpIr, HandleContainer, OperationIr, OperationOutput, TensorIr};

    use crate::linear::{GemmBody, LinearBackend, gemm_reference};

    #[derive(Clone, Debug)]
    struct Gemm<B> {
        desc: CustomOpIr,
        transpose_a: bool,
        transpose_b: bool,
        _backend: PhantomData<B>,
    }

    impl<B: FusionBackend + LinearBackend> Operation<B::FusionRuntime> for Gemm<B> {
        fn execute(
            &self,
            handles: &mut HandleContainer<<B::FusionRuntime as FusionRuntime>::FusionHandle>,
        ) {
            let ([a, b], [c]) = self.desc.as_fixed();
            let product = B::gemm(
                handles.get_float_tensor::<B>(a),
                handles.get_float_tensor::<B>(b),
                self.transpose_a,
                self.transpose_b,
            );
            handles.register_float_tensor::<B>(&c.id, product);
        }
    }

    impl<B: FusionBackend + LinearBackend> LinearBackend for Fusion<B> {
        fn gemm(
            a: FloatTensor<Self>,
            b: FloatTensor<Self>,
            transpose_a: bool,
            transpose_b: bool,
        ) -> FloatTensor<Self> {
            if B::gemm_name() == GemmBody::Burn.name() {
                return gemm_reference::<Self>(a, b, transpose_a, transpose_b);
            }
            let m = a.shape[usize::from(transpose_a)];
            let n = b.shape[usize::from(!transpose_b)];
            let (client, dtype) = (a.client.clone(), a.dtype);
            let streams = OperationStreams::with_inputs([&a, &b]);
            let c = TensorIr::uninit(client.create_empty_handle(), Shape::new([m, n]), dtype);
            let desc = CustomOpIr::new(
                "qwen_model::linear::gemm",
                &[a.into_ir(), b.into_ir()],
                &[c],
            );
            let op = Gemm::<B> {
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
    }
}
