//! The concrete backend of the `qwen-sft` binary, picked by cargo feature.
//!
//! Library code is generic; only the binary names a backend. With several features enabled the
//! binary takes `cuda`, then `wgpu`, then `cpu`.

#[cfg(feature = "cuda")]
mod selected {
    pub type Inner = burn::backend::Cuda;
    pub const NAME: &str = "cuda";
}

#[cfg(all(feature = "cuda-unfused", not(feature = "cuda")))]
mod selected {
    pub type Inner = burn::backend::Cuda;
    pub const NAME: &str = "cuda (unfused)";
}

#[cfg(all(feature = "wgpu", not(feature = "cuda-unfused")))]
mod selected {
    pub type Inner = burn::backend::Wgpu;
    pub const NAME: &str = "wgpu";
}

#[cfg(all(feature = "cpu", not(any(feature = "wgpu", feature = "cuda-unfused"))))]
mod selected {
    pub type Inner = burn::backend::Flex;
    pub const NAME: &str = "cpu (flex)";
}

#[cfg(not(any(feature = "cpu", feature = "wgpu", feature = "cuda-unfused")))]
compile_error!("enable one of the features `cpu`, `wgpu` or `cuda`");

/// The inference backend.
pub type Inference = selected::Inner;
/// The training backend: every op keeps what its backward needs.
pub type Training = burn::backend::Autodiff<Inference>;
/// The training backend under burn's balanced activation checkpointing
/// (`train.checkpointing = "balanced"`): memory-bound ops are recomputed in the backward.
pub type TrainingCheckpointed = burn::backend::Autodiff<
    Inference,
    burn::backend::autodiff::checkpoint::strategy::BalancedCheckpointing,
>;
/// A human-readable name of the compiled-in backend.
pub const BACKEND_NAME: &str = selected::NAME;

pub fn device() -> <Inference as burn::tensor::backend::BackendTypes>::Device {
    Default::default()
}
