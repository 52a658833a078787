//! The Qwen2 causal language model in burn, equal to transformers' `Qwen2ForCausalLM`, with
//! Hugging Face checkpoint I/O.
//!
//! ```text
//! config.json + model.safetensors -> Qwen2ForCausalLM<B> -> logits / hidden states
//! ```
//!
//! - [`Qwen2Config`] mirrors `config.json`.
//! - [`Qwen2ForCausalLM`] is the model; its field names are Hugging Face's.
//! - [`ops`] holds the hot operations, one function each.
//! - [`attention`] is the memory-efficient causal attention behind [`ops::attention`], a backend
//!   trait ([`AttentionBackend`]) with a custom autodiff backward.
//! - [`linear`] is the linear layers' matrix product behind a backend trait
//!   ([`LinearBackend`], which `AttentionBackend` extends), on cuBLASLt for CUDA with the
//!   `cublaslt` feature.
//! - [`rowwise`] is RMSNorm, SwiGLU and the rotary embedding behind a backend trait
//!   ([`RowwiseBackend`], which `AttentionBackend` also extends), each one autodiff node that
//!   keeps only its inputs.
//! - [`kernels`] switches between the crate's CubeCL kernels and their tensor-op bodies.
//! - [`load_pretrained`] and [`save_pretrained`] read and write model directories that
//!   transformers and vLLM load as they are.

pub mod attention;
mod checkpoint;
mod config;
mod error;
mod grads;
pub mod kernels;
pub mod linear;
mod model;
pub mod ops;
pub mod reduce;
pub mod rowwise;
mod weights;

pub use attention::{AttentionBackend, AttentionImpl, fused_attention_passes};
pub use checkpoint::{
    CheckpointSource, SaveDtype, SaveOptions, load_pretrained, named_parameters, save_pretrained,
};
pub use config::{AttentionKind, Family, Qwen2Config, RopeParameters};
pub use error::{ConfigError, LoadError, SaveError};
pub use kernels::{Kernel, KernelBody, kernel_body, kernels_off, set_kernel_body, set_kernels_off};
pub use linear::LinearBackend;
pub use model::{
    Embedding, KvCache, LayerCache, Linear, Qwen2Attention, Qwen2DecoderLayer, Qwen2ForCausalLM,
    Qwen2Input, Qwen2Mlp, Qwen2Model, RmsNorm,
};
pub use rowwise::RowwiseBackend;
pub use weights::{Init, RandomInit, WeightSource, Weights};
