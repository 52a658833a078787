//! The model against transformers' `Qwen2ForCausalLM`, on the checkpoints and logits that
//! `tests/fixtures/model/generate.py` wrote.

mod common;

use burn::tensor::{DType, Int, Tensor};
use common::{B, Reference, device, fixture_dir, max_abs_diff};
use qwen_model::{Qwen2ForCausalLM, Qwen2Input, load_pretrained};

const TOLERANCE: f32 = 1e-4;

/// Compares our logits with the reference at the positions where `keep` is true: the sampled
/// columns value by value, and the log-sum-exp and argmax over the full vocabulary.
fn compare(reference: &Reference, prefix: &str, logits: Tensor<B, 3>, keep: &[bool]) -> f32 {
    let [batch, seq, vocab] = logits.dims();
    let (_, sample) = reference.i64s("vocab_sample");
    let sample_ids = Tensor::<B, 1, Int>::from_data(sample.as_slice(), &device());
    let ours_sample = logits
        .clone()
        .select(2, sample_ids)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let ours_lse = logits
        .clone()
        .exp()
        .sum_dim(2)
        .log()
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let ours_argmax = logits
        .argmax(2)
        .into_data()
        .convert::<i64>()
        .to_vec::<i64>()
        .unwrap();
    let (_, want_sample) = reference.f32s(&format!("{prefix}.logits_sample"));
    let (_, want_lse) = reference.f32s(&format!("{prefix}.logsumexp"));
    let (_, want_argmax) = reference.i64s(&format!("{prefix}.argmax"));
    assert_eq!(keep.len(), batch * seq);
    let n = sample.len();
    let mut worst = 0.0f32;
    for pos in (0..batch * seq).filter(|&p| keep[p]) {
        let row = pos * n..(pos + 1) * n;
        worst = worst.max(max_abs_diff(&ours_sample[row.clone()], &want_sample[row]));
        worst = worst.max(max_abs_diff(
            &ours_lse[pos..pos + 1],
            &want_lse[pos..pos + 1],
        ));
        assert_eq!(
            ours_argmax[pos], want_argmax[pos],
            "{prefix}: argmax at {pos} (vocab {vocab})"
        );
    }
    worst
}

fn load(variant: &str) -> Qwen2ForCausalLM<B> {
    let (_, model) = load_pretrained::<B>(fixture_dir(variant), &device(), DType::F32)
        .unwrap_or_else(|e| panic!("{variant}: {e}"));
    model
}

fn check_padded_batch(variant: &str) {
    let reference = Reference::open(variant);
    let model = load(variant);
    let ids: Tensor<B, 2, Int> = reference.int_tensor("padded.input_ids");
    let mask: Tensor<B, 2, Int> = reference.int_tensor("padded.attention_mask");
    let keep: Vec<bool> = reference
        .i64s("padded.attention_mask")
        .1
        .iter()
        .map(|&m| m == 1)
        .collect();
    let logits = model.forward(&Qwen2Input::new(ids).with_attention_mask(mask));
    let diff = compare(&reference, "padded", logits, &keep);
    println!("{variant}: padded batch max |diff| = {diff:e}");
    assert!(
        diff < TOLERANCE,
        "{variant}: padded batch differs by {diff}"
    );
}

fn check_packed_row(variant: &str) {
    let reference = Reference::open(variant);
    let model = load(variant);
    let input = Qwen2Input::new(reference.int_tensor("packed.input_ids"))
        .with_positions(reference.int_tensor("packed.position_ids"))
        .with_segments(reference.int_tensor("packed.segment_ids"));
    let logits = model.forward(&input);
    let diff = compare(&reference, "packed", logits, &[true; 7]);
    println!("{variant}: packed row max |diff| = {diff:e}");
    assert!(diff < TOLERANCE, "{variant}: packed row differs by {diff}");
}

#[test]
fn tied_f32_padded_batch() {
    check_padded_batch("tied_f32");
}

#[test]
fn tied_f32_packed_row() {
    check_packed_row("tied_f32");
}

#[test]
fn untied_bf16_padded_batch() {
    check_padded_batch("untied_bf16");
}

#[test]
fn untied_bf16_packed_row() {
    check_packed_row("untied_bf16");
}

#[test]
fn sharded_padded_batch() {
    check_padded_batch("tied_bf16_sharded");
}

#[test]
fn sharded_packed_row() {
    check_packed_row("tied_bf16_sharded");
}

#[test]
fn qwen3_padded_batch() {
    check_padded_batch("qwen3_tied_f32");
}

#[test]
fn qwen3_packed_row() {
    check_packed_row("qwen3_tied_f32");
}

/// The reference attention body, selectable at run time, gives the same logits.
#[test]
fn reference_attention_body_agrees() {
    let reference = Reference::open("tied_f32");
    let input = Qwen2Input::new(reference.int_tensor("packed.input_ids"))
        .with_positions(reference.int_tensor("packed.position_ids"))
        .with_segments(reference.int_tensor("packed.segment_ids"));
    let chunked = load("tied_f32")
        .forward(&input)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let plain = load("tied_f32")
        .with_attention_impl(qwen_model::AttentionImpl::Reference)
        .forward(&input)
        .into_data()
        .to_vec::<f32>()
        .unwrap();
    let diff = max_abs_diff(&chunked, &plain);
    assert!(diff < 1e-5, "{diff}");
}
