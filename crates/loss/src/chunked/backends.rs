//! `ChunkedCeBackend` for the plain backends, each with the default (tensor-op) kernels.
//!
//! A blanket `impl<B: Backend>` would overlap the one for `Autodiff<B, C>`, so each backend
//! family gets its own empty impl behind a feature of this crate.

#[cfg(feature = "flex")]
impl super::ChunkedCeBackend for burn::backend::Flex {}

#[cfg(feature = "cubecl")]
impl<R, F, I, BT> super::ChunkedCeBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
    Self: burn::tensor::backend::Backend<FloatTensorPrimitive = burn_cubecl::tensor::CubeTensor<R>>,
{
}

#[cfg(feature = "fusion")]
impl<B: burn_fusion::FusionBackend + qwen_gemm::GemmBackend> super::ChunkedCeBackend
    for burn_fusion::Fusion<B>
{
}
