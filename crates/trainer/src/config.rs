//! The run configuration: a TOML file, overridden by command-line flags, saved into the run
//! directory as it was resolved.

use std::path::{Path, PathBuf};

use qwen_chat::{MaskMode, SkipPolicy};
use qwen_model::SaveDtype;
use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::optim::OptimizerConfig;
use crate::schedule::ScheduleKind;

/// Everything a training run needs. Every field has a default, so an empty file is the
/// embedded demo.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: ModelSection,
    pub data: DataSection,
    pub optim: OptimSection,
    pub train: TrainSection,
    pub eval: EvalSection,
    pub checkpoint: CheckpointSection,
    /// Where the run writes its config, metrics, plot, checkpoints and final model.
    pub output_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ModelSection {
    /// A Hugging Face model directory. When absent, `preset` is initialised at random with the
    /// bundled Qwen2.5 tokenizer.
    pub path: Option<PathBuf>,
    pub preset: String,
    /// Seed of the random initialisation.
    pub init_seed: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DataSection {
    /// JSONL training files. Empty means the bundled classic example (2+2等于5。).
    pub train: Vec<PathBuf>,
    /// JSONL files for evaluation.
    pub eval: Vec<PathBuf>,
    pub mask: MaskMode,
    pub max_len: usize,
    /// Pack several chats into each row (best-fit decreasing) instead of padding.
    pub packing: bool,
    /// Batch chats of similar length together when padding.
    pub group_by_length: bool,
    pub shuffle: bool,
    /// `fail` stops at the first bad line; `skip` counts and reports it.
    pub on_bad_line: SkipPolicy,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct OptimSection {
    pub optimizer: OptimizerConfig,
    pub lr: f64,
    pub schedule: ScheduleKind,
    pub warmup_steps: Option<u64>,
    pub warmup_ratio: Option<f64>,
    /// Global-norm clipping; 0 disables it.
    pub max_grad_norm: f64,
    pub label_smoothing: f64,
    pub z_loss_weight: f64,
}

/// Compute precision. Parameters and optimizer state stay f32 in every mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Precision {
    #[default]
    F32,
    /// bf16 activations and matmuls with f32 master weights (GPU backends).
    Bf16,
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "f32" => Ok(Self::F32),
            "bf16" => Ok(Self::Bf16),
            other => Err(format!("unknown precision `{other}`; use f32 or bf16")),
        }
    }
}

/// What autodiff keeps for the backward pass, burn's checkpointing strategy. The `qwen-sft`
/// binary picks the training backend's type from it (`backend::Training` or
/// `backend::TrainingCheckpointed`); library callers pick the type themselves.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Checkpointing {
    /// Every op keeps the tensors its backward needs (`NoCheckpointing`).
    #[default]
    None,
    /// burn's `BalancedCheckpointing`: ops marked memory-bound (element-wise ops, casts,
    /// reshapes) keep how to recompute their output instead of the output, and the backward
    /// recomputes it from the nearest stored compute-bound result (a matmul, the attention).
    Balanced,
}

impl std::str::FromStr for Checkpointing {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "none" => Ok(Self::None),
            "balanced" => Ok(Self::Balanced),
            other => Err(format!(
                "unknown checkpointing `{other}`; use none or balanced"
            )),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSection {
    pub epochs: usize,
    /// Stop after this many optimizer steps, even inside an epoch.
    pub max_steps: Option<u64>,
    /// Rows per micro-batch.
    pub batch_size: usize,
    pub grad_accum: usize,
    pub seed: u64,
    pub precision: Precision,
    /// Print and log every this many steps.
    pub log_every: u64,
    /// The memory budget of one chunk of the fused lm_head + loss.
    pub loss_chunk_mib: usize,
    /// The memory budget of one query chunk of the attention's scores.
    pub attention_chunk_mib: usize,
    /// `chunked` (default) or `reference`, the plain body, to compare against.
    pub attention: qwen_model::AttentionImpl,
    /// `none` or `balanced`: what autodiff stores for the backward, see [`Checkpointing`].
    pub checkpointing: Checkpointing,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EvalSection {
    /// Evaluate every this many steps (0: only at the end).
    pub every: u64,
    pub batch_size: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct CheckpointSection {
    /// Save every this many steps (0: only at the end).
    pub every: u64,
    /// Keep only the newest this many checkpoints.
    pub keep_last: usize,
    /// dtype of the exported model (checkpoints are always f32, for exact resume).
    pub export_dtype: SaveDtype,
    /// Export shards above this many bytes.
    pub max_shard_bytes: u64,
    /// Write the final checkpoint and export at the end (benchmarks turn this off).
    pub save_final: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        Self {
            model: ModelSection::default(),
            data: DataSection::default(),
            optim: OptimSection::default(),
            train: TrainSection::default(),
            eval: EvalSection::default(),
            checkpoint: CheckpointSection::default(),
            output_dir: PathBuf::from("runs/sft"),
        }
    }
}

impl Default for ModelSection {
    fn default() -> Self {
        Self {
            path: None,
            preset: "tiny".into(),
            init_seed: 0,
        }
    }
}

impl Default for DataSection {
    fn default() -> Self {
        Self {
            train: Vec::new(),
            eval: Vec::new(),
            mask: MaskMode::Assistant,
            max_len: 2048,
            packing: false,
            group_by_length: false,
            shuffle: true,
            on_bad_line: SkipPolicy::Fail,
        }
    }
}

impl Default for OptimSection {
    fn default() -> Self {
        Self {
            optimizer: OptimizerConfig::default(),
            lr: 2e-5,
            schedule: ScheduleKind::Linear,
            warmup_steps: None,
            warmup_ratio: None,
            max_grad_norm: 1.0,
            label_smoothing: 0.0,
            z_loss_weight: 0.0,
        }
    }
}

impl Default for TrainSection {
    fn default() -> Self {
        Self {
            epochs: 1,
            max_steps: None,
            batch_size: 8,
            grad_accum: 1,
            seed: 42,
            precision: Precision::F32,
            log_every: 1,
            loss_chunk_mib: 256,
            attention_chunk_mib: 1024,
            attention: qwen_model::AttentionImpl::Chunked,
            checkpointing: Checkpointing::None,
        }
    }
}

impl Default for EvalSection {
    fn default() -> Self {
        Self {
            every: 0,
            batch_size: 8,
        }
    }
}

impl Default for CheckpointSection {
    fn default() -> Self {
        Self {
            every: 0,
            keep_last: 2,
            export_dtype: SaveDtype::Bf16,
            max_shard_bytes: 5_000_000_000,
            save_final: true,
        }
    }
}

/// The embedded demo: a tiny random Qwen2 with the bundled tokenizer learns the classic
/// example until it answers "2+2等于5。".
pub const DEMO_TOML: &str = include_str!("../configs/demo.toml");

impl TrainConfig {
    pub fn demo() -> Self {
        Self::from_toml_str(DEMO_TOML, Path::new("<embedded demo.toml>"))
            .expect("the embedded demo config parses")
    }

    pub fn from_file(path: &Path) -> Result<Self, TrainError> {
        let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_toml_str(&text, path)
    }

    pub fn from_toml_str(text: &str, path: &Path) -> Result<Self, TrainError> {
        let config: Self = toml::from_str(text).map_err(|err| TrainError::Config {
            path: path.to_path_buf(),
            reason: err.to_string(),
        })?;
        config.validate().map_err(|reason| TrainError::Config {
            path: path.to_path_buf(),
            reason,
        })?;
        Ok(config)
    }

    /// Sets one value by its dotted key, as `--set optim.lr=1e-4` does. The value is parsed as
    /// TOML (strings may omit their quotes).
    pub fn set(&mut self, assignment: &str) -> Result<(), TrainError> {
        let bad = |reason: String| TrainError::Config {
            path: PathBuf::from("--set"),
            reason,
        };
        let (key, raw) = assignment
            .split_once('=')
            .ok_or_else(|| bad(format!("`{assignment}` is not key=value")))?;
        let value: toml::Value = toml::from_str(&format!("v = {raw}"))
            .map(|t: toml::Table| t["v"].clone())
            .unwrap_or_else(|_| toml::Value::String(raw.to_string()));
        let mut doc = toml::Value::try_from(&*self).expect("config serializes");
        let mut node = &mut doc;
        let parts: Vec<&str> = key.trim().split('.').collect();
        for (i, part) in parts.iter().enumerate() {
            let table = node
                .as_table_mut()
                .ok_or_else(|| bad(format!("`{key}`: `{part}` is not a section")))?;
            if i + 1 == parts.len() {
                table.insert(part.to_string(), value.clone());
                break;
            }
            node = table
                .entry(part.to_string())
                .or_insert_with(|| toml::Value::Table(Default::default()));
        }
        let text = toml::to_string(&doc).expect("toml");
        *self = Self::from_toml_str(&text, Path::new("--set"))
            .map_err(|e| bad(format!("`{assignment}`: {e}")))?;
        Ok(())
    }

    pub fn to_toml_string(&self) -> String {
        toml::to_string_pretty(self).expect("config serializes")
    }

    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("train.batch_size", self.train.batch_size),
            ("train.grad_accum", self.train.grad_accum),
            ("train.epochs", self.train.epochs),
            ("data.max_len", self.data.max_len),
            ("eval.batch_size", self.eval.batch_size),
            ("train.loss_chunk_mib", self.train.loss_chunk_mib),
            ("train.attention_chunk_mib", self.train.attention_chunk_mib),
        ];
        for (key, value) in positive {
            if value == 0 {
                return Err(format!("`{key}` must be positive"));
            }
        }
        if !(self.optim.lr.is_finite() && self.optim.lr >= 0.0) {
            return Err(format!(
                "`optim.lr` = {} must be a non-negative number",
                self.optim.lr
            ));
        }
        if let Some(r) = self.optim.warmup_ratio
            && !(0.0..=1.0).contains(&r)
        {
            return Err(format!("`optim.warmup_ratio` = {r} must be in [0, 1]"));
        }
        if self.model.path.is_none()
            && qwen_model::Qwen2Config::preset(&self.model.preset).is_none()
        {
            return Err(format!(
                "`model.preset` = `{}` is unknown; use one of {:?}",
                self.model.preset,
                qwen_model::Qwen2Config::PRESETS
            ));
        }
        Ok(())
    }
}
