//! KV-cache decoding (prefill, then one token at a time) equals the full forward pass.

mod common;

use burn::tensor::{Int, Tensor};
use common::{B, device, max_abs_diff};
use qwen_model::{KvCache, Qwen2Config, Qwen2ForCausalLM, Qwen2Input};

fn model() -> (Qwen2Config, Qwen2ForCausalLM<B>) {
    let mut config = Qwen2Config::preset("tiny").unwrap();
    config.vocab_size = 1000;
    // Larger weights than the 0.02 init so attention patterns are far from uniform.
    config.initializer_range = 0.2;
    let model = Qwen2ForCausalLM::init(&config, &device(), 11);
    (config, model)
}

fn ints<const D: usize>(values: Vec<i64>, shape: [usize; D]) -> Tensor<B, D, Int> {
    Tensor::from_data(burn::tensor::TensorData::new(values, shape), &device())
}

fn to_vec(t: Tensor<B, 3>) -> Vec<f32> {
    t.into_data().to_vec::<f32>().unwrap()
}

#[test]
fn cached_decoding_equals_full_forward() {
    let (config, model) = model();
    let tokens: Vec<i64> = vec![5, 17, 923, 4, 88, 301, 2, 640];
    let full = model.forward(&Qwen2Input::new(ints(tokens.clone(), [1, 8])));

    let mut cache = KvCache::new(&config);
    let prefill = model.forward_cached(
        &Qwen2Input::new(ints(tokens[..5].to_vec(), [1, 5])),
        &mut cache,
    );
    let mut diff = max_abs_diff(&to_vec(prefill), &to_vec(full.clone().narrow(1, 0, 5)));
    for (i, &token) in tokens.iter().enumerate().skip(5) {
        let step = model.forward_cached(&Qwen2Input::new(ints(vec![token], [1, 1])), &mut cache);
        diff = diff.max(max_abs_diff(
            &to_vec(step),
            &to_vec(full.clone().narrow(1, i, 1)),
        ));
    }
    assert_eq!(cache.len(), 8);
    println!("cached vs full: max |diff| = {diff:e}");
    assert!(diff < 1e-5, "{diff}");
}

#[test]
fn cached_decoding_with_left_padding_equals_full_forward() {
    let (config, model) = model();
    // Row 0 has 6 tokens; row 1 has 4, left-padded by 2. Both then decode 2 more.
    let ids = vec![5, 17, 923, 4, 88, 301, 0, 0, 2, 640, 31, 7];
    let segments = vec![1, 1, 1, 1, 1, 1, 0, 0, 1, 1, 1, 1];
    let positions = vec![0, 1, 2, 3, 4, 5, 0, 0, 0, 1, 2, 3];
    let next = [[44i64], [45]];
    let after = [[46i64], [47]];

    let mut all_ids = Vec::new();
    let mut all_seg = Vec::new();
    let mut all_pos = Vec::new();
    for row in 0..2 {
        all_ids.extend_from_slice(&ids[row * 6..row * 6 + 6]);
        all_ids.extend([next[row][0], after[row][0]]);
        all_seg.extend_from_slice(&segments[row * 6..row * 6 + 6]);
        all_seg.extend([1, 1]);
        let last = positions[row * 6 + 5];
        all_pos.extend_from_slice(&positions[row * 6..row * 6 + 6]);
        all_pos.extend([last + 1, last + 2]);
    }
    let full = model.forward(
        &Qwen2Input::new(ints(all_ids, [2, 8]))
            .with_segments(ints(all_seg, [2, 8]))
            .with_positions(ints(all_pos, [2, 8])),
    );

    let mut cache = KvCache::new(&config);
    let prefill = Qwen2Input::new(ints(ids, [2, 6]))
        .with_segments(ints(segments, [2, 6]))
        .with_positions(ints(positions, [2, 6]));
    model.forward_cached(&prefill, &mut cache);
    let step1 = model.forward_cached(&Qwen2Input::new(ints(next.concat(), [2, 1])), &mut cache);
    let step2 = model.forward_cached(&Qwen2Input::new(ints(after.concat(), [2, 1])), &mut cache);
    let diff = max_abs_diff(&to_vec(step1), &to_vec(full.clone().narrow(1, 6, 1)))
        .max(max_abs_diff(&to_vec(step2), &to_vec(full.narrow(1, 7, 1))));
    println!("left-padded cached vs full: max |diff| = {diff:e}");
    assert!(diff < 1e-5, "{diff}");
}
