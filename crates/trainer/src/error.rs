//! Errors of the trainer library. The binary wraps them with `anyhow` context.

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: bad configuration: {reason}")]
    Config { path: PathBuf, reason: String },
    #[error(transparent)]
    Data(#[from] qwen_chat::ChatError),
    #[error(transparent)]
    Load(#[from] qwen_model::LoadError),
    #[error(transparent)]
    Save(#[from] qwen_model::SaveError),
    #[error(transparent)]
    Loss(#[from] qwen_loss::LossError),
    #[error("{path}: bad checkpoint: {reason}")]
    Checkpoint { path: PathBuf, reason: String },
    #[error("no training example is left: {0}")]
    NoData(String),
    #[error(
        "step {step}: the {what} is {value}; stopping. The last good checkpoint is {}",
        last_checkpoint.as_ref().map_or("none (nothing was saved yet)".to_string(), |p| p.display().to_string())
    )]
    NonFinite {
        step: u64,
        what: &'static str,
        value: f64,
        last_checkpoint: Option<PathBuf>,
    },
}
