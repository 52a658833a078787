//! Training checkpoints: everything `--resume` needs to continue exactly where a run stopped.
//!
//! ```text
//! <output_dir>/checkpoints/step-000100/
//!   model/                 config.json + model.safetensors, f32 (exact)
//!   optimizer.safetensors  the optimizer's moments and step count
//!   state.json             step, token counters, data cursor, seed
//! ```
//!
//! A checkpoint is written to `step-000100.tmp` and renamed into place, so an interrupted save
//! never leaves a half-written checkpoint under a real name.

use std::path::{Path, PathBuf};

use burn::tensor::DType;
use burn::tensor::backend::AutodiffBackend;
use qwen_chat::Cursor;
use qwen_model::{
    Qwen2Config, Qwen2ForCausalLM, SaveDtype, SaveOptions, load_pretrained, save_pretrained,
};
use serde::{Deserialize, Serialize};

use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::optim::Optimizer;

/// The counters of a run.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct TrainerState {
    /// Optimizer steps taken.
    pub step: u64,
    pub tokens: u64,
    pub supervised_tokens: u64,
    /// Where the data loader stands; `None` before the first step.
    pub cursor: Option<Cursor>,
    /// The data order and initialisation are functions of these seeds and the cursor; no other
    /// random state exists in training.
    pub seed: u64,
    pub init_seed: u64,
    /// The newest checkpoint written before this state.
    pub checkpoint: Option<PathBuf>,
}

/// A restored checkpoint.
pub struct Restored<B: AutodiffBackend> {
    pub model: Qwen2ForCausalLM<B>,
    pub optimizer: Optimizer<B::InnerBackend>,
    pub state: TrainerState,
}

fn checkpoints_dir(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TrainError + '_ {
    move |source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Saves a checkpoint for `state.step` and removes all but the newest `keep_last`.
pub fn save<B: AutodiffBackend>(
    out: &Path,
    model: &Qwen2ForCausalLM<B>,
    config: &Qwen2Config,
    optimizer: &Optimizer<B::InnerBackend>,
    state: &TrainerState,
    keep_last: usize,
) -> Result<PathBuf, TrainError> {
    let dir = checkpoints_dir(out);
    let name = format!("step-{:06}", state.step);
    let final_path = dir.join(&name);
    let tmp = dir.join(format!("{name}.tmp"));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir_all(&tmp).map_err(io(&tmp))?;

    let exact = SaveOptions {
        dtype: SaveDtype::F32,
        max_shard_bytes: u64::MAX,
    };
    save_pretrained(model, config, tmp.join("model"), &exact)?;
    optimizer.save(&tmp.join("optimizer.safetensors"))?;
    let mut state = state.clone();
    state.checkpoint = Some(final_path.clone());
    let json = serde_json::to_string_pretty(&state).expect("state serializes");
    std::fs::write(tmp.join("state.json"), json).map_err(io(&tmp))?;

    if final_path.exists() {
        std::fs::remove_dir_all(&final_path).map_err(io(&final_path))?;
    }
    std::fs::rename(&tmp, &final_path).map_err(io(&final_path))?;
    prune(&dir, keep_last.max(1))?;
    Ok(final_path)
}

/// Removes all but the newest `keep` complete checkpoints.
fn prune(dir: &Path, keep: usize) -> Result<(), TrainError> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(dir)
        .map_err(io(dir))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("step-") && !n.ends_with(".tmp"))
        })
        .collect();
    steps.sort();
    let excess = steps.len().saturating_sub(keep);
    for old in &steps[..excess] {
        std::fs::remove_dir_all(old).map_err(io(old))?;
    }
    Ok(())
}

/// The newest complete checkpoint of a run directory, if any.
pub fn latest(out: &Path) -> Option<PathBuf> {
    let mut steps: Vec<PathBuf> = std::fs::read_dir(checkpoints_dir(out))
        .ok()?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.join("state.json").exists() && !p.to_string_lossy().ends_with(".tmp"))
        .collect();
    steps.sort();
    steps.pop()
}

/// Loads a checkpoint directory, or the newest checkpoint of a run directory.
pub fn load<B: AutodiffBackend>(
    path: &Path,
    config: &TrainConfig,
    device: &B::Device,
) -> Result<Restored<B>, TrainError> {
    let dir = if path.join("state.json").exists() {
        path.to_path_buf()
    } else {
        latest(path).ok_or_else(|| TrainError::Checkpoint {
            path: path.to_path_buf(),
            reason: "neither a checkpoint (no state.json) nor a run directory with checkpoints"
                .into(),
        })?
    };
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(io(&state_path))?;
    let state: TrainerState = serde_json::from_str(&text).map_err(|e| TrainError::Checkpoint {
        path: state_path.clone(),
        reason: e.to_string(),
    })?;
    let (_, model) = load_pretrained::<B>(dir.join("model"), device, DType::F32)?;
    let optimizer = Optimizer::<B::InnerBackend>::load(
        config.optim.optimizer,
        &dir.join("optimizer.safetensors"),
        device,
    )?;
    Ok(Restored {
        model,
        optimizer,
        state,
    })
}
