//! `LinearBackend` for the plain backends: burn's matmul everywhere, cuBLASLt on CUDA with the
//! `cublaslt` feature. One impl per backend family, as in `attention/backends.rs`.

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
        match super::cublaslt::gemm(&a, &b, transpose_a, transpose_b) {
            Some(c) => c,
            None => super::gemm_reference::<Self>(a, b, transpose_a, transpose_b),
        }
    }

    #[cfg(feature = "cublaslt")]
    fn gemm_name() -> &'static str {
        if super::cublaslt::is_cuda::<R>() {
            "cublaslt"
        } else {
            "burn"
        }
    }
}

#[cfg(feature = "fusion")]
impl<B: burn_fusion::FusionBackend> super::LinearBackend for burn_fusion::Fusion<B> {}
