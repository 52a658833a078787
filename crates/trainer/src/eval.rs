//! Evaluation (loss, perplexity, token accuracy) and per-example scores, without autodiff.
//!
//! Only the supervised positions' logits are computed, a few rows at a time, so memory stays
//! bounded by the loss chunk budget whatever the vocabulary.

use burn::tensor::{Int, Tensor, TensorData};
use qwen_chat::{Example, Loader, LoaderConfig};
use qwen_loss::{CrossEntropyOptions, IGNORE_INDEX, Reduction, masked_cross_entropy};
use qwen_model::{AttentionBackend, Qwen2ForCausalLM};
use serde::Serialize;

use crate::config::TrainConfig;
use crate::error::TrainError;
use crate::tensors::to_device;

#[derive(Debug, Clone, Serialize)]
pub struct EvalMetrics {
    pub step: u64,
    /// Mean cross-entropy per supervised token.
    pub loss: f64,
    pub perplexity: f64,
    /// Share of supervised positions whose argmax is the target.
    pub accuracy: f64,
    pub supervised_tokens: usize,
    pub examples: usize,
}

/// The loss of one example under the masking mode it was built with.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct ExampleScore {
    pub index: usize,
    pub loss_sum: f64,
    pub n_tokens: usize,
    #[serde(skip)]
    pub correct: usize,
}

/// Scores every example: summed loss, supervised targets and correct argmaxes, in input order.
pub fn score_examples<B: AttentionBackend>(
    model: &Qwen2ForCausalLM<B>,
    examples: &[Example],
    batch_size: usize,
    max_len: usize,
    chunk_bytes: usize,
) -> Result<Vec<ExampleScore>, TrainError> {
    let device = model.lm_head_weight().device();
    let config = LoaderConfig {
        batch_rows: batch_size,
        max_len,
        packing: false,
        group_by_length: false,
        shuffle: false,
        epochs: 1,
        ..LoaderConfig::default()
    };
    let mut loader = Loader::new(examples.to_vec(), config)?;
    let mut scores = Vec::with_capacity(examples.len());
    while let Some(batch) = loader.next_batch() {
        let rows = batch.rows;
        let device_batch = to_device::<B>(&batch, &device);
        let hidden = model.hidden_states(&device_batch.input, None);
        let [_, len, width] = hidden.dims();
        let host_targets = &device_batch.targets;
        let supervised: Vec<usize> = (0..rows * len)
            .filter(|&i| host_targets[i] != IGNORE_INDEX)
            .collect();
        let mut row_scores: Vec<ExampleScore> = (0..rows)
            .map(|r| ExampleScore {
                index: scores.len() + r,
                loss_sum: 0.0,
                n_tokens: 0,
                correct: 0,
            })
            .collect();
        if !supervised.is_empty() {
            let hidden = hidden.reshape([rows * len, width]);
            let weight = qwen_model::ops::cast_param(model.lm_head_weight(), hidden.dtype());
            let vocab = weight.dims()[0];
            // Rows per chunk so that one chunk of f32 logits stays within the budget.
            let chunk = (chunk_bytes / (vocab * 4 * 3)).max(1);
            let opts = CrossEntropyOptions::default().with_reduction(Reduction::None);
            for positions in supervised.chunks(chunk) {
                let index = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(
                        positions.iter().map(|&p| p as i64).collect::<Vec<_>>(),
                        [positions.len()],
                    )
                    .convert::<B::IntElem>(),
                    &device,
                );
                let wanted: Vec<i64> = positions.iter().map(|&p| host_targets[p]).collect();
                let wanted_t = Tensor::<B, 1, Int>::from_data(
                    TensorData::new(wanted.clone(), [positions.len()]).convert::<B::IntElem>(),
                    &device,
                );
                // [chunk, vocab]
                let logits =
                    qwen_model::ops::linear(hidden.clone().select(0, index), weight.clone(), None);
                let losses = masked_cross_entropy(logits.clone(), wanted_t, &opts)?.loss;
                let losses: Vec<f32> = losses
                    .into_data()
                    .convert::<f32>()
                    .to_vec()
                    .expect("float data");
                let argmax: Vec<i64> = logits
                    .argmax(1)
                    .into_data()
                    .convert::<i64>()
                    .to_vec()
                    .expect("int data");
                for (k, &p) in positions.iter().enumerate() {
                    let score = &mut row_scores[p / len];
                    score.loss_sum += f64::from(losses[k]);
                    score.n_tokens += 1;
                    score.correct += usize::from(argmax[k] == wanted[k]);
                }
            }
        }
        scores.extend(row_scores);
    }
    Ok(scores)
}

/// Loss, perplexity and token accuracy over `examples`.
pub fn evaluate<B: AttentionBackend>(
    model: &Qwen2ForCausalLM<B>,
    examples: &[Example],
    config: &TrainConfig,
    step: u64,
) -> Result<EvalMetrics, TrainError> {
    let scores = score_examples(
        model,
        examples,
        config.eval.batch_size,
        config.data.max_len,
        config.train.loss_chunk_mib << 20,
    )?;
    let tokens: usize = scores.iter().map(|s| s.n_tokens).sum();
    let loss_sum: f64 = scores.iter().map(|s| s.loss_sum).sum();
    let correct: usize = scores.iter().map(|s| s.correct).sum();
    let loss = if tokens == 0 {
        0.0
    } else {
        loss_sum / tokens as f64
    };
    Ok(EvalMetrics {
        step,
        loss,
        perplexity: loss.exp(),
        accuracy: if tokens == 0 {
            0.0
        } else {
            correct as f64 / tokens as f64
        },
        supervised_tokens: tokens,
        examples: scores.len(),
    })
}
