//! Errors of this crate. Each names the file and, where there is one, the tensor or field.

use std::path::{Path, PathBuf};

/// A `config.json` that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{}: {source}", display_path(path))]
    Json {
        path: Option<PathBuf>,
        source: serde_json::Error,
    },
    #[error("{}: field `{field}`: {reason}", display_path(path))]
    Invalid {
        path: Option<PathBuf>,
        field: &'static str,
        reason: String,
    },
}

impl ConfigError {
    /// Attaches the file the text came from.
    pub(crate) fn in_file(self, file: &Path) -> Self {
        match self {
            Self::Json { source, .. } => Self::Json {
                path: Some(file.to_path_buf()),
                source,
            },
            Self::Invalid { field, reason, .. } => Self::Invalid {
                path: Some(file.to_path_buf()),
                field,
                reason,
            },
            io @ Self::Io { .. } => io,
        }
    }
}

fn display_path(path: &Option<PathBuf>) -> String {
    path.as_ref()
        .map_or_else(|| "config".to_string(), |p| p.display().to_string())
}

/// A checkpoint that cannot be loaded. Loading stops at the first error and returns no model.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("cannot read {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: neither model.safetensors nor model.safetensors.index.json exists")]
    NoWeights { path: PathBuf },
    #[error("{path}: not a valid safetensors file (truncated or corrupt?): {reason}")]
    Safetensors { path: PathBuf, reason: String },
    #[error("{path}: broken index: {reason}")]
    Index { path: PathBuf, reason: String },
    #[error("{path}: tensor `{name}` is listed in the index but missing from {shard}")]
    MissingFromShard {
        path: PathBuf,
        name: String,
        shard: String,
    },
    #[error("{path}: tensor `{name}` is in {shard} but the index maps it to {indexed}")]
    NotInIndex {
        path: PathBuf,
        name: String,
        shard: String,
        indexed: String,
    },
    #[error("{path}: missing tensor `{name}` (expected shape {expected:?})")]
    MissingTensor {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
    },
    #[error("{path}: unexpected tensor `{name}` (the model has no such parameter)")]
    UnexpectedTensor { path: PathBuf, name: String },
    #[error("{path}: tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch {
        path: PathBuf,
        name: String,
        expected: Vec<usize>,
        found: Vec<usize>,
    },
    #[error("{path}: tensor `{name}` has dtype {dtype}; only F32, BF16 and F16 are supported")]
    UnsupportedDtype {
        path: PathBuf,
        name: String,
        dtype: String,
    },
    #[error(
        "{path}: the config ties the embeddings, but `lm_head.weight` differs from \
         `model.embed_tokens.weight`"
    )]
    TiedMismatch { path: PathBuf },
}

/// A model directory that cannot be written.
#[derive(Debug, thiserror::Error)]
pub enum SaveError {
    #[error("cannot write {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot serialize {path}: {reason}")]
    Serialize { path: PathBuf, reason: String },
}
