//! The trainer: it composes `qwen-model`, `qwen-chat` and `qwen-loss` into supervised
//! fine-tuning, generic over burn's `AutodiffBackend`.
//!
//! ```text
//! data.jsonl -> conversations -> rendered text + spans -> input_ids + labels(-100)
//!   -> batches (pad or pack) -> model.forward -> masked loss -> backward
//!   -> clip -> optimizer step -> checkpoint / export
//! ```
//!
//! [`train::train`] is the loop, readable top to bottom. The `qwen-sft` binary (in `main.rs`)
//! picks the backend by cargo feature (`cpu`, `wgpu`, `cuda`) and wires the subcommands.

pub mod backend;
pub mod bench;
pub mod check;
pub mod check_attention;
pub mod checkpoint;
pub mod config;
pub mod error;
pub mod eval;
pub mod fused_adamw;
pub mod generate;
pub mod host_profile;
pub mod metrics;
pub mod optim;
pub mod plot;
pub mod schedule;
pub mod source;
pub mod tensors;
pub mod train;

pub use config::TrainConfig;
pub use error::TrainError;
pub use train::{Observer, RunInfo, Silent, StepRecorder, TrainSummary, train};
