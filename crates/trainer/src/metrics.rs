//! Metrics as JSON lines in `<output_dir>/metrics.jsonl`: one `{"kind":"train",...}` line per
//! logged step and one `{"kind":"eval",...}` line per evaluation.

use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::TrainError;
use crate::eval::EvalMetrics;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StepMetrics {
    pub step: u64,
    pub total_steps: u64,
    /// Mean loss per supervised token over the accumulated step.
    pub loss: f64,
    pub lr: f64,
    /// Global gradient norm before clipping.
    pub grad_norm: f64,
    pub tokens: usize,
    pub supervised_tokens: usize,
    /// Time from the previous step's results being read to this step's (the first step: from
    /// the loop's start). Steps overlap: a step's loss is read after the next step's forward
    /// and backward passes are queued.
    pub step_seconds: f64,
    /// Host time from the step's start until its forward and backward passes were queued. On a
    /// GPU backend, which runs queued work asynchronously, a value close to `step_seconds`
    /// means the host, not the GPU, sets the pace.
    pub queued_seconds: f64,
    pub tokens_per_second: f64,
    pub elapsed_seconds: f64,
    pub epoch: usize,
}

pub struct MetricsLog {
    path: PathBuf,
    file: std::fs::File,
}

impl MetricsLog {
    /// Opens the log for a run starting after `start_step`: lines of later steps (from a run
    /// that went on past its last checkpoint) are removed, so a resumed run's log reads as one.
    pub fn open(path: &Path, start_step: u64) -> Result<Self, TrainError> {
        let io = |source| TrainError::Io {
            path: path.to_path_buf(),
            source,
        };
        let kept: Vec<String> = match std::fs::read_to_string(path) {
            Ok(text) if start_step > 0 => text
                .lines()
                .filter(|line| {
                    serde_json::from_str::<serde_json::Value>(line)
                        .ok()
                        .and_then(|v| v["step"].as_u64())
                        .is_some_and(|s| s <= start_step)
                })
                .map(str::to_string)
                .collect(),
            _ => Vec::new(),
        };
        let mut file = std::fs::File::create(path).map_err(io)?;
        for line in kept {
            writeln!(file, "{line}").map_err(io)?;
        }
        Ok(Self {
            path: path.to_path_buf(),
            file,
        })
    }

    fn line(&mut self, kind: &str, value: serde_json::Value) -> Result<(), TrainError> {
        let mut object = serde_json::Map::new();
        object.insert("kind".into(), kind.into());
        if let serde_json::Value::Object(fields) = value {
            object.extend(fields);
        }
        writeln!(self.file, "{}", serde_json::Value::Object(object)).map_err(|source| {
            TrainError::Io {
                path: self.path.clone(),
                source,
            }
        })
    }

    pub fn step(&mut self, metrics: &StepMetrics) -> Result<(), TrainError> {
        self.line("train", serde_json::to_value(metrics).expect("json"))
    }

    pub fn eval(&mut self, metrics: &EvalMetrics) -> Result<(), TrainError> {
        self.line("eval", serde_json::to_value(metrics).expect("json"))
    }
}

/// The `(step, loss)` pairs of one kind of line in a metrics file.
pub fn read_losses(path: &Path, kind: &str) -> Result<Vec<(u64, f64)>, TrainError> {
    let text = std::fs::read_to_string(path).map_err(|source| TrainError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    Ok(text
        .lines()
        .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
        .filter(|v| v["kind"] == kind)
        .filter_map(|v| Some((v["step"].as_u64()?, v["loss"].as_f64()?)))
        .collect())
}
