//! `LinearBackend` for the plain backends: `dense` is one [`GemmBackend::gemm`](
//! qwen_gemm::GemmBackend::gemm), whose body qwen-gemm picks per backend. One impl per backend
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
    Self: burn::tensor::backend::Backend<
            FloatTensorPrimitive = burn_cubecl::tensor::CubeTensor<R>,
            IntTensorPrimitive = burn_cubecl::tensor::CubeTensor<R>,
        >,
{
}

#[cfg(feature = "fusion")]
impl<B: burn_fusion::FusionBackend + super::LinearBackend> super::LinearBackend
    for burn_fusion::Fusion<B>
{
}
