//! `RowwiseBackend` for the plain backends, each with the default (tensor-op) bodies. One impl
//! per backend family, as in `attention/backends.rs`.

#[cfg(feature = "flex")]
impl super::RowwiseBackend for burn::backend::Flex {}

#[cfg(feature = "ndarray")]
impl super::RowwiseBackend for burn::backend::NdArray {}

#[cfg(feature = "cubecl")]
impl<R, F, I, BT> super::RowwiseBackend for burn_cubecl::CubeBackend<R, F, I, BT>
where
    R: burn_cubecl::CubeRuntime,
    F: burn_cubecl::FloatElement,
    I: burn_cubecl::IntElement,
    BT: burn_cubecl::BoolElement,
{
}

#[cfg(feature = "fusion")]
impl<B: burn_fusion::FusionBackend> super::RowwiseBackend for burn_fusion::Fusion<B> {}
