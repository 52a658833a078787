//! Host batches from `qwen-chat` to device tensors for the model and the loss.

use burn::tensor::backend::Backend;
use burn::tensor::{Int, Tensor, TensorData};
use qwen_chat::Batch;
use qwen_model::Qwen2Input;

/// A batch on the device.
#[derive(Debug, Clone)]
pub struct DeviceBatch<B: Backend> {
    pub input: Qwen2Input<B>,
    /// `[rows * len]` next-token targets (`qwen_loss::next_token_targets_host` of the labels),
    /// kept on the host: the loss needs them there, and reading them back from the device
    /// would make the host wait for the whole forward pass every step.
    pub targets: Vec<i64>,
    /// Supervised targets after the shift: labels that are not -100, past the first position
    /// of each row (which no position predicts).
    pub supervised: usize,
    /// Non-padding tokens.
    pub tokens: usize,
}

fn ints<B: Backend>(
    values: Vec<i64>,
    rows: usize,
    len: usize,
    device: &B::Device,
) -> Tensor<B, 2, Int> {
    Tensor::from_data(
        TensorData::new(values, [rows, len]).convert::<B::IntElem>(),
        device,
    )
}

pub fn to_device<B: Backend>(batch: &Batch, device: &B::Device) -> DeviceBatch<B> {
    let (rows, len) = (batch.rows, batch.len);
    let ids = batch.input_ids.iter().map(|&id| i64::from(id)).collect();
    let segments = batch.segment_ids.iter().map(|&s| i64::from(s)).collect();
    let input = Qwen2Input::new(ints(ids, rows, len, device))
        .with_positions(ints(batch.position_ids.clone(), rows, len, device))
        .with_segments(ints(segments, rows, len, device));
    DeviceBatch {
        input,
        targets: qwen_loss::next_token_targets_host(&batch.labels, len),
        // Batches set the first label of every sequence to -100, so no supervised label sits
        // where the shift would drop it: the supervised labels are the supervised targets.
        supervised: batch.supervised_tokens(),
        tokens: batch.real_tokens(),
    }
}
